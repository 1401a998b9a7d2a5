"""Config checks that run before anything is compiled, so a typo costs seconds, not a TPU hour.

`configs/default.py` is the schema: every key a config may hold is a key of the default config,
except `loss`, whose fields are those of its kind (checked by `margins.from_config`), and
`dataset.builder_kwargs`, which is passed to the dataset builder as it is.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import os
import pathlib
from typing import Any

import ml_collections

from adam_face import margins, models

DEFAULT_CONFIG_PATH = pathlib.Path(__file__).resolve().parents[1] / "configs" / "default.py"
_FREE_FORM = ("dataset.builder_kwargs", "loss")
_CHOICES = {
    "optimizer.name": ("sgd", "adamw"),
    "optimizer.schedule": ("polynomial", "cosine", "step", "constant"),
    "compute_dtype": ("float32", "bfloat16"),
    "verification.flip": ("none", "sum", "concat"),
    "model.name": models.MODEL_NAMES,
    "nonfinite_policy": ("stop", "skip"),
}


def default_config() -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location("adam_face_default_config", DEFAULT_CONFIG_PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


# Dictionaries whose keys belong to the user (passed on to a builder as they are): the command line
# may add keys to them.
OPEN_DICTS = ("dataset.builder_kwargs",)


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """The config of `--config=<file>[:<argument>]`, loaded as ml_collections' config_flags does."""
  path, _, argument = spec.partition(":")
  if not os.path.isfile(path):
    raise ValueError(
        f"--config={spec}: {path} is not a file; give a config file such as configs/demo.py."
    )
  module_spec = importlib.util.spec_from_file_location("adam_face_command_line_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(argument) if argument else module.get_config()


def command_line_overrides(args) -> tuple[str | None, list[tuple[str, str]]]:
  """(the --config spec, [(dotted field, raw value)] of every --config.<field>=<value>) in args,
  in either absl form: --config.x=1 or --config.x 1."""
  spec, overrides = None, []
  args = list(args)
  for i, arg in enumerate(args):
    name, equals, value = arg.partition("=")
    if not equals and i + 1 < len(args):
      value = args[i + 1]
    if name == "--config":
      spec = value
    elif name.startswith("--config."):
      overrides.append((name[len("--config.") :], value))
  return spec, overrides


def set_field(config: ml_collections.ConfigDict, path: str, value: Any) -> None:
  """config.<path> = value for a dotted path such as "optimizer.learning_rate"."""
  *parents, key = path.split(".")
  for parent in parents:
    config = config[parent]
  config[key] = value


def check_override(config: ml_collections.ConfigDict, path: str) -> bool:
  """Whether `--config.<path>` adds a key to one of OPEN_DICTS (True) or sets a field the config
  has (False); a one-line ValueError naming the valid fields (and a close match) otherwise."""
  node, done = config, []
  for key in path.split("."):
    parent = ".".join(done)
    if parent in OPEN_DICTS:
      return key not in node
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or key not in node:
      valid = sorted(node) if isinstance(node, (ml_collections.ConfigDict, dict)) else []
      close = difflib.get_close_matches(key, valid, n=1)
      hint = f" Did you mean {'.'.join(done + close)!r}?" if close else ""
      where = f"config.{parent}" if parent else "the config"
      raise ValueError(
          f"--config.{path}: {where} has no field {key!r}.{hint} Valid fields: "
          f"{', '.join(valid) or '(none: it is a value, not a group)'}."
      )
    node = node[key]
    done.append(key)
  return False


def default_dataset_config(**overrides) -> ml_collections.ConfigDict:
  """configs/default.py's dataset section (synthetic_faces at 112x112 with random flips), with
  `overrides` applied."""
  config = default_config().dataset
  config.update(overrides)
  return config


def _flatten(
    config: Any, prefix: str = "", free_form: tuple[str, ...] = _FREE_FORM
) -> dict[str, Any]:
  flat = {}
  for key, value in config.items():
    path = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict) and path not in free_form:
      flat.update(_flatten(value, path + ".", free_form))
    else:
      flat[path] = value
  return flat


def _check_known_keys(
    config: ml_collections.ConfigDict,
    defaults: ml_collections.ConfigDict,
    where: str,
    free_form: tuple[str, ...] = _FREE_FORM,
) -> None:
  given, known = _flatten(config, free_form=free_form), _flatten(defaults, free_form=free_form)
  for path in sorted(given):
    if path not in known:
      parent = path.rpartition(".")[0]
      siblings = defaults
      for key in parent.split(".") if parent else ():
        siblings = siblings[key]
      raise ValueError(
          f"Unknown config key {where}{path!r}; valid keys under "
          f"{where}{parent or 'the top level'!r} are: {', '.join(sorted(siblings))}."
      )


