"""The fused-batch layout: several datasets' rows in one global batch, and back.

A batch is split over the devices by rows; a fused batch holds device d's share of dataset 0,
then its share of dataset 1, ..., so every dataset is sharded evenly over the devices. The input
pipeline fuses (fuse_datasets, numpy) and the training step splits (split_by_dataset, jax or
numpy) with one definition of the layout, in a module free of TensorFlow.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def fuse_datasets(parts: Sequence[np.ndarray], num_devices: int) -> np.ndarray:
  """One fused batch (the module's layout) from each dataset's rows `parts`, each divisible by
  num_devices; split_by_dataset recovers them without moving data between devices."""
  blocks = [part.reshape((num_devices, -1) + part.shape[1:]) for part in parts]
  return np.concatenate(blocks, axis=1).reshape((-1,) + parts[0].shape[1:])


def split_by_dataset(x, batch_sizes: Sequence[int], num_devices: int) -> list:
  """Each dataset's rows of a fused global batch (fuse_datasets' inverse), for jax or numpy x.

  The split is a reshape to [devices, rows per device] and a slice of the per-device axis, local
  to each device. The host fuses its processes' share over its local devices; in the global
  array (rows ordered by process, then by local device) that is the same layout over all the
  mesh's devices.
  """
  if len(batch_sizes) == 1:
    return [x]
  blocks = x.reshape((num_devices, -1) + x.shape[1:])
  parts, start = [], 0
  for size in batch_sizes:
    per_device = size // num_devices
    parts.append(blocks[:, start : start + per_device].reshape((size,) + x.shape[1:]))
    start += per_device
  return parts
