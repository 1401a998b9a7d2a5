"""Converts published face-recognition weights into a model directory (model_dir.py).

  python -m adam_face.convert --from arcface_torch --arch r50 --weights backbone.pth --out DIR

--from arcface_torch reads a state dict of a backbone of insightface's arcface_torch, as its
training saves it (model.pt), or a dict holding one (its checkpoint_gpu_*.pt, {'state_dict': ...});
(Distributed)DataParallel's 'module.' prefixes are dropped. --arch names the network the weights
are of: r18, r34, r50, r100, r200 (iResNet, converted to iresnet18 ... iresnet200) or mbf (its
MobileFaceNet, to mobilefacenet_mbf). The embedding size is read off the weights; arcface_torch's
fp16 flag (autocast) and dropout change no weight. Reading PyTorch files needs torch, a benchmark
extra (benchmarks/requirements.txt), imported only here.

The converted model computes the source network's eval-mode function on adam_face's inputs, up to
float rounding, through three exact rewrites:
  * arcface_torch normalises pixels as (x - 127.5) / 127.5, adam_face as (x - 127.5) / 128
    (train_input.normalize): the first convolution, linear, bias-free and zero-padded, is scaled by
    128 / 127.5, so that it sees what the source's saw.
  * PyTorch flattens the iResNet's last feature map channel-first (NCHW) before `fc`, flax
    channel-last (NHWC): the fc weight's input rows are permuted to match.
  * The final BatchNorm has a scale gamma in the source (frozen at 1 in the iResNet, learned in mbf)
    and none in adam_face. gamma * (y - mean) / sqrt(var + eps) equals
    (gamma * y - gamma * mean) / sqrt(var + eps), so gamma multiplies the outputs (weights and
    bias) of the dense layer before it and the running mean; the variance is unchanged. The
    converted model's final BN then trains on gamma * y, which matters only for fine-tuning.
"""

from __future__ import annotations

import argparse
import functools
import os
from typing import Any

import jax
import numpy as np

from adam_face import errors, model_dir, models

# adam_face's model of each network of arcface_torch, by its name there (backbones.get_model).
ARCFACE_TORCH_ARCHS = {
    "r18": "iresnet18",
    "r34": "iresnet34",
    "r50": "iresnet50",
    "r100": "iresnet100",
    "r200": "iresnet200",
    "mbf": "mobilefacenet_mbf",
}
IMAGE_SIZE = 112  # The only size arcface_torch's iResNet takes (its fc expects a 7x7 map).
# Pixel scales: arcface_torch's (x / 255 - 0.5) / 0.5, and train_input.PIXEL_SCALE (not imported
# from there: train_input imports TensorFlow).
ARCFACE_TORCH_PIXEL_SCALE = 127.5
ADAM_FACE_PIXEL_SCALE = 128.0
# Where wrapping dicts keep a backbone's state dict: arcface_torch's checkpoint_gpu_*.pt, then
# common trainer layouts.
_WRAPPER_KEYS = ("state_dict_backbone", "state_dict", "model", "backbone")
_BATCH_NORM_COUNTER = "num_batches_tracked"  # Kept by PyTorch's BatchNorm, unused in eval mode.


class ConversionError(errors.RunError):
  """Weights that cannot be converted as asked; the message says why and what to do."""


# How a source tensor becomes a flax variable: (its flax value from its value, or None where it is
# folded rather than stored; the source's shape from the flax variable's).
_KEEP = (lambda value: value, lambda shape: shape)
_CONV = (lambda w: w.transpose(2, 3, 1, 0), lambda s: (s[3], s[2], s[0], s[1]))  # OIHW <-> HWIO
_DENSE = (lambda w: w.T, lambda shape: shape[::-1])  # [out, in] <-> [in, out]
_FOLDED = (None, lambda shape: shape)


