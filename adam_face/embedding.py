"""L2-normalised face embeddings of uint8 images, in jitted batches sharded over a device mesh.

The flip test (FLIP_MODES) adds or concatenates the embedding of each image's horizontal mirror.
Scores and metrics of the embeddings are in verification_metrics; verification.Evaluator ties the
two together for whole verification sets.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from adam_face import pixels

FLIP_MODES = ("none", "sum", "concat")


def compute_embeddings(
    embed_fn: Callable[[jax.Array], jax.Array],
    images_uint8: np.ndarray,
    *,
    batch_size: int,
    mesh: jax.sharding.Mesh,
    flip: str = "sum",
    return_norms: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
  """L2-normalised embeddings of uint8 images, in jitted batches sharded over every mesh device.

  Args:
    embed_fn: maps float32 images [b, H, W, C], normalised by pixels.normalize
      ((x - 127.5) / 127.5), to [b, D]. It is jitted here. Pass a
      ``jax.tree_util.Partial(apply_fn, variables)`` to make the variables traced arguments: a
      plain closure bakes them into the program as constants and, being a new object on every
      call, recompiles each time.
    images_uint8: uint8 [N, H, W, C] (numpy; the same full array on every process).
    batch_size: global batch size, a multiple of the number of mesh devices. The last partial
      batch is zero-padded to it and its padding rows are discarded, so no image is dropped.
    mesh: the batch axis is sharded over all of its axes.
    flip: 'none' (the image only), 'sum' (embedding of the image plus that of its horizontal
      flip, the standard flip test) or 'concat' (the two embeddings concatenated, [N, 2D]).
      The combined embedding is L2-normalised.
    return_norms: also return each combined embedding's norm before the normalisation (IJB's
      template pooling weighs faces by it, as insightface does).

  Returns:
    float32 [N, D] (or [N, 2D] for 'concat'), rows of unit norm; with return_norms, also float32
    [N], their norms.
  """
  if flip not in FLIP_MODES:
    raise ValueError(f"flip={flip!r} is not one of {FLIP_MODES}.")
  images = np.asarray(images_uint8)
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(
        f"images_uint8 must be uint8 [N, H, W, C]; got {images.dtype} "
        f"{images.shape}. Pass the undecoded, unnormalised pixels: this function "
        "normalises them itself."
    )
  num_images = images.shape[0]
  if num_images == 0:
    raise ValueError("images_uint8 holds no images.")
  if batch_size <= 0 or batch_size % mesh.size:
    rounded_up = mesh.size * max(1, -(-batch_size // mesh.size))
    raise ValueError(
        f"batch_size={batch_size} must be a positive multiple of the mesh's "
        f"{mesh.size} devices (e.g. {rounded_up})."
    )
  if not isinstance(embed_fn, jax.tree_util.Partial):
    embed_fn = jax.tree_util.Partial(embed_fn)

  batch_sharding = NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))
  step = _embedding_step(mesh, flip)
  outputs = []
  for start in range(0, num_images, batch_size):
    batch = images[start : start + batch_size]
    num_valid = batch.shape[0]
    if num_valid < batch_size:
      batch = np.concatenate(
          [batch, np.zeros((batch_size - num_valid,) + batch.shape[1:], np.uint8)]
      )
    global_batch = jax.make_array_from_callback(
        batch.shape, batch_sharding, lambda index, batch=batch: batch[index]
    )
    # Dispatch stays asynchronous: results are fetched once every batch is queued.
    outputs.append((step(embed_fn, global_batch, num_valid), num_valid))

  embeddings, norms = [], []
  for (emb, norm), num_valid in outputs:
    embeddings.append(_to_host(emb)[:num_valid])
    norms.append(_to_host(norm)[:num_valid])
  embeddings, norms = np.concatenate(embeddings), np.concatenate(norms)
  bad = np.flatnonzero(~(np.isfinite(norms) & (norms > 0)))
  if bad.size:
    raise ValueError(
        f"embed_fn gave {bad.size} embeddings with zero or non-finite norm (first "
        f"at image {bad[0]}, norm {norms[bad[0]]}); their cosine scores would be "
        "undefined. Check the model variables and the input images."
    )
  return (embeddings, norms) if return_norms else embeddings


@functools.lru_cache(maxsize=None)
def _embedding_step(mesh: jax.sharding.Mesh, flip: str):
  """Jitted batch embedding for one mesh and flip mode; jit itself caches per embed_fn."""

  def step(embed_fn, images_uint8, num_valid):
    # The training pipeline's own normalisation: the network sees pixels scaled as it learnt.
    images = pixels.normalize(images_uint8.astype(jnp.float32))
    emb = _checked_embed(embed_fn, images)
    if flip != "none":
      emb_flipped = _checked_embed(embed_fn, images[:, :, ::-1, :])
      emb = emb + emb_flipped if flip == "sum" else jnp.concatenate([emb, emb_flipped], axis=-1)
    norm = jnp.sqrt(jnp.sum(jnp.square(emb), axis=-1))
    # Padding rows may embed to zero; a unit divisor keeps them finite (they are discarded).
    is_valid = jnp.arange(emb.shape[0]) < num_valid
    return emb / jnp.where(is_valid, norm, 1.0)[:, None], norm

  # Outputs stay batch-sharded and are gathered on the host: no device collective, so batches
  # in flight at once cannot starve each other (XLA:CPU runs every device of every in-flight
  # program on one shared thread pool, where concurrent all-gathers can deadlock).
  batch_sharding = NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))
  return jax.jit(step, out_shardings=(batch_sharding, batch_sharding))


def _to_host(x: jax.Array) -> np.ndarray:
  """The whole array on this host, from every process when it spans several."""
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _checked_embed(embed_fn, images):
  emb = embed_fn(images)
  if emb.ndim != 2 or emb.shape[0] != images.shape[0]:
    raise ValueError(
        f"embed_fn must map [b, H, W, C] images to [b, D] embeddings; it mapped "
        f"{images.shape} to {emb.shape}."
    )
  return emb.astype(jnp.float32)