def training_datasets(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, ...]:
  """config.dataset, then each of config.extra_datasets completed from the default dataset fields
  (they share config.dataset.image_size: the batch is one array)."""
  datasets = [config.dataset]
  for i, entry in enumerate(config.extra_datasets):
    where = f"extra_datasets[{i}] "
    if not isinstance(entry, (dict, ml_collections.ConfigDict)) or "name" not in entry:
      raise ValueError(
          f"config.{where}must be a dict with at least a 'name' (a TFDS builder), "
          f"got {entry!r}."
      )
    entry = ml_collections.ConfigDict(dict(entry))
    defaults = default_config().dataset
    _check_known_keys(entry, defaults, where, free_form=("builder_kwargs",))
    if "image_size" in entry and entry.image_size != config.dataset.image_size:
      raise ValueError(
          f"config.{where}sets image_size={entry.image_size}, but every training "
          f"dataset is read at config.dataset.image_size={config.dataset.image_size};"
          " drop the key."
      )
    defaults.update(entry)
    defaults.image_size = config.dataset.image_size
    datasets.append(defaults)
  names = [d.name for d in datasets]
  if len(set(names)) < len(names):
    raise ValueError(
        f"Training datasets {names} repeat a name; each dataset (and its head) is "
        "named by its TFDS builder, so list each once."
    )
  return tuple(datasets)


def dataset_batch_sizes(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """Images of each training dataset in every global batch: global_batch_size in proportion to
  the weights; a one-line ValueError when that is not whole numbers."""
  datasets = training_datasets(config)
  weights = [float(d.weight) for d in datasets]
  if any(w <= 0 for w in weights):
    raise ValueError(
        f"Dataset weights {weights} must all be > 0 (dataset.weight and "
        "extra_datasets[i]['weight'])."
    )
  shares = [config.global_batch_size * w / sum(weights) for w in weights]
  sizes = tuple(int(round(share)) for share in shares)
  if any(abs(share - size) > 1e-6 for share, size in zip(shares, sizes)):
    raise ValueError(
        f"Dataset weights {weights} split global_batch_size={config.global_batch_size} into "
        f"{[round(x, 2) for x in shares]} images; choose weights or a batch size that give whole "
        "numbers."
    )
  return sizes


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises a one-line ValueError for unknown keys, invalid choices or impossible values."""
  _check_known_keys(config, default_config(), "")
  given = _flatten(config)
  for path, choices in _CHOICES.items():
    if given[path] not in choices:
      raise ValueError(f"config.{path}={given[path]!r} is not one of {', '.join(choices)}.")
  margins.from_config(config.loss)
  if config.optimizer.backbone_lr_scale < 0 or config.optimizer.freeze_backbone_steps < 0:
    raise ValueError(
        "config.optimizer.backbone_lr_scale and freeze_backbone_steps must be >= 0, got "
        f"{config.optimizer.backbone_lr_scale} and {config.optimizer.freeze_backbone_steps}."
    )
  if not 0.0 < config.head.sample_rate <= 1.0:
    raise ValueError(f"config.head.sample_rate={config.head.sample_rate} must be in (0, 1].")
  for path in (
      "global_batch_size",
      "log_every_steps",
      "checkpoint_every_steps",
      "verification.eval_every_steps",
      "verification.batch_size",
      "keep_checkpoints",
      "nonfinite_patience",
  ):
    if given[path] <= 0:
      raise ValueError(f"config.{path}={given[path]} must be a positive integer.")
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise ValueError("Set config.num_train_steps > 0 or config.num_epochs > 0.")
  for dataset in training_datasets(config):
    if not 0.0 <= dataset.augment.crop < 1.0:
      raise ValueError(
          f"{dataset.name}: augment.crop={dataset.augment.crop} must be in [0, 1) "
          "(the smallest crop keeps 1 - crop of each side)."
      )
  dataset_batch_sizes(config)
  # Imported here: it reads TFDS, which the training step itself (train_step) does without.
  from adam_face import verification_sets  # pylint: disable=g-import-not-at-top

  names = [verification_sets.set_name(entry) for entry in config.verification.sets]
  repeated = sorted({name for name in names if names.count(name) > 1})
  if repeated:
    raise ValueError(
        f"config.verification.sets={tuple(config.verification.sets)} names the set(s) "
        f"{repeated} twice (a path's set is named after its file); list each once."
    )


def validate_for_mesh(
    config: ml_collections.ConfigDict, num_devices: int, num_processes: int
) -> None:
  """The global batches must split evenly over the devices and processes of the mesh."""
  sizes = [
      ("config.global_batch_size", config.global_batch_size),
      ("config.verification.batch_size", config.verification.batch_size),
  ]
  if config.extra_datasets:  # Every dataset's share of the batch is sharded over the devices.
    sizes += [
        (f"{d.name}'s share of the batch (its weight)", size)
        for d, size in zip(training_datasets(config), dataset_batch_sizes(config))
    ]
  for path, size in sizes:
    if size % num_devices or size % num_processes:
      step = math.lcm(num_devices, num_processes)
      raise ValueError(
          f"{path}={size} is not divisible by the {num_devices} devices "
          f"({num_processes} processes); use a multiple of {step}, e.g. "
          f"{max(step, size // step * step)}."
      )


def config_changes(old: dict, new: dict) -> list[str]:
  """'field: old -> new' for every field whose value differs between two configs as dicts (for
  instance a checkpoint's saved config and this run's)."""
  old, new = (_flatten(ml_collections.ConfigDict(c), free_form=()) for c in (old, new))
  return [
      f"{path}: {old.get(path, '<unset>')!r} -> {new.get(path, '<unset>')!r}"
      for path in sorted(set(old) | set(new))
      if old.get(path, "<unset>") != new.get(path, "<unset>")
  ]


def flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as flat scalars for TensorBoard's hparams plugin."""
  return {
      k: v if isinstance(v, (int, float, str, bool)) else str(v)
      for k, v in _flatten(config, free_form=("dataset.builder_kwargs",)).items()
  }
