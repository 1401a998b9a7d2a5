"""A trained backbone on disk, in the one form the commands that use a model read.

`evaluate`, `embed`, `verify`, `export` and `config.init_from` take a *model path*, either

  * a model directory, written by `save` (e.g. by `python -m adam_face.convert`):
      model.json         {"model": create_model's arguments (name, embedding_dim, and any
                         architecture settings), "image_size": the input side in pixels,
                         "pixel_scale": the s of the (x - 127.5) / s its variables were made
                         for (absent: 128, adam_face's scale before 2026-12-01),
                         "source": where the weights came from}
      variables.msgpack  the backbone's {"params", "batch_stats"} (flax.serialization);
  * or a training workdir (its config.json and its latest checkpoint's backbone, read alone and
    verified; see checkpointing.py), optionally at a given step.

`load` returns a `Model`: the flax module, its variables and the image size, whose `embed_fn` is
what embedding.compute_embeddings takes. Inputs are normalised images (pixels.normalize of
aligned uint8 RGB faces); outputs are embeddings before L2 normalisation. A model made for
another input scale (a workdir's config.json and model.json record it) is fed its own: `apply`
rescales the normalised images, so models written before the scale changed compute what they
computed then.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp

from adam_face import models, pixels

MODEL_JSON = "model.json"
VARIABLES = "variables.msgpack"
# What of a workdir's train state is the backbone (checkpointing.restore_arrays's names).
BACKBONE_SUBTREES = ("params.backbone", "batch_stats")
# The input scale of model directories and workdirs that do not record one: adam_face divided by
# 128 until 2026-12-01.
LEGACY_PIXEL_SCALE = 128.0


@dataclasses.dataclass(frozen=True)
class Model:
  module: flax.linen.Module
  variables: dict[str, Any]  # {"params": ..., "batch_stats": ...}
  image_size: int
  model_config: dict[str, Any]  # create_model's arguments: {"name": ..., "embedding_dim": ...}
  source: str  # The path it was loaded from, or what it was converted from.
  step: int | None = None  # The checkpoint's step, when loaded from a training workdir.
  train_config: dict[str, Any] | None = None  # That workdir's config.json.
  pixel_scale: float = pixels.PIXEL_SCALE  # The s of the (x - 127.5) / s it was made for.

  @functools.cached_property
  def apply(self) -> Callable[[Any, jax.Array], jax.Array]:
    """(variables, images normalised by pixels.normalize) -> embeddings [N, D], in eval mode; the
    images rescaled first where the model was made for another scale."""
    module, factor = self.module, pixels.PIXEL_SCALE / self.pixel_scale

    def apply(variables, images):
      return module.apply(variables, images * factor if factor != 1 else images, train=False)

    return apply

  @functools.cached_property
  def embed_fn(self) -> jax.tree_util.Partial:
    """`apply` with the variables bound as traced arguments: normalised images [N, S, S, 3] ->
    embeddings [N, D]; one object per Model, so jitting it compiles once."""
    return jax.tree_util.Partial(self.apply, self.variables)


def define_model_flags() -> None:
  """--model and --step, the model path of every command that uses a model. Each command defines
  its flags when it runs (in its __main__ block), so modules that share flag names can be
  imported side by side (tests, notebooks)."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("model", None, "A model directory or a training workdir (model_dir.py).")
  flags.DEFINE_integer("step", None, "Checkpoint step of a workdir; default: the latest.")
  flags.mark_flag_as_required("model")


def create_module(model_config: dict[str, Any], dtype=jnp.float32) -> flax.linen.Module:
  """The backbone that model_config (create_model's arguments, as saved in model.json) names."""
  config = dict(model_config)
  return models.create_model(config.pop("name"), dtype=dtype, **config)


def save(
    directory: str,
    *,
    model_config: dict[str, Any],
    image_size: int,
    variables: dict[str, Any],
    source: str,
) -> None:
  """Writes a model directory; checks first that `variables` fit the model `model_config`
  builds (so a converter's mistake is found when converting, not when loading)."""
  check_same_tree(
      _variable_shapes(create_module(model_config), image_size),
      variables,
      f"variables for {model_config}",
  )
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, VARIABLES), "wb") as f:
    f.write(flax.serialization.msgpack_serialize(jax.device_get(variables)))
  with open(os.path.join(directory, MODEL_JSON), "w") as f:
    json.dump(
        {
            "model": model_config,
            "image_size": image_size,
            "pixel_scale": pixels.PIXEL_SCALE,
            "source": source,
        },
        f,
        indent=2,
    )


def _variable_shapes(module: flax.linen.Module, image_size: int):
  image = jnp.zeros((1, image_size, image_size, 3))
  return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), image, train=False))


def check_same_tree(expected, actual, what: str) -> None:
  """Raises a one-line ValueError unless `actual` has exactly the leaves and shapes of
  `expected`."""
  want = {
      jax.tree_util.keystr(p): tuple(x.shape)
      for p, x in jax.tree_util.tree_leaves_with_path(expected)
  }
  have = {
      jax.tree_util.keystr(p): tuple(x.shape)
      for p, x in jax.tree_util.tree_leaves_with_path(actual)
  }
  problems = [f"{k} missing" for k in want if k not in have]
  problems += [f"{k} unexpected" for k in have if k not in want]
  problems += [
      f"{k} is {have[k]}, expected {want[k]}" for k in want if k in have and have[k] != want[k]
  ]
  if problems:
    raise ValueError(
        f"{what}: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
    )


def load(path: str, step: int | None = None) -> Model:
  """The model at `path`: a model directory, or a training workdir (at `step`, default latest)."""
  if os.path.exists(os.path.join(path, MODEL_JSON)):
    if step is not None:
      raise ValueError(f"{path} is a model directory, which has no steps; drop the step.")
    with open(os.path.join(path, MODEL_JSON)) as f:
      info = json.load(f)
    module = create_module(info["model"])
    with open(os.path.join(path, VARIABLES), "rb") as f:
      variables = flax.serialization.msgpack_restore(f.read())
    check_same_tree(
        _variable_shapes(module, info["image_size"]), variables, os.path.join(path, VARIABLES)
    )
    return Model(
        module,
        variables,
        info["image_size"],
        info["model"],
        info["source"],
        pixel_scale=info.get("pixel_scale", LEGACY_PIXEL_SCALE),
    )
  if os.path.exists(os.path.join(path, "config.json")):
    from adam_face import checkpointing  # pylint: disable=g-import-not-at-top

    with open(os.path.join(path, "config.json")) as f:
      config = json.load(f)
    model_config = {
        "name": config["model"]["name"],
        "embedding_dim": config["model"]["embedding_dim"],
    }
    # The backbone alone: a large run's class centres and optimiser state stay on disk.
    step, state = checkpointing.restore_arrays(path, step, subtrees=BACKBONE_SUBTREES)
    variables = {"params": state["params"]["backbone"], "batch_stats": state["batch_stats"]}
    return Model(
        create_module(model_config),
        variables,
        config["dataset"]["image_size"],
        model_config,
        f"{os.path.abspath(path)} step {step}",
        step,
        config,
        pixel_scale=config.get("pixel_scale", LEGACY_PIXEL_SCALE),
    )
  raise FileNotFoundError(
      f"{path} is neither a model directory (no {MODEL_JSON}; write one with "
      "python -m adam_face.convert) nor a training workdir (no config.json; written by "
      "python -m adam_face.main)."
  )
