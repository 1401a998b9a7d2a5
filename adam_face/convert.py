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
  * adam_face normalises pixels as arcface_torch does, (x - 127.5) / 127.5 (pixels.normalize); a
    source that read (x - 127.5) / s (an ONNX graph that normalises its input so, below) has its
    first convolution, linear, bias-free and zero-padded, scaled by 127.5 / s, so that it sees
    what the source's saw.
  * PyTorch flattens the iResNet's last feature map channel-first (NCHW) before `fc`, flax
    channel-last (NHWC): the fc weight's input rows are permuted to match.
  * The final BatchNorm has a scale gamma in the source (frozen at 1 in the iResNet, learned in mbf)
    and none in adam_face. gamma * (y - mean) / sqrt(var + eps) equals
    (gamma * y - gamma * mean) / sqrt(var + eps), so gamma multiplies the outputs (weights and
    bias) of the dense layer before it and the running mean; the variance is unchanged. The
    converted model's final BN then trains on gamma * y, which matters only for fine-tuning.

  python -m adam_face.convert --from onnx --weights w600k_r50.onnx --out DIR

--from onnx reads an ONNX graph of arcface_torch's iResNet (r18 ... r200; e.g. w600k_r50.onnx of
insightface's buffalo_l pack, exported by arcface_torch's torch2onnx.py) back into the state dict
it was exported from, and converts that as above. --arch is optional: the network is read off the
graph's units per stage, and a --arch that disagrees is an error. Reading ONNX files needs onnx
(requirements-export.txt), imported only here. The nodes are walked along the data path from the
input, in topological order, and matched to the iResNet's structure; initializer names are never
read (exporters name them 'layer1.0.conv1.weight', 'onnx::Conv_123' or '1197'). The structure:
  * the stem: Conv 3x3 stride 1, BN, PRelu. A residual unit: BN, Conv 3x3, BN, PRelu, Conv 3x3
    (stride 2 in a stage's first unit, else 1), BN, and an Add of that and the unit's input or,
    in a strided unit, of Conv 1x1 stride 2 and BN on it. The head: BN, Flatten (axis 1) or a
    Reshape to [N, -1], Gemm (transB 0 or 1, alpha and beta 1) or MatMul and an optional Add of
    a constant bias, BN. Convolutions have PyTorch's padding (kernel // 2), no dilation or groups.
    PRelu slopes may be shaped [C], [C, 1, 1], [1, C, 1, 1] or be one for all channels.
  * Identity and Dropout (in inference: the identity) are passed over. Constant nodes, and
    Identity, Unsqueeze, Squeeze and Reshape of constants, are evaluated (torch.onnx unsqueezes
    PRelu slopes so when it does not fold constants).
  * Any BN may be absent: torch.onnx, in eval mode with do_constant_folding (its default, as
    torch2onnx.py exports), folds every BN that follows a Conv into that Conv's weight and bias,
    leaving the BNs after a PRelu, an Add or the fc. An absent BN is replaced by one that is the
    identity in eval mode (scale 1, bias 0, mean 0, variance 1 - eps: var + eps is 1, exactly in
    float32), and the bias b of a Conv goes into the running mean of the BN after it:
    BN(W x + b) with mean m is BN(W x) with mean m - b. Exact in eval mode; the folded BN's scale
    and statistics are not recoverable, so in train mode (fine-tuning) such a layer normalises by
    batch statistics with scale 1 and bias 0, unlike the source network.
  * A BN epsilon other than adam_face's 1e-5 goes into the variance (var + eps - 1e-5).
  * The input normalisation: constant Sub, Add, Mul and Div nodes before the first Conv (per
    channel or not) must compute (x - 127.5) / s, the s of the first rewrite above;
    another offset could not go exactly into the zero-padded first convolution. Without them (as
    in insightface's arcface_torch graphs) the graph reads (x - 127.5) / 127.5, which is what
    insightface's ArcFaceONNX feeds it.
Anything else on or off that path, a node missing from it, other convolution settings or an input
other than [N, 3, 112, 112] is a one-line error naming the node (op type and name) and saying the
graph is not an arcface_torch iResNet: MobileFaceNet (mbf) and other networks, Cast nodes (as in
float16 graphs), channel-last inputs, and flattening by a computed shape (Shape, Gather, Concat).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
from typing import Any

import jax
import numpy as np

from adam_face import errors, model_dir, models, pixels

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
# arcface_torch's pixel scale, (x / 255 - 0.5) / 0.5; equal to adam_face's pixels.PIXEL_SCALE.
ARCFACE_TORCH_PIXEL_SCALE = 127.5
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


def _import_optional(name: str, purpose: str, requirements: str):
  """The optional package `name`, or a ConversionError naming the requirements file to install."""
  try:
    return importlib.import_module(name)
  except ImportError:
    raise ConversionError(
        f"{purpose} needs {name}, which is not installed: .venv/bin/pip install -r {requirements}"
    ) from None


def _import_torch():
  return _import_optional("torch", "Reading PyTorch weights", "benchmarks/requirements.txt")


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


def _fold(variables, state, layout, pixel_scale) -> None:
  """The input scale into the first convolution, the final BN's scale into the dense layer before
  it and the BN's running mean (module docstring); in float64, rounded once. The source network
  reads (x - 127.5) / pixel_scale: a number, or one per input channel (RGB)."""
  first, (_, dense, _), (final_source, final, _) = layout[0][1], *layout[-2:]
  params, stats = variables["params"], variables["batch_stats"]
  # The kernel is [h, w, in, out]: a per-channel scale [3] multiplies its input rows.
  scale = np.reshape(pixels.PIXEL_SCALE / np.asarray(pixel_scale, np.float64), (-1, 1))
  params[first]["kernel"] = (params[first]["kernel"] * scale).astype(np.float32)
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
  _check_out(out)
  state = load_state_dict(weights)
  return _write(
      state,
      arch,
      out,
      what=f"{weights} does not hold arcface_torch {arch} weights",
      source=f"arcface_torch {arch} {os.path.abspath(weights)}",
      pixel_scale=ARCFACE_TORCH_PIXEL_SCALE,
  )


def _check_out(out: str) -> None:
  if os.path.exists(os.path.join(out, model_dir.MODEL_JSON)):
    raise ConversionError(f"{out} already holds a model; give another --out or delete it.")


def _write(state, arch: str, out: str, *, what: str, source: str, pixel_scale) -> dict[str, Any]:
  """Writes the model directory `out` from `state`, an arcface_torch state dict of network `arch`
  that reads (x - 127.5) / pixel_scale; returns its model config. `what` begins error messages."""
  name = ARCFACE_TORCH_ARCHS[arch]
  layout = (_mbf_layout if arch == "mbf" else _iresnet_layout)(models.create_model(name))
  _check_keys(state, layout, what)
  model_config = {"name": name, "embedding_dim": int(state[f"{layout[-1][0]}.bias"].shape[0])}
  module = model_dir.create_module(model_config)
  image = jax.ShapeDtypeStruct((1, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
  expected = jax.eval_shape(functools.partial(module.init, train=False), jax.random.key(0), image)
  variables = _convert(state, layout, expected, what)
  _fold(variables, state, layout, pixel_scale)
  model_dir.save(
      out, model_config=model_config, image_size=IMAGE_SIZE, variables=variables, source=source
  )
  return model_config


# --from onnx: arcface_torch's iResNet as an ONNX graph, read back into the state dict it came from.
ONNX_ARCHS = tuple(a for a, name in ARCFACE_TORCH_ARCHS.items() if name.startswith("iresnet"))
_PASS_THROUGH = ("Identity", "Dropout")  # The identity in inference.
_FOLDED_OPS = ("Constant", "Identity", "Unsqueeze", "Squeeze", "Reshape")  # Evaluated on constants.
_NORMALISATION_OPS = ("Sub", "Add", "Mul", "Div")
_CONSTANT_ATTRIBUTES = ("value", "value_float", "value_floats", "value_int", "value_ints")


def _describe(node) -> str:
  return f"{node.op_type} node {node.name or node.output[0]!r}"


def _topological_order(graph, path: str) -> list[Any]:
  """graph.node, each node after the nodes whose outputs it reads (ONNX requires that order of
  graph.node; this does not rely on it)."""
  ready = {""} | {t.name for t in graph.initializer} | {t.name for t in graph.input}
  order, pending = [], list(graph.node)
  while pending:
    waiting = []
    for node in pending:
      if all(name in ready for name in node.input):
        order.append(node)
        ready.update(node.output)
      else:
        waiting.append(node)
    if len(waiting) == len(pending):
      missing = next(name for name in waiting[0].input if name not in ready)
      raise ConversionError(
          f"{path}: {_describe(waiting[0])} reads {missing!r}, which no node computes; the graph "
          "is incomplete or cyclic."
      )
    pending = waiting
  return order


def _identity_bn(channels: int) -> dict[str, np.ndarray]:
  """The tensors of a BatchNorm that is the identity in eval mode: scale 1, bias 0, mean 0, and
  variance 1 - eps, so that var + eps is 1 (exactly, in float32)."""
  epsilon = np.float32(models.normalization.BN_EPSILON)
  return {
      "weight": np.ones(channels, np.float32),
      "bias": np.zeros(channels, np.float32),
      "running_mean": np.zeros(channels, np.float32),
      "running_var": np.full(channels, np.float32(1) - epsilon),
  }


class _OnnxIResNet:
  """Reads an ONNX graph of arcface_torch's IResNet back into the state dict it was exported from
  (`state`, with `depths` its stage depths and `pixel_scale` its input's; module docstring: the
  rules). The data path is walked from the input in topological order, each node matched to the
  network's structure; initializer names are never read."""

  def __init__(self, path: str):
    onnx = _import_optional("onnx", "Reading ONNX models", "requirements-export.txt")
    if not os.path.isfile(path):
      raise ConversionError(f"--weights {path} is not a file; give the .onnx model file.")
    try:
      graph = onnx.load(path).graph
    except Exception as e:  # pylint: disable=broad-except
      raise ConversionError(
          f"onnx could not read {path} ({_first_line(e)}); give an .onnx model file."
      ) from None
    self.path = path
    self._onnx = onnx
    self.constants = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    self.aliases = {}  # The output of a pass-through node -> its input.
    self.producers, self.readers, self.data_nodes, self.visited = {}, {}, [], set()
    for node in _topological_order(graph, path):
      if self._fold_constant(node):
        continue
      inputs = [self.aliases.get(name, name) for name in node.input]
      training = len(inputs) > 2 and inputs[2] and self.constants.get(inputs[2], True)
      data = inputs and inputs[0] not in self.constants
      if node.op_type in _PASS_THROUGH and data and not training:
        self.aliases[node.output[0]] = inputs[0]
        continue
      self.data_nodes.append(node)
      self.producers.update((name, node) for name in node.output)
      for name in dict.fromkeys(inputs):
        if name and name not in self.constants:
          self.readers.setdefault(name, []).append(node)
    images = [t for t in graph.input if t.name not in self.constants]
    if len(images) != 1 or len(graph.output) != 1:
      raise ConversionError(
          f"{path} is not an arcface_torch iResNet graph: it has {len(images)} inputs and "
          f"{len(graph.output)} outputs where one of each (images, embeddings) was expected."
      )
    dims = [
        d.dim_value if d.HasField("dim_value") else None
        for d in images[0].type.tensor_type.shape.dim
    ]
    want = (3, IMAGE_SIZE, IMAGE_SIZE)
    if dims and (len(dims) != 4 or any(d not in (None, w) for d, w in zip(dims[1:], want))):
      raise ConversionError(
          f"{path} is not an arcface_torch iResNet graph: its input has shape {dims} where "
          f"[N, 3, {IMAGE_SIZE}, {IMAGE_SIZE}] was expected."
      )
    self.output = self.aliases.get(graph.output[0].name, graph.output[0].name)
    self.state = {}
    tensor, self.pixel_scale = self._normalisation(images[0].name)
    self.depths = self._read(tensor)

  def _attributes(self, node) -> dict[str, Any]:
    values = {a.name: self._onnx.helper.get_attribute_value(a) for a in node.attribute}
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in values.items()}

  def _fold_constant(self, node) -> bool:
    """Evaluates `node` into self.constants where it is one of _FOLDED_OPS on constants."""
    if node.op_type not in _FOLDED_OPS or not all(n in self.constants for n in node.input if n):
      return False
    attributes = self._attributes(node)
    values = [self.constants[name] for name in node.input if name]
    try:
      if node.op_type == "Constant":
        (kind, value), *others = attributes.items()
        if others or kind not in _CONSTANT_ATTRIBUTES:
          return False  # Left for the walk to name.
        value = self._onnx.numpy_helper.to_array(value) if kind == "value" else np.asarray(value)
      elif node.op_type == "Identity":
        value = values[0]
      elif node.op_type == "Reshape":
        zero_copies = not attributes.get("allowzero", 0)  # 0 copies the input's size, by default.
        shape = [d or (values[0].shape[i] if zero_copies else 0) for i, d in enumerate(values[1])]
        value = values[0].reshape(shape)
      else:  # Unsqueeze or Squeeze: axes as an attribute (opset < 13) or the second input.
        axes = [int(a) for a in attributes.get("axes", values[1] if len(values) > 1 else [])]
        value = values[0]
        if node.op_type == "Squeeze":
          value = np.squeeze(value, axis=tuple(axes) if axes else None)
        else:
          value = np.expand_dims(value, tuple(a % (value.ndim + len(axes)) for a in axes))
    except (ValueError, IndexError, TypeError) as e:
      raise self._error(node, f"cannot be evaluated on its constants ({_first_line(e)})") from None
    self.constants[node.output[0]] = np.asarray(value)
    return True

  def _error(self, node, problem: str) -> ConversionError:
    return ConversionError(
        f"{self.path} is not an arcface_torch iResNet graph: {_describe(node)} {problem}."
    )

  def _next(self, tensor: str):
    """The one node that reads `tensor`, or None."""
    readers = self.readers.get(tensor, [])
    return readers[0] if len(readers) == 1 else None

  def _reader(self, tensor: str, expected: str):
    """The one node that reads `tensor`, where the walk expects `expected`."""
    readers = self.readers.get(tensor, [])
    if len(readers) == 1:
      return readers[0]
    where = _describe(self.producers[tensor]) if tensor in self.producers else "the input"
    found = f"feeds {len(readers)} nodes ({', '.join(map(_describe, readers))})" if readers else ""
    raise ConversionError(
        f"{self.path} is not an arcface_torch iResNet graph: {where} "
        f"{found or 'ends the data path'} where {expected} was expected."
    )

  def _take(self, node, op_types: tuple[str, ...], expected: str):
    if node.op_type not in op_types:
      raise self._error(node, f"is where {expected} was expected")
    self.visited.add(id(node))
    return node

  def _constant(self, node, index: int, what: str) -> np.ndarray:
    name = self.aliases.get(node.input[index], node.input[index]) if index < len(node.input) else ""
    if name not in self.constants:
      raise self._error(
          node, f"has a computed {what} (input {index}) where a constant was expected"
      )
    return self.constants[name]

  def _per_channel(self, node, value: np.ndarray, channels: int, what: str) -> np.ndarray:
    """`value`, an operand broadcast against NCHW data, as one value per channel [channels]. A
    1-D value is per channel (PRelu's slope before opset 7 broadcast so; from opset 7 on it would
    broadcast along the width, which no valid iResNet graph can ask for: no width is a channel
    count)."""
    shape = (1, *value.shape, 1, 1) if value.ndim == 1 else (1,) * (4 - value.ndim) + value.shape
    if value.ndim > 4 or shape[1] not in (1, channels) or np.prod(shape) != shape[1]:
      raise self._error(
          node, f"has a {what} of shape {list(value.shape)} where one per channel was expected"
      )
    return np.broadcast_to(value.reshape(-1), (channels,)).astype(np.float64)

  def _normalisation(self, tensor: str) -> tuple[str, Any]:
    """The tensor after the input normalisation, constant Sub, Add, Mul and Div nodes (insightface's
    arcface_torch graphs have none: ArcFaceONNX then feeds (x - 127.5) / 127.5), and the scale s
    of that normalisation, (x - 127.5) / s."""
    scale, offset, node = np.ones(3), np.zeros(3), None  # The graph computes x * scale + offset.
    while (following := self._next(tensor)) is not None and following.op_type in _NORMALISATION_OPS:
      node = self._take(following, _NORMALISATION_OPS, "")
      data = [self.aliases.get(name, name) for name in node.input].index(tensor)
      if data != 0 and node.op_type in ("Sub", "Div"):
        raise self._error(
            node, "takes the images from a constant where (x - mean) * scale was expected"
        )
      operand = self._per_channel(node, self._constant(node, 1 - data, "operand"), 3, "operand")
      if node.op_type in ("Sub", "Add"):
        offset = offset + operand * (1 if node.op_type == "Add" else -1)
      else:
        factor = operand if node.op_type == "Mul" else 1 / operand
        scale, offset = scale * factor, offset * factor
      tensor = node.output[0]
    if node is None:
      return tensor, ARCFACE_TORCH_PIXEL_SCALE
    with np.errstate(divide="ignore", invalid="ignore"):
      mean = -offset / scale
    if not np.allclose(mean, ARCFACE_TORCH_PIXEL_SCALE, rtol=1e-6, atol=0):
      raise self._error(
          node,
          f"ends an input normalisation (x - {mean.tolist()}) * {scale.tolist()} where x - 127.5 "
          "was expected (adam_face's zero-padded first convolution cannot absorb another offset)",
      )
    return tensor, 1 / scale

  def _conv(self, node, kernel: int, strides: tuple[int, ...], expected: str):
    """The Conv `node`: (its output, weight, bias or None, stride), checked to be a kernel x kernel
    convolution with one of `strides` and PyTorch's padding kernel // 2."""
    self._take(node, ("Conv",), expected)
    weight = self._constant(node, 1, "weight").astype(np.float32)
    has_bias = len(node.input) > 2 and node.input[2]
    bias = self._constant(node, 2, "bias").astype(np.float64) if has_bias else None
    attributes = self._attributes(node)
    stride = list(attributes.get("strides", [1, 1]))
    found = {
        "kernel_shape": list(attributes.get("kernel_shape", weight.shape[2:])),
        "pads": list(attributes.get("pads", [0] * 4)),
        "dilations": list(attributes.get("dilations", [1, 1])),
        "group": attributes.get("group", 1),
        "auto_pad": attributes.get("auto_pad", "NOTSET"),
    }
    want = {
        "kernel_shape": [kernel] * 2,
        "pads": [kernel // 2] * 4,
        "dilations": [1, 1],
        "group": 1,
        "auto_pad": "NOTSET",
    }
    if weight.ndim != 4 or found != want or stride not in ([s, s] for s in strides):
      settings = ", ".join(f"{k} {v}" for k, v in {**found, "strides": stride}.items())
      raise self._error(
          node,
          f"has {settings} where {expected} (kernel {kernel}x{kernel}, stride "
          f"{' or '.join(map(str, strides))}, padding {kernel // 2}) was expected",
      )
    return node.output[0], weight, bias, stride[0]

  def _batch_norm(self, tensor: str, channels: int, expected: str, shift=None, node=None):
    """The BN that reads `tensor` as arcface_torch's BN tensors, where `node` (by default the one
    node that reads `tensor`) is a BatchNormalization; the identity otherwise. `shift`, the bias
    of a Conv before it, goes into its mean. Returns the tensor after it and its tensors."""
    node = self._next(tensor) if node is None else node
    if node is None or node.op_type != "BatchNormalization":
      bn = _identity_bn(channels)
    else:
      self._take(node, ("BatchNormalization",), expected)
      attributes = self._attributes(node)
      if attributes.get("training_mode", 0) or not attributes.get("spatial", 1):
        raise self._error(node, f"is in training mode or not spatial where {expected} was expected")
      names = ("weight", "bias", "running_mean", "running_var")
      bn = {k: self._constant(node, i, k).astype(np.float64) for i, k in enumerate(names, 1)}
      # Another epsilon goes into the variance: BN divides by sqrt(var + eps), eps in float32.
      epsilon = np.float32(attributes.get("epsilon", 1e-5))
      own = np.float32(models.normalization.BN_EPSILON)
      if epsilon != own:
        bn["running_var"] += np.float64(epsilon) - np.float64(own)
      tensor = node.output[0]
    if shift is not None:
      bn["running_mean"] = bn["running_mean"] - shift
    return tensor, {k: np.asarray(v, np.float32) for k, v in bn.items()}

  def _conv_bn(self, node, names, kernel, strides, expected, layers):
    """The Conv `node` and the BN after it (or its bias) into `layers` as `names` (conv, bn);
    returns the tensor after them, their width and the stride."""
    tensor, weight, bias, stride = self._conv(node, kernel, strides, expected)
    bn_expected = f"the BatchNormalization of {expected}"
    tensor, bn = self._batch_norm(tensor, weight.shape[0], bn_expected, shift=bias)
    layers[f"{names[0]}.weight"] = weight
    layers.update({f"{names[1]}.{k}": v for k, v in bn.items()})
    return tensor, weight.shape[0], stride

  def _prelu(self, tensor: str, channels: int, expected: str, layers: dict, name: str) -> str:
    node = self._take(self._reader(tensor, expected), ("PRelu",), expected)
    slope = self._per_channel(node, self._constant(node, 1, "slope"), channels, "slope")
    layers[f"{name}.weight"] = slope.astype(np.float32)
    return node.output[0]

  def _kernel(self, node) -> list[int] | None:
    if node.op_type != "Conv":
      return None
    weight = self.constants.get(node.input[1] if len(node.input) > 1 else "")
    kernel = self._attributes(node).get(
        "kernel_shape", None if weight is None else weight.shape[2:]
    )
    return None if kernel is None else list(kernel)

  def _unit(self, tensor: str, channels: int, number: int, layers: dict):
    """Residual unit `number` (from 1), which reads `tensor`: BN, Conv, BN, PReLU, Conv (strided
    in a stage's first unit), BN, plus the input or, where strided, Conv 1x1 and BN; any BN may
    be absent. Returns its output, width and stride."""
    unit = f"residual unit {number}"
    branch, shortcut = self.readers[tensor]
    if branch.op_type == "Add" or self._kernel(branch) == [1, 1]:
      branch, shortcut = shortcut, branch
    expected = f"{unit}'s first BatchNormalization"
    y, bn1 = self._batch_norm(tensor, channels, expected, node=branch)
    layers.update({f"bn1.{k}": v for k, v in bn1.items()})
    if y != tensor:
      branch = self._reader(y, f"{unit}'s first Conv")
    y, width, _ = self._conv_bn(branch, ("conv1", "bn2"), 3, (1,), f"{unit}'s first Conv", layers)
    y = self._prelu(y, width, f"{unit}'s PRelu", layers, "prelu")
    expected = f"{unit}'s second Conv"
    node = self._reader(y, expected)
    y, width, stride = self._conv_bn(node, ("conv2", "bn3"), 3, (1, 2), expected, layers)
    if stride == 2:
      expected = f"{unit}'s shortcut Conv (a strided unit's)"
      x, *_ = self._conv_bn(shortcut, ("downsample.0", "downsample.1"), 1, (2,), expected, layers)
    elif shortcut.op_type != "Add":
      raise self._error(shortcut, f"is where the Add of {unit}, not strided, was expected")
    else:
      x = tensor
    add = self._take(self._reader(y, f"{unit}'s Add"), ("Add",), f"{unit}'s Add")
    if sorted(self.aliases.get(n, n) for n in add.input) != sorted([x, y]):
      raise self._error(add, f"does not add {unit}'s branch and shortcut")
    return add.output[0], width, stride

  def _head(self, tensor: str, channels: int) -> str:
    """The head, which reads `tensor`: BN, Flatten (or Reshape), Gemm (or MatMul and Add), BN;
    either BN may be absent. Returns its output."""
    inputs = channels * (IMAGE_SIZE // 16) ** 2  # The fc's: four stride-2 stages leave 7x7.
    tensor, bn = self._batch_norm(tensor, channels, "the head's BatchNormalization")
    self.state.update({f"bn2.{k}": v for k, v in bn.items()})
    expected = "the head's Flatten"
    node = self._take(self._reader(tensor, expected), ("Flatten", "Reshape"), expected)
    if node.op_type == "Flatten" and self._attributes(node).get("axis", 1) != 1:
      raise self._error(node, f"flattens from axis {self._attributes(node)['axis']}, not 1")
    if node.op_type == "Reshape":
      shape = [int(d) for d in self._constant(node, 1, "shape")]
      if len(shape) != 2 or shape[0] not in (0, 1, -1) or shape[1] not in (-1, inputs):
        raise self._error(node, f"reshapes to {shape} where [N, -1] (a flatten) was expected")
    expected = "the embedding's Gemm or MatMul"
    node = self._take(self._reader(node.output[0], expected), ("Gemm", "MatMul"), expected)
    weight = self._constant(node, 1, "weight").astype(np.float32)
    if node.op_type == "Gemm":
      attributes = {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0, **self._attributes(node)}
      if (attributes["alpha"], attributes["beta"], attributes["transA"]) != (1, 1, 0):
        raise self._error(node, "has alpha, beta or transA set where x @ W.T + b was expected")
      weight = weight if attributes["transB"] else weight.T
      bias = self._constant(node, 2, "bias") if len(node.input) > 2 and node.input[2] else 0
      tensor = node.output[0]
    else:
      weight, tensor, bias = weight.T, node.output[0], 0
      add = self._next(tensor)
      if add is not None and add.op_type == "Add":
        self._take(add, ("Add",), "")
        operand = [self.aliases.get(n, n) for n in add.input].index(tensor)
        bias, tensor = self._constant(add, 1 - operand, "bias"), add.output[0]
    if weight.ndim != 2 or weight.shape[1] != inputs or np.size(bias) not in (1, weight.shape[0]):
      raise self._error(
          node,
          f"has a weight of shape {list(weight.shape)} and a bias of {np.size(bias)} where "
          f"{inputs} inputs ({channels} channels of a {IMAGE_SIZE}x{IMAGE_SIZE} image's "
          f"{IMAGE_SIZE // 16}x{IMAGE_SIZE // 16} map) were expected",
      )
    features = weight.shape[0]
    self.state["fc.weight"] = weight
    self.state["fc.bias"] = np.broadcast_to(np.reshape(bias, -1), (features,)).astype(np.float32)
    tensor, bn = self._batch_norm(tensor, features, "the embedding's BatchNormalization")
    self.state.update({f"features.{k}": v for k, v in bn.items()})
    return tensor

  def _read(self, tensor: str) -> tuple[int, ...]:
    """Walks the network from `tensor`, the normalised images, into self.state; returns its stage
    depths."""
    expected = "the first Conv"
    stem = {}
    node = self._reader(tensor, expected)
    tensor, channels, _ = self._conv_bn(node, ("conv1", "bn1"), 3, (1,), expected, stem)
    tensor = self._prelu(tensor, channels, "the first PRelu", stem, "prelu")
    self.state.update(stem)
    depths = []
    while len(self.readers.get(tensor, [])) == 2:
      layers = {}
      tensor, channels, stride = self._unit(tensor, channels, sum(depths) + 1, layers)
      if stride == 2:
        depths.append(0)
      elif not depths:
        raise ConversionError(
            f"{self.path} is not an arcface_torch iResNet graph: its first residual unit is not "
            "strided."
        )
      depths[-1] += 1
      self.state.update({f"layer{len(depths)}.{depths[-1] - 1}.{k}": v for k, v in layers.items()})
    tensor = self._head(tensor, channels)
    if tensor != self.output:
      following = self._reader(tensor, "the graph's output")
      raise self._error(following, "is where the graph's output was expected")
    unmatched = [node for node in self.data_nodes if id(node) not in self.visited]
    if unmatched:
      raise self._error(unmatched[0], "is off the path from the images to the embeddings")
    return tuple(depths)


def convert_onnx(weights: str, arch: str | None, out: str) -> dict[str, Any]:
  """Writes the model directory `out` from an ONNX graph of an arcface_torch iResNet (of network
  `arch`, one of ONNX_ARCHS, if given: it is read off the graph); returns its model config."""
  if arch is not None and arch not in ONNX_ARCHS:
    raise ConversionError(
        f"--from onnx reads arcface_torch's iResNets ({', '.join(ONNX_ARCHS)}), not {arch}."
    )
  _check_out(out)
  graph = _OnnxIResNet(weights)
  known = {tuple(models.create_model(ARCFACE_TORCH_ARCHS[a]).stage_depths): a for a in ONNX_ARCHS}
  if graph.depths not in known:
    archs = ", ".join(f"{a} {depths}" for depths, a in known.items())
    raise ConversionError(
        f"{weights} is an iResNet of stage depths {graph.depths}, which is none of arcface_torch's "
        f"({archs})."
    )
  if arch is not None and arch != known[graph.depths]:
    raise ConversionError(
        f"--arch {arch}, but {weights} is an arcface_torch {known[graph.depths]} graph (stage "
        f"depths {graph.depths}); give --arch {known[graph.depths]} or leave --arch out."
    )
  arch = known[graph.depths]
  widths = [graph.state["conv1.weight"].shape[0]]
  widths += [graph.state[f"layer{s}.0.conv2.weight"].shape[0] for s in range(1, 5)]
  module = models.create_model(ARCFACE_TORCH_ARCHS[arch])
  if tuple(widths) != (module.stage_widths[0], *module.stage_widths):
    raise ConversionError(
        f"{weights} is an iResNet of widths {widths[1:]} (stem {widths[0]}), not arcface_torch's "
        f"{tuple(module.stage_widths)}."
    )
  return _write(
      graph.state,
      arch,
      out,
      what=f"{weights} is not an arcface_torch {arch} graph",
      source=f"onnx {arch} {os.path.abspath(weights)}",
      pixel_scale=graph.pixel_scale,
  )


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m adam_face.convert",
      description="Converts published weights into an adam_face model directory (model_dir.py).",
  )
  parser.add_argument(
      "--from",
      dest="source",
      required=True,
      choices=["arcface_torch", "onnx"],
      help="the weights' format: an arcface_torch state dict, or an ONNX graph of its iResNet",
  )
  parser.add_argument(
      "--arch",
      choices=list(ARCFACE_TORCH_ARCHS),
      help="the network they are of (with --from onnx: optional, read off the graph)",
  )
  parser.add_argument(
      "--weights", required=True, help="the PyTorch state dict file (.pth, .pt) or the .onnx file"
  )
  parser.add_argument("--out", required=True, help="the model directory to write")
  args = parser.parse_args(argv)
  if args.source == "arcface_torch" and args.arch is None:
    parser.error("--from arcface_torch needs --arch")
  convert = convert_onnx if args.source == "onnx" else convert_arcface_torch
  try:
    model_config = convert(args.weights, args.arch, args.out)
  except ConversionError as e:
    parser.exit(1, f"{parser.prog}: error: {e}\n")
  print(
      f"Wrote {args.out}: {model_config['name']}, {model_config['embedding_dim']}-d embeddings of "
      "images normalised by pixels.normalize."
  )


if __name__ == "__main__":
  main()
