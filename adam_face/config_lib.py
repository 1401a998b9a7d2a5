"""Config checks that run before anything is compiled, so a typo costs seconds, not a TPU hour.

`configs/default.py` is the schema: every key a config may hold is a key of the default config
(only `dataset.builder_kwargs`, which is passed to the dataset builder, is free-form).
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
from typing import Any

import ml_collections

from adam_face import losses, margins, models

DEFAULT_CONFIG_PATH = pathlib.Path(__file__).resolve().parents[1] / "configs" / "default.py"
_FREE_FORM = ("dataset.builder_kwargs",)
_CHOICES = {
    "loss.kind": losses.KINDS + margins.KINDS,
    "optimizer.name": ("sgd", "adamw"),
    "optimizer.schedule": ("polynomial", "cosine", "step", "constant"),
    "compute_dtype": ("float32", "bfloat16"),
    "verification.flip": ("none", "sum", "concat"),
    "model.name": models.MODEL_NAMES,
}


def default_config() -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location("adam_face_default_config", DEFAULT_CONFIG_PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in config.items():
    path = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict) and path not in _FREE_FORM:
      flat.update(_flatten(value, path + "."))
    else:
      flat[path] = value
  return flat


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises a one-line ValueError for unknown keys, invalid choices or impossible values."""
  defaults = default_config()
  known = _flatten(defaults)
  given = _flatten(config)
  for path in sorted(given):
    if path not in known:
      parent = path.rpartition(".")[0]
      siblings = defaults
      for key in parent.split(".") if parent else ():
        siblings = siblings[key]
      raise ValueError(f"Unknown config key {path!r}; valid keys under "
                       f"{parent or 'the top level'!r} are: {', '.join(sorted(siblings))}.")
  for path, choices in _CHOICES.items():
    if given[path] not in choices:
      raise ValueError(f"config.{path}={given[path]!r} is not one of {', '.join(choices)}.")
  if config.loss.kind in margins.KINDS:
    margins.check_config(config.loss)
  else:
    losses.validate_margin(config.loss.kind, config.loss.s, config.loss.m)
  am = config.loss.auto_margin
  if am.enabled:
    losses.validate_auto_margin(config.loss.kind, target=am.target, rate=am.rate,
                                momentum=am.momentum, m_min=am.m_min, m_max=am.m_max,
                                m=config.loss.m)
    if am.warmup_steps < 0:
      raise ValueError(f"config.loss.auto_margin.warmup_steps={am.warmup_steps} must be >= 0.")
  if not 0.0 < config.head.sample_rate <= 1.0:
    raise ValueError(f"config.head.sample_rate={config.head.sample_rate} must be in (0, 1].")
  for path in ("global_batch_size", "log_every_steps", "checkpoint_every_steps",
               "verification.eval_every_steps", "verification.batch_size", "keep_checkpoints"):
    if given[path] <= 0:
      raise ValueError(f"config.{path}={given[path]} must be a positive integer.")
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise ValueError("Set config.num_train_steps > 0 or config.num_epochs > 0.")


def validate_for_mesh(config: ml_collections.ConfigDict, num_devices: int,
                      num_processes: int) -> None:
  """The global batches must split evenly over the devices and processes of the mesh."""
  for path, size in (("global_batch_size", config.global_batch_size),
                     ("verification.batch_size", config.verification.batch_size)):
    if size % num_devices or size % num_processes:
      step = math.lcm(num_devices, num_processes)
      raise ValueError(
          f"config.{path}={size} is not divisible by the {num_devices} devices "
          f"({num_processes} processes); use a multiple of {step}, e.g. "
          f"{max(step, size // step * step)}.")


def flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as flat scalars for TensorBoard's hparams plugin."""
  return {k: v if isinstance(v, (int, float, str, bool)) else str(v)
          for k, v in _flatten(config).items()}