def _nchw_dense(channels: int):
  """The transform of a Linear after a channel-first flatten (input index c * H * W + s, s the
  spatial position) into a Dense after a channel-last one (input index s * C + c)."""

  def to_flax(weight):
    out_features, in_features = weight.shape
    weight = weight.reshape(out_features, channels, in_features // channels)  # [out, c, s]
    return weight.transpose(2, 1, 0).reshape(in_features, out_features)

  return (to_flax, lambda shape: shape[::-1])


# Layer kinds: each tensor of the source layer -> (flax collection, variable, transform).
CONV = {"weight": ("params", "kernel", _CONV)}
BN = {
    "weight": ("params", "scale", _KEEP),
    "bias": ("params", "bias", _KEEP),
    "running_mean": ("batch_stats", "mean", _KEEP),
    "running_var": ("batch_stats", "var", _KEEP),
}
# The final BN: adam_face's has no scale, so gamma (shaped as the bias) is folded (see _fold).
FINAL_BN = {**BN, "weight": ("params", "bias", _FOLDED)}
PRELU = {"weight": ("params", "slope", _KEEP)}
DENSE = {"weight": ("params", "kernel", _DENSE)}


def _iresnet_layout(module) -> list[tuple[str, str, dict]]:
  """(source layer, flax module path, kind) of each layer of arcface_torch's IResNet, in forward
  order: the first convolution first; the dense projection and the final BN last."""
  layout = [("conv1", "stem_conv", CONV), ("bn1", "stem_bn", BN), ("prelu", "stem_prelu", PRELU)]
  unit = [("bn1", BN), ("conv1", CONV), ("bn2", BN), ("prelu", PRELU), ("conv2", CONV), ("bn3", BN)]
  for stage, depth in enumerate(module.stage_depths, start=1):
    for index in range(depth):
      source, target = f"layer{stage}.{index}", f"stage{stage}_unit{index + 1}"
      layout += [(f"{source}.{name}", f"{target}/{name}", kind) for name, kind in unit]
      if index == 0:  # A stage's first unit is strided; its shortcut is conv1x1 + BN.
        layout += [
            (f"{source}.downsample.0", f"{target}/shortcut_conv", CONV),
            (f"{source}.downsample.1", f"{target}/shortcut_bn", BN),
        ]
  fc = {
      "weight": ("params", "kernel", _nchw_dense(module.stage_widths[-1])),
      "bias": ("params", "bias", _KEEP),
  }
  return layout + [
      ("bn2", "head/bn", BN),
      ("fc", "head/fc", fc),
      ("features", "head/features_bn", FINAL_BN),
  ]


def _mbf_layout(module) -> list[tuple[str, str, dict]]:
  """The same for arcface_torch's MobileFaceNet. Its `layers` list holds the stem's two ConvBlocks
  (conv, BN, PReLU; `.layers.<0-2>`), then for each group of bottleneck units a strided DepthWise
  unit where the group's stride is 2, and a Residual of its stride-1 units (`.layers.<k>`); a unit
  holds an expanding and a depthwise ConvBlock and a projecting LinearBlock (conv, BN). Then
  conv_sep (a ConvBlock) and `features`, the GDC: a depthwise LinearBlock, Flatten, a Linear
  without bias and a BatchNorm1d."""

  def block(source, target, activation=True):
    layers = [
        (f"{source}.layers.0", f"{target}_conv", CONV),
        (f"{source}.layers.1", f"{target}_bn", BN),
    ]
    return layers + [(f"{source}.layers.2", f"{target}_prelu", PRELU)] if activation else layers

  layout = block("layers.0", "stem") + block("layers.1", "stem_grouped")
  position, units = 2, []
  for _, _, repeats, strides in module.bottlenecks:
    if strides != 1:
      units.append(f"layers.{position}")
      position, repeats = position + 1, repeats - 1
    if repeats:
      units += [f"layers.{position}.layers.{k}" for k in range(repeats)]
      position += 1
  for index, source in enumerate(units, start=1):
    layout += block(f"{source}.layers.0", f"bottleneck{index}/expand")
    layout += block(f"{source}.layers.1", f"bottleneck{index}/depthwise")
    layout += block(f"{source}.layers.2", f"bottleneck{index}/project", activation=False)
  return (
      layout
      + block("conv_sep", "expand")
      + [
          ("features.layers.0.layers.0", "gdconv", CONV),
          ("features.layers.0.layers.1", "gdconv_bn", BN),
          ("features.layers.2", "embedding", DENSE),
          ("features.layers.3", "embedding_bn", FINAL_BN),
      ]
  )


def _import_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConversionError(
        "Reading PyTorch weights needs torch, which is not installed: "
        ".venv/bin/pip install -r benchmarks/requirements.txt"
    ) from None
  return torch


def _first_line(error: Exception) -> str:
  return (str(error).strip().splitlines() or [type(error).__name__])[0]


def load_state_dict(path: str) -> dict[str, Any]:
  """The backbone state dict in the PyTorch file `path`, unwrapped from a checkpoint dict and
  DataParallel's 'module.' prefixes; its float tensors as float32 numpy arrays."""
  torch = _import_torch()
  if not os.path.isfile(path):
    raise ConversionError(f"--weights {path} is not a file; give the backbone's .pth or .pt file.")
  try:
    # weights_only: unpickles tensors and plain containers, never code from the file.
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ConversionError(
        f"torch.load could not read {path} as weights ({_first_line(e)}); save the backbone "
        "alone with torch.save(backbone.state_dict(), path)."
    ) from None
  while isinstance(state, dict) and not all(torch.is_tensor(v) for v in state.values()):
    wrapper = next((k for k in _WRAPPER_KEYS if isinstance(state.get(k), dict)), None)
    if wrapper is None:
      raise ConversionError(
          f"{path} holds no state dict (its keys: {', '.join(map(str, state))[:200]}); save the "
          "backbone alone with torch.save(backbone.state_dict(), path)."
      )
    state = state[wrapper]
  if not isinstance(state, dict) or not state:
    raise ConversionError(
        f"{path} holds {type(state).__name__} {str(state)[:50]!r}, not a state dict; save the "
        "backbone with torch.save(backbone.state_dict(), path)."
    )
  while all(k.startswith("module.") for k in state):
    state = {k[len("module.") :]: v for k, v in state.items()}
  return {
      k: v if k.endswith(_BATCH_NORM_COUNTER) else v.detach().to(torch.float32).numpy()
      for k, v in state.items()
  }


def _nested_get(tree, path: str):
  for part in path.split("/"):
    tree = tree[part]
  return tree


def _nested_set(tree, path: str, value) -> None:
  *parents, leaf = path.split("/")
  for part in parents:
    tree = tree.setdefault(part, {})
  tree[leaf] = value


def _check_keys(state, layout, what: str) -> None:
  """A one-line error naming the first missing or unexpected tensor, unless the state dict's keys
  are the layout's (BatchNorm's counters may be there or not)."""
  expected = [f"{source}.{name}" for source, _, kind in layout for name in kind]
  counters = {f"{s}.{_BATCH_NORM_COUNTER}" for s, _, kind in layout if "running_var" in kind}
  allowed = set(expected) | counters
  problems = [f"{k!r} is missing" for k in expected if k not in state]
  problems += [f"{k!r} is unexpected" for k in state if k not in allowed]
  if problems:
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    raise ConversionError(f"{what}: tensor {problems[0]}{more}; check --arch.")


def _convert(state, layout, expected, what: str) -> dict[str, Any]:
  """The flax variables of `layout` from `state`, checked against the `expected` shapes."""
  variables = {"params": {}, "batch_stats": {}}
  for source, target, kind in layout:
    for name, (collection, variable, (to_flax, source_shape)) in kind.items():
      key, path = f"{source}.{name}", f"{target}/{variable}"
      want = source_shape(tuple(_nested_get(expected[collection], path).shape))
      if state[key].shape != want:
        raise ConversionError(
            f"{what}: tensor {key!r} has shape {state[key].shape}, expected {want}; check --arch."
        )
      if to_flax is not None:
        _nested_set(variables[collection], path, to_flax(state[key]))
  return variables


def _fold(variables, state, layout) -> None:
  """The input scale into the first convolution, the final BN's scale into the dense layer before
  it and the BN's running mean (module docstring); in float64, rounded once."""
  first, (_, dense, _), (final_source, final, _) = layout[0][1], *layout[-2:]
  params, stats = variables["params"], variables["batch_stats"]
  scale = ADAM_FACE_PIXEL_SCALE / ARCFACE_TORCH_PIXEL_SCALE
  params[first]["kernel"] = (params[first]["kernel"] * np.float64(scale)).astype(np.float32)
  gamma = state[f"{final_source}.weight"].astype(np.float64)
  dense_params = _nested_get(params, dense)
  for name in dense_params:  # The kernel [in, out] and any bias [out]: gamma scales each output.
    dense_params[name] = (dense_params[name] * gamma).astype(np.float32)
  final_stats = _nested_get(stats, final)
  final_stats["mean"] = (final_stats["mean"] * gamma).astype(np.float32)


def convert_arcface_torch(weights: str, arch: str, out: str) -> dict[str, Any]:
  """Writes the model directory `out` from arcface_torch weights of network `arch` (one of
  ARCFACE_TORCH_ARCHS); returns its model config (create_model's arguments)."""
  if arch not in ARCFACE_TORCH_ARCHS:
    raise ConversionError(
        f"Unknown arcface_torch arch {arch!r}; valid: {', '.join(ARCFACE_TORCH_ARCHS)}."
    )
  if os.path.exists(os.path.join(out, model_dir.MODEL_JSON)):
    raise ConversionError(f"{out} already holds a model; give another --out or delete it.")
  state = load_state_dict(weights)
  name = ARCFACE_TORCH_ARCHS[arch]
  layout = (_mbf_layout if arch == "mbf" else _iresnet_layout)(models.create_model(name))
  what = f"{weights} does not hold arcface_torch {arch} weights"
  _check_keys(state, layout, what)
  model_config = {"name": name, "embedding_dim": int(state[f"{layout[-1][0]}.bias"].shape[0])}
  module = model_dir.create_module(model_config)
  image = jax.ShapeDtypeStruct((1, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
  expected = jax.eval_shape(functools.partial(module.init, train=False), jax.random.key(0), image)
  variables = _convert(state, layout, expected, what)
  _fold(variables, state, layout)
  model_dir.save(
      out,
      model_config=model_config,
      image_size=IMAGE_SIZE,
      variables=variables,
      source=f"arcface_torch {arch} {os.path.abspath(weights)}",
  )
  return model_config


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m adam_face.convert",
      description="Converts published weights into an adam_face model directory (model_dir.py).",
  )
  parser.add_argument(
      "--from", dest="source", required=True, choices=["arcface_torch"], help="the weights' format"
  )
  parser.add_argument(
      "--arch", required=True, choices=list(ARCFACE_TORCH_ARCHS), help="the network they are of"
  )
  parser.add_argument("--weights", required=True, help="the PyTorch state dict file (.pth, .pt)")
  parser.add_argument("--out", required=True, help="the model directory to write")
  args = parser.parse_args(argv)
  try:
    model_config = convert_arcface_torch(args.weights, args.arch, args.out)
  except ConversionError as e:
    parser.exit(1, f"{parser.prog}: error: {e}\n")
  print(
      f"Wrote {args.out}: {model_config['name']}, {model_config['embedding_dim']}-d embeddings of "
      "images normalised by train_input.normalize."
  )


if __name__ == "__main__":
  main()
