"""A face detector with five landmarks: MTCNN (Zhang et al. 2016) in flax, on its published weights.

  faces = face_detector.detect(image)  # uint8 [H, W, 3] RGB or a PIL image
  faces.boxes [N, 4], faces.scores [N], faces.landmarks [N, 5, 2], best score first

  python -m adam_face.face_detector --convert_from=facenet_pytorch-2.6.0-py3-none-any.whl \
      --out=adam_face/weights/mtcnn.npz

The weights (adam_face/weights/mtcnn.npz, 2.0 MB) are the original MTCNN networks as the
facenet-pytorch package ships them (facenet_pytorch/data/{pnet,rnet,onet}.pt, MIT licence:
adam_face/weights/LICENSE-mtcnn.txt), converted by the command above (it needs torch, a benchmark
extra: benchmarks/requirements.txt); detection itself needs neither torch nor facenet-pytorch.

MTCNN is a cascade of three small networks, re-implemented here from the paper's design:
  1. P-Net, fully convolutional, scans an image pyramid (scales 12 / min_face_size times
     scale_factor^k, down to a 12-pixel short side): each output cell scores the 12x12 window at
     stride 2 and regresses its box. Windows scoring >= thresholds[0] become boxes in the image;
     non-maximum suppression (NMS) at IoU 0.5 within each scale, then at 0.7 across scales; the
     regression is applied, boxes are made square and truncated to whole pixels.
  2. R-Net scores each box's crop resized to 24x24 (score > thresholds[1]); NMS at 0.7; its
     regression; square, truncated.
  3. O-Net, on 48x48 crops (score > thresholds[2]), gives the final score, a last box regression
     and the five landmarks; NMS at 0.7 of the intersection over the smaller box.
Crops reaching outside the image are padded with black, so a crop keeps its box's geometry.

Conventions of the weights (facenet-pytorch's conversion of the original Caffe networks):
  * pixels RGB, normalised as (x - 127.5) * 0.0078125;
  * convolutions on the image as it is, not transposed: facenet-pytorch feeds its networks
    NCHW tensors permuted from HWC images, and the flax kernels [kh, kw, in, out] here are its
    [out, in, kh, kw] ones transposed, so they see the same (H, W) orientation;
  * R-Net's and O-Net's dense layers read the last feature map flattened in (W, H, C) order
    (facenet-pytorch permutes its NCHW map to NWHC before the flatten): the NHWC map here is
    transposed before the flatten (`_flatten_whc`), the step a port most easily gets wrong;
  * max-pooling rounds its output size up (Caffe's ceil mode): partial windows at the bottom and
    right edges are pooled over what they hold;
  * the classifier's softmax index 1 is "face"; box regressions are (dx1, dy1, dx2, dy2) in units
    of the box's width and height; O-Net's ten landmark outputs are the five x, then the five y,
    as fractions of the box: left eye, right eye, nose, left mouth corner, right mouth corner,
    left and right as seen in the image, the order datasets/alignment.py expects.
Coordinates. Boxes (x1, y1, x2, y2) are the original's inclusive pixel ranges counted from 1: a
box's crop is the 0-based pixels x1 - 1 .. x2 - 1, x2 - x1 + 1 wide. A landmark is
x1 - 1 + fraction * width, as the original and facenet-pytorch compute it from the box of the
crop O-Net saw; read in pillow's continuous coordinates (pixel i spans [i, i + 1), its centre at
i + 0.5), the ones datasets/alignment.align_face warps with, it is where the network puts the
point: mirroring an image moves the landmarks to width - x, to within a fraction of a pixel
(`pytest -s tests/test_face_detector.py` prints the mean offset on 20 LFW faces and asserts it
under 0.3 px), which holds only in those coordinates.

Where facenet-pytorch departs from the original design this follows the original: facenet-pytorch
crops boxes truncated to whole pixels but regresses and places landmarks from the untruncated
ones (so its landmarks lie a fraction of a pixel right of and below these), and it clips crops
at the image border and stretches what is left to 24x24 or 48x48 instead of padding them. The
pyramid's sizes are ceil(side * scale) (facenet-pytorch: int(side * scale + 1)), resized by area
averaging (pillow's BOX filter; facenet-pytorch's 'area' interpolation). So detections agree with
facenet-pytorch's to about a pixel, not exactly (a one-off comparison with facenet-pytorch's own
detect_face, run by hand and not kept in the repository, found the same faces on LFW faces pasted
into photos, one of them with another box); the networks agree to float rounding
(tests/test_face_detector.py).

To compile few programs over images of many sizes, each pyramid level is padded at its bottom and
right to a bucketed size (P-Net's outputs there are masked out and discarded, and its first
pooling ignores the padding, so valid outputs are exactly those of the unpadded level), and
R-Net's and O-Net's batches to a power of two.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import math
import os
import sys
import zipfile
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from adam_face import errors
from adam_face.models import normalization
from datasets import images

DEFAULT_WEIGHTS = os.path.join(os.path.dirname(__file__), "weights", "mtcnn.npz")
MIN_FACE_SIZE = 20
SCALE_FACTOR = 0.709
THRESHOLDS = (0.6, 0.7, 0.7)
# Non-maximum suppression: P-Net's boxes within a scale, then across scales and after R-Net (IoU),
# then O-Net's (intersection over the smaller box).
_NMS_WITHIN_SCALE = 0.5
_NMS_ACROSS = 0.7
_NMS_FINAL = 0.7
_PIXEL_MEAN = 127.5
_PIXEL_SCALE = 0.0078125
# P-Net's window (cell) and output stride in pyramid pixels.
_CELL = 12
_STRIDE = 2
_RNET_SIZE = 24
_ONET_SIZE = 48
_MAX_BATCH = 256
_NETWORKS = ("pnet", "rnet", "onet")
# Where facenet-pytorch's wheel keeps the three state dicts.
_WHEEL_DATA = "facenet_pytorch/data"
# The networks are tiny: full float32 precision costs nothing, and keeps detections alike on every
# backend (TPUs and GPUs otherwise multiply in bfloat16 or TF32).
_PRECISION = jax.lax.Precision.HIGHEST


class PReLU(nn.Module):
  """normalization.prelu with one slope a channel, named "alpha" as facenet-pytorch's weights
  (the backbones' PReLU names its slope "slope")."""

  @nn.compact
  def __call__(self, x):
    return normalization.prelu(
        x, self.param("alpha", nn.initializers.constant(0.25), (x.shape[-1],))
    )


def _conv(features: int, size: int, name: str) -> nn.Conv:
  return nn.Conv(features, (size, size), padding="VALID", precision=_PRECISION, name=name)


def _dense(features: int, name: str) -> nn.Dense:
  return nn.Dense(features, precision=_PRECISION, name=name)


def _max_pool_ceil(x, size: int, stride: int):
  """Max-pooling of NHWC `x` whose output size is rounded up: ceil((n - size) / stride) + 1."""
  pads = []
  for n in x.shape[1:3]:
    out = -(-(n - size) // stride) + 1
    pads.append((0, (out - 1) * stride + size - n))
  return jax.lax.reduce_window(
      x, -jnp.inf, jax.lax.max, (1, size, size, 1), (1, stride, stride, 1), [(0, 0), *pads, (0, 0)]
  )


def _flatten_whc(x):
  """[N, H, W, C] -> [N, W * H * C], flattened in the (W, H, C) order of the dense weights."""
  return jnp.transpose(x, (0, 2, 1, 3)).reshape(x.shape[0], -1)


class PNet(nn.Module):
  """The proposal network: normalised NHWC images of any size >= 12 -> (face probability
  [N, H', W'], box regression [N, H', W', 4]), a cell per 12x12 window at stride 2.

  valid_size: the (height, width) of the image within x, which may be padded below and right:
  the first pooling then pools only over the image, as on the unpadded image, and the outputs of
  cells beyond it are meaningless.
  """

  @nn.compact
  def __call__(self, x, valid_size=None):
    x = PReLU(name="prelu1")(_conv(10, 3, "conv1")(x))
    if valid_size is not None:
      rows = jnp.arange(x.shape[1])[:, None] < valid_size[0] - 2
      cols = jnp.arange(x.shape[2])[None, :] < valid_size[1] - 2
      x = jnp.where((rows & cols)[None, :, :, None], x, -jnp.inf)
    x = _max_pool_ceil(x, 2, 2)
    x = jnp.where(jnp.isfinite(x), x, 0.0)  # Windows wholly in the padding.
    x = PReLU(name="prelu2")(_conv(16, 3, "conv2")(x))
    x = PReLU(name="prelu3")(_conv(32, 3, "conv3")(x))
    probability = nn.softmax(_conv(2, 1, "conv4_1")(x))[..., 1]
    return probability, _conv(4, 1, "conv4_2")(x)


class RNet(nn.Module):
  """The refinement network: normalised [N, 24, 24, 3] -> (face probability [N], box regression
  [N, 4])."""

  @nn.compact
  def __call__(self, x):
    x = _max_pool_ceil(PReLU(name="prelu1")(_conv(28, 3, "conv1")(x)), 3, 2)
    x = _max_pool_ceil(PReLU(name="prelu2")(_conv(48, 3, "conv2")(x)), 3, 2)
    x = PReLU(name="prelu3")(_conv(64, 2, "conv3")(x))
    x = PReLU(name="prelu4")(_dense(128, "dense4")(_flatten_whc(x)))
    return nn.softmax(_dense(2, "dense5_1")(x))[:, 1], _dense(4, "dense5_2")(x)


class ONet(nn.Module):
  """The output network: normalised [N, 48, 48, 3] -> (face probability [N], box regression
  [N, 4], landmarks [N, 10]: five x then five y, as fractions of the box)."""

  @nn.compact
  def __call__(self, x):
    x = _max_pool_ceil(PReLU(name="prelu1")(_conv(32, 3, "conv1")(x)), 3, 2)
    x = _max_pool_ceil(PReLU(name="prelu2")(_conv(64, 3, "conv2")(x)), 3, 2)
    x = _max_pool_ceil(PReLU(name="prelu3")(_conv(64, 3, "conv3")(x)), 2, 2)
    x = PReLU(name="prelu4")(_conv(128, 2, "conv4")(x))
    x = PReLU(name="prelu5")(_dense(256, "dense5")(_flatten_whc(x)))
    probability = nn.softmax(_dense(2, "dense6_1")(x))[:, 1]
    return probability, _dense(4, "dense6_2")(x), _dense(10, "dense6_3")(x)


NETWORKS = {"pnet": PNet(), "rnet": RNet(), "onet": ONet()}
# The input side each network is initialised (and converted) with.
_INIT_SIZES = {"pnet": _CELL, "rnet": _RNET_SIZE, "onet": _ONET_SIZE}


def _normalise(pixels):
  return (pixels.astype(jnp.float32) - _PIXEL_MEAN) * _PIXEL_SCALE


@jax.jit
def _run_pnet(variables, pixels, valid_size):
  return NETWORKS["pnet"].apply(variables, _normalise(pixels), valid_size)


@jax.jit
def _run_rnet(variables, pixels):
  return NETWORKS["rnet"].apply(variables, _normalise(pixels))


@jax.jit
def _run_onet(variables, pixels):
  return NETWORKS["onet"].apply(variables, _normalise(pixels))


def variable_shapes() -> dict[str, dict]:
  """{network: its flax variables as ShapeDtypeStructs}."""
  return {
      name: jax.eval_shape(
          network.init, jax.random.key(0), jnp.zeros((1, _INIT_SIZES[name], _INIT_SIZES[name], 3))
      )
      for name, network in NETWORKS.items()
  }


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}/"))
    else:
      out[f"{prefix}{key}"] = value
  return out


def load_variables(path: str = DEFAULT_WEIGHTS) -> dict[str, dict]:
  """{network: flax variables} from an .npz of convert_weights, checked against the networks."""
  if not os.path.isfile(path):
    raise errors.RunError(
        f"no MTCNN weights at {path}; write them with python -m adam_face.face_detector "
        "--convert_from=<facenet-pytorch wheel> --out=" + path
    )
  with np.load(path) as data:
    arrays = {key: data[key] for key in data.files}
  variables = {}
  for name, shapes in variable_shapes().items():
    expected = _flat(shapes, f"{name}/")
    missing = [k for k in expected if k not in arrays or arrays[k].shape != expected[k].shape]
    if missing:
      raise errors.RunError(
          f"{path} is not an MTCNN weights file: {missing[0]} missing or misshapen."
      )
    tree = {}
    for key in expected:
      node = tree
      *parents, leaf = key.split("/")[1:]
      for parent in parents:
        node = node.setdefault(parent, {})
      node[leaf] = jnp.asarray(arrays[key], jnp.float32)
    variables[name] = tree
  return variables


@functools.cache
def default_variables() -> dict[str, dict]:
  """The shipped weights, read once."""
  return load_variables(DEFAULT_WEIGHTS)


@dataclasses.dataclass(frozen=True)
class Faces:
  """Detections in an image, best score first (see the module docstring for the coordinates).

  boxes: float [N, 4] (x1, y1, x2, y2); scores: float [N], O-Net's face probability;
  landmarks: float [N, 5, 2] (x, y) of the left eye, right eye, nose, left and right mouth corners.
  """

  boxes: np.ndarray
  scores: np.ndarray
  landmarks: np.ndarray

  def __len__(self) -> int:
    return len(self.scores)

  def largest(self) -> int:
    """The index of the face with the largest box (the first of equals)."""
    if not len(self):
      raise ValueError("no faces")
    widths, heights = (self.boxes[:, 2:] - self.boxes[:, :2]).T
    return int(np.argmax(widths * heights))


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, mode: str = "union") -> np.ndarray:
  """Greedy non-maximum suppression: the indices kept, best score first.

  Boxes are inclusive pixel ranges (areas count x2 - x1 + 1 columns); a box is dropped when its
  overlap with a kept better one exceeds `threshold`: intersection over union (mode 'union') or
  over the smaller box ('min').
  """
  if mode not in ("union", "min"):
    raise ValueError(f"mode must be 'union' or 'min', got {mode!r}")
  x1, y1, x2, y2 = np.asarray(boxes, np.float64).T
  areas = (x2 - x1 + 1) * (y2 - y1 + 1)
  order = np.argsort(-np.asarray(scores), kind="stable")
  keep = []
  while order.size:
    best, rest = order[0], order[1:]
    keep.append(best)
    widths = np.maximum(0.0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]) + 1)
    heights = np.maximum(0.0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]) + 1)
    inter = widths * heights
    if mode == "min":
      overlap = inter / np.minimum(areas[best], areas[rest])
    else:
      overlap = inter / (areas[best] + areas[rest] - inter)
    order = rest[overlap <= threshold]
  return np.array(keep, np.int64)


def _square(boxes: np.ndarray) -> np.ndarray:
  """Boxes grown about their centres to squares of side max(x2 - x1, y2 - y1)."""
  boxes = boxes.copy()
  widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
  sides = np.maximum(widths, heights)
  boxes[:, 0] += (widths - sides) / 2
  boxes[:, 1] += (heights - sides) / 2
  boxes[:, 2:4] = boxes[:, 0:2] + sides[:, None]
  return boxes


def _regress(boxes: np.ndarray, offsets: np.ndarray, inclusive: bool) -> np.ndarray:
  """Boxes moved by regression offsets (dx1, dy1, dx2, dy2) in units of their size: the size is
  x2 - x1 (+ 1 where `inclusive`, as after P-Net it is not in the original)."""
  sizes = boxes[:, 2:4] - boxes[:, 0:2] + (1.0 if inclusive else 0.0)
  return boxes + offsets * np.concatenate([sizes, sizes], axis=1)


def _pyramid_scales(height: int, width: int, min_face_size: float, factor: float) -> list[float]:
  scales = []
  scale = _CELL / min_face_size
  while min(height, width) * scale >= _CELL:
    scales.append(scale)
    scale *= factor
  return scales


def _bucket(n: int) -> int:
  """n rounded up to a multiple of 32, or of 1/8 of its octave above 256: few distinct sizes."""
  step = max(32, 2 ** (max(n - 1, 1).bit_length() - 3))
  return -(-n // step) * step


def _resize(image: Image.Image, width: int, height: int) -> np.ndarray:
  """uint8 [height, width, 3] of `image` resized by area averaging."""
  if image.size == (width, height):
    return np.asarray(image)
  return np.asarray(image.resize((width, height), Image.Resampling.BOX))


def _crops(image: Image.Image, boxes: np.ndarray, size: int) -> np.ndarray:
  """uint8 [N, size, size, 3]: each whole-pixel box's pixels (black outside the image), resized."""
  # A box spans the 1-based pixels x1 .. x2: pillow's half-open 0-based (x1 - 1, ..., x2).
  return np.stack(
      [
          _resize(image.crop((int(x1) - 1, int(y1) - 1, int(x2), int(y2))), size, size)
          for x1, y1, x2, y2 in boxes[:, :4]
      ]
  )


def _batched(run, variables, pixels: np.ndarray) -> list[np.ndarray]:
  """The outputs of a jitted per-crop network on all of `pixels`, in batches padded to a power
  of two (at most _MAX_BATCH), so few batch sizes compile."""
  outputs = []
  for start in range(0, len(pixels), _MAX_BATCH):
    batch = pixels[start : start + _MAX_BATCH]
    padded = min(_MAX_BATCH, max(8, 1 << (len(batch) - 1).bit_length()))
    batch = np.concatenate([batch, np.zeros((padded - len(batch), *batch.shape[1:]), np.uint8)])
    outputs.append([np.asarray(o)[: len(pixels) - start] for o in run(variables, batch)])
  return [np.concatenate(parts) for parts in zip(*outputs)]


def _stage1(image: Image.Image, variables, min_face_size, threshold, factor) -> np.ndarray:
  """P-Net's candidate boxes [M, 5] (x1, y1, x2, y2, score), regressed and squared."""
  width, height = image.size
  candidates = []
  for scale in _pyramid_scales(height, width, min_face_size, factor):
    level_h, level_w = math.ceil(height * scale), math.ceil(width * scale)
    level = _resize(image, level_w, level_h)
    padded = np.zeros((_bucket(level_h), _bucket(level_w), 3), np.uint8)
    padded[:level_h, :level_w] = level
    probability, offsets = _run_pnet(
        variables, padded[None], np.array([level_h, level_w], np.int32)
    )
    # Cells whose window lies in the level: ceil((side - 2) / 2) - 4 of them along each side.
    out_h, out_w = -(-(level_h - 2) // 2) - 4, -(-(level_w - 2) // 2) - 4
    probability = np.asarray(probability[0, :out_h, :out_w])
    rows, cols = np.nonzero(probability >= threshold)
    if not rows.size:
      continue
    # The window of cell (row, col) in 1-based image pixels, as the original computes it.
    boxes = np.stack(
        [
            np.floor((_STRIDE * cols + 1) / scale),
            np.floor((_STRIDE * rows + 1) / scale),
            np.floor((_STRIDE * cols + _CELL) / scale),
            np.floor((_STRIDE * rows + _CELL) / scale),
        ],
        axis=1,
    )
    scores = probability[rows, cols]
    keep = nms(boxes, scores, _NMS_WITHIN_SCALE)
    found = np.concatenate(
        [boxes[keep], scores[keep, None], np.asarray(offsets[0])[rows[keep], cols[keep]]], axis=1
    )
    candidates.append(found)
  if not candidates:
    return np.zeros((0, 5))
  candidates = np.concatenate(candidates)
  candidates = candidates[nms(candidates[:, :4], candidates[:, 4], _NMS_ACROSS)]
  boxes = _square(_regress(candidates[:, :4], candidates[:, 5:9], inclusive=False))
  return np.concatenate([boxes, candidates[:, 4:5]], axis=1)


def _usable(boxes: np.ndarray) -> np.ndarray:
  """Boxes truncated to whole pixels (as the original crops them), without empty ones."""
  boxes = boxes.copy()
  boxes[:, :4] = np.trunc(boxes[:, :4])
  return boxes[(boxes[:, 2] >= boxes[:, 0]) & (boxes[:, 3] >= boxes[:, 1])]


def detect(
    image: np.ndarray | Image.Image,
    variables: dict[str, dict] | None = None,
    *,
    min_face_size: float = MIN_FACE_SIZE,
    thresholds: Sequence[float] = THRESHOLDS,
    scale_factor: float = SCALE_FACTOR,
) -> Faces:
  """The faces MTCNN finds in an RGB image (uint8 [H, W, 3], or a PIL image of any mode).

  Args:
    image: the photo; a PIL image is taken as a viewer shows it, its EXIF orientation applied
      (datasets/images.py: upright), so the boxes and landmarks are in those coordinates.
    variables: load_variables' networks; default: the shipped weights.
    min_face_size: the smallest face side, in pixels, the pyramid looks for.
    thresholds: the face probabilities P-Net, R-Net and O-Net need to keep a box.
    scale_factor: the ratio of successive pyramid scales.
  Returns:
    The faces, best score first.
  """
  if variables is None:
    variables = default_variables()
  if isinstance(image, Image.Image):
    image = images.upright(image).convert("RGB")
  else:
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
      raise ValueError(f"expected a uint8 [H, W, 3] image, got {array.dtype} {array.shape}")
    image = Image.fromarray(array)
  none = Faces(np.zeros((0, 4)), np.zeros((0,)), np.zeros((0, 5, 2)))

  boxes = _usable(_stage1(image, variables["pnet"], min_face_size, thresholds[0], scale_factor))
  if not len(boxes):
    return none
  scores, offsets = _batched(_run_rnet, variables["rnet"], _crops(image, boxes, _RNET_SIZE))
  passed = scores > thresholds[1]
  boxes, scores, offsets = boxes[passed, :4], scores[passed], offsets[passed]
  keep = nms(boxes, scores, _NMS_ACROSS)
  boxes = _usable(_square(_regress(boxes[keep], offsets[keep], inclusive=True)))
  if not len(boxes):
    return none
  scores, offsets, points = _batched(_run_onet, variables["onet"], _crops(image, boxes, _ONET_SIZE))
  passed = scores > thresholds[2]
  boxes, scores, offsets, points = boxes[passed], scores[passed], offsets[passed], points[passed]
  sizes = boxes[:, 2:4] - boxes[:, 0:2] + 1
  # Fractions of the box to pixels: x1 - 1 + fraction * width (the original's formula).
  landmarks = np.stack([points[:, :5], points[:, 5:]], axis=2) * sizes[:, None, :]
  landmarks += boxes[:, None, 0:2] - 1
  boxes = _regress(boxes, offsets, inclusive=True)
  keep = nms(boxes, scores, _NMS_FINAL, mode="min")
  return Faces(
      boxes[keep].astype(np.float64),
      scores[keep].astype(np.float64),
      landmarks[keep].astype(np.float64),
  )


def read_state_dicts(source: str) -> dict[str, dict[str, np.ndarray]]:
  """{network: its PyTorch state dict as float32 numpy arrays} from facenet-pytorch's wheel (a
  zip) or a folder holding pnet.pt, rnet.pt and onet.pt."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise errors.RunError(
        "Reading facenet-pytorch's weights needs torch, which is not installed: "
        ".venv/bin/pip install -r benchmarks/requirements.txt"
    ) from None

  def load(data: bytes, where: str) -> dict[str, np.ndarray]:
    try:
      # weights_only: unpickles tensors and plain containers, never code from the file.
      state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # pylint: disable=broad-except
      raise errors.RunError(f"torch.load could not read {where} as a state dict ({e}).") from None
    return {key: value.numpy().astype(np.float32) for key, value in state.items()}

  if zipfile.is_zipfile(source):
    with zipfile.ZipFile(source) as wheel:
      names = set(wheel.namelist())
      missing = [f"{_WHEEL_DATA}/{n}.pt" for n in _NETWORKS if f"{_WHEEL_DATA}/{n}.pt" not in names]
      if missing:
        raise errors.RunError(f"{source} has no {missing[0]}; give facenet-pytorch's wheel.")
      return {n: load(wheel.read(f"{_WHEEL_DATA}/{n}.pt"), f"{source}:{n}.pt") for n in _NETWORKS}
  if os.path.isdir(source):
    states = {}
    for name in _NETWORKS:
      path = os.path.join(source, f"{name}.pt")
      if not os.path.isfile(path):
        raise errors.RunError(
            f"{source} holds no {name}.pt; give the folder of the three .pt files."
        )
      with open(path, "rb") as f:
        states[name] = load(f.read(), path)
    return states
  raise errors.RunError(
      f"--convert_from={source} is neither a wheel (zip) nor a folder; give facenet-pytorch's "
      "wheel (pip download --no-deps facenet-pytorch==2.6.0) or its facenet_pytorch/data folder."
  )


def convert_weights(states: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """facenet-pytorch's state dicts -> the flat arrays of an .npz that load_variables reads.

  Conv weights [out, in, kh, kw] become flax kernels [kh, kw, in, out], dense weights [out, in]
  kernels [in, out] (their input order, (W, H, C), is the one _flatten_whc gives), PReLU weights
  the alphas; every array the networks need must be there, and nothing else.
  """
  arrays = {}
  for name, shapes in variable_shapes().items():
    expected = _flat(shapes, f"{name}/")
    state = dict(states[name])
    for key, value in state.items():
      layer, kind = key.rsplit(".", 1)
      if layer.startswith("prelu"):
        target, value = f"{name}/params/{layer}/alpha", value
      elif kind == "bias":
        target = f"{name}/params/{layer}/bias"
      elif value.ndim == 4:
        target, value = f"{name}/params/{layer}/kernel", value.transpose(2, 3, 1, 0)
      else:
        target, value = f"{name}/params/{layer}/kernel", value.T
      if target not in expected or expected[target].shape != value.shape:
        raise errors.RunError(f"{name}: {key} {value.shape} fits no layer of the flax {name}.")
      arrays[target] = np.ascontiguousarray(value, np.float32)
    missing = sorted(set(expected) - set(arrays))
    if missing:
      raise errors.RunError(f"{name}: the weights lack {missing[0]}.")
  return arrays


def write_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
  """np.savez's format with fixed timestamps and order: a conversion gives the same bytes."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with zipfile.ZipFile(path, "w") as archive:
    for key in sorted(arrays):
      info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
      with archive.open(info, "w") as f:
        np.lib.format.write_array(f, arrays[key], allow_pickle=False)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m adam_face.face_detector",
      description="Convert facenet-pytorch's MTCNN weights to the .npz the detector reads.",
  )
  parser.add_argument(
      "--convert_from",
      required=True,
      help="facenet-pytorch's wheel, or a folder holding its pnet.pt, rnet.pt and onet.pt",
  )
  parser.add_argument("--out", default=DEFAULT_WEIGHTS, help="the .npz to write")
  args = parser.parse_args(argv)
  try:
    arrays = convert_weights(read_state_dicts(args.convert_from))
  except errors.RunError as e:
    sys.exit(f"FATAL: {e}")
  write_npz(args.out, arrays)
  count = sum(a.size for a in arrays.values())
  print(f"{args.out}: {len(arrays)} arrays, {count} parameters, {os.path.getsize(args.out)} bytes")


if __name__ == "__main__":
  main()
