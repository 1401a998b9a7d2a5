"""MobileFaceNet: a ~1 M-parameter face-recognition backbone.

Chen, Liu, Gao and Han, "MobileFaceNets: Efficient CNNs for Accurate Real-Time Face
Verification on Mobile Devices", CCBR 2018 (arXiv:1804.07573). Table 1 of the paper gives the
layout reproduced here: a 3x3 stride-2 convolution and a 3x3 depthwise convolution, MobileNetV2
linear bottlenecks (expand 1x1 - depthwise 3x3 - linear project 1x1, residual where the shape is
kept), a 1x1 convolution to 512 channels, a *global depthwise convolution* (GDConv: a linear
depthwise convolution whose kernel covers the whole 7x7 map, so every spatial position gets its
own learned weight, unlike global average pooling) and a linear 1x1 convolution to the
embedding. PReLU is the nonlinearity and every convolution is followed by BatchNorm. The paper
reports 0.99 M parameters and 221 M multiply-adds for a 128-d embedding at 112x112.

The GDConv kernel is sized to the final feature map at initialisation, so other input sizes
work (56x56 gives a 4x4 map and a 4x4 GDConv). Mixed precision follows iresnet.py: the body
computes in `dtype`, the embedding projection and its BN in float32.

Depthwise convolutions run as sums of shifted multiply-adds on the CPU (see DepthwiseConv): XLA:CPU
computes grouped convolutions, and their gradients above all, several times slower than that.
The dense convolutions go through adam_face.models.convolution, which runs the 1x1 ones as
matrix products on the CPU.

The same module, with other widths, expansion factors and a grouped stem convolution, is
arcface_torch's "mbf" (MBF_BOTTLENECKS; registered as "mobilefacenet_mbf").
"""

from collections.abc import Sequence
import contextlib
import contextvars
import functools
import operator
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from adam_face.models import convolution
from adam_face.models.iresnet import CONV_INIT, check_images, conv_layer
from adam_face.models.normalization import PReLU, batch_norm

# (expansion factor t, output channels c, repeats n, stride of the first repeat s): Table 1.
BOTTLENECKS = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))
# insightface arcface_torch's "mbf" (backbones/mobilefacenet.py, get_mbf with blocks=(1, 4, 6, 2)
# and scale=2; the network of insightface's w600k_mbf): the paper's units with twice its widths
# and half its expansion factors. Its stem is 128 wide, and its 3x3 stem convolution after the
# strided one has 64 groups of 2 channels rather than one per channel (stem_width=128,
# stem_groups=64).
MBF_BOTTLENECKS = ((1, 128, 5, 2), (2, 256, 1, 2), (1, 256, 6, 1), (2, 256, 1, 2), (1, 256, 2, 1))

DEPTHWISE_IMPLEMENTATIONS = ("auto", "conv", "shifted")
_depthwise_implementation = contextvars.ContextVar("depthwise_implementation", default="auto")


def _check_implementation(name: str) -> None:
  if name not in DEPTHWISE_IMPLEMENTATIONS:
    raise ValueError(
        f"Unknown depthwise implementation {name!r}; valid: "
        f"{', '.join(DEPTHWISE_IMPLEMENTATIONS)}."
    )


@contextlib.contextmanager
def depthwise_implementation(name: str):
  """Makes the depthwise convolutions traced inside the `with` block use implementation `name`.

  "conv" is lax.conv_general_dilated with feature_group_count = channels, "shifted" the sum of
  shifted multiply-adds (see depthwise_conv), and "auto", the default, picks "shifted" when JAX's
  default backend is the CPU and "conv" otherwise. Both compute the same function with the same
  parameters, so the choice is a tracing context rather than a module attribute: it reaches
  every depthwise layer of any model without threading an attribute through each of them, which
  lets count_macs trace "conv", whose MACs it reads off the program, whatever the backend. Like
  any tracing-time setting it is fixed into a jitted function when that function is traced.
  """
  _check_implementation(name)
  token = _depthwise_implementation.set(name)
  try:
    yield
  finally:
    _depthwise_implementation.reset(token)


def depthwise_conv(
    x, kernel, strides: int = 1, padding: int = 0, implementation: str | None = None
):
  """Depthwise convolution of NHWC `x` with an HWIO `kernel` [kh, kw, 1, C] of x's dtype.

  Args:
    x: input [B, H, W, C].
    kernel: one kh x kw filter per channel, [kh, kw, 1, C].
    strides: stride along both spatial axes.
    padding: zero rows (columns) added before and after each spatial axis.
    implementation: "conv": lax.conv_general_dilated with feature_group_count = C; "shifted":
      pad once, then for each of the kh*kw taps multiply the strided window of the input it sees
      by that tap's weights and accumulate, in float32 for lower-precision inputs (see
      _shifted_depthwise_conv for its gradients). XLA:CPU fuses the shifted form into a few
      elementwise loops and reductions, where its grouped convolution, and that convolution's
      gradients above all, run several times slower. "auto": "shifted" if JAX's default backend
      is the CPU, else "conv". None (the default): the implementation set by
      depthwise_implementation, "auto" outside it.
  """
  implementation = implementation or _depthwise_implementation.get()
  _check_implementation(implementation)
  if implementation == "auto":
    implementation = "shifted" if jax.default_backend() == "cpu" else "conv"
  if implementation == "conv":
    return lax.conv_general_dilated(
        x,
        kernel,
        (strides, strides),
        ((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
    )
  return _shifted_depthwise_conv(x, kernel, strides, padding)


def _accumulation_dtype(dtype):
  return jnp.promote_types(dtype, jnp.float32)


def _pad_spatial(x, padding: int):
  return jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))


def _window(padded, i: int, j: int, out_h: int, out_w: int, strides: int):
  """What tap (i, j) sees: padded[:, i + strides * h, j + strides * w, :], h < out_h, w < out_w."""
  batch, _, _, channels = padded.shape
  return lax.slice(
      padded,
      (0, i, j, 0),
      (batch, i + (out_h - 1) * strides + 1, j + (out_w - 1) * strides + 1, channels),
      (1, strides, strides, 1),
  )


def _correlate(padded, weights, strides: int):
  """Sum over the taps (i, j) of weights[i, j] times the window tap (i, j) sees in `padded`."""
  kernel_h, kernel_w = weights.shape[:2]
  out_h = (padded.shape[1] - kernel_h) // strides + 1
  out_w = (padded.shape[2] - kernel_w) // strides + 1
  return functools.reduce(
      operator.add,
      (
          _window(padded, i, j, out_h, out_w, strides) * weights[i, j]
          for i in range(kernel_h)
          for j in range(kernel_w)
      ),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _shifted_depthwise_conv(x, kernel, strides: int, padding: int):
  # Cast before the taps, so that sums run in float32 and round once for lower precisions.
  accumulate = _accumulation_dtype(x.dtype)
  padded = _pad_spatial(x.astype(accumulate), padding)
  return _correlate(padded, kernel[:, :, 0].astype(accumulate), strides).astype(x.dtype)


def _shifted_depthwise_conv_fwd(x, kernel, strides, padding):
  return _shifted_depthwise_conv(x, kernel, strides, padding), (x, kernel)


def _shifted_depthwise_conv_bwd(strides, padding, residuals, cotangent):
  """Gradients written out: autodiff's would sum kh*kw padded copies of the cotangent.

  Where the input gradient feeds several fusions (BatchNorm's and PReLU's backward), XLA:CPU
  writes each of those copies to memory rather than their sum. Here the input gradient is the
  transposed convolution, itself a shifted sum: the cotangent dilated by the stride, padded
  back to the input's size and correlated with the flipped kernel. The kernel gradient is
  summed image by image (a scan over one image of each device's share of the batch at a time,
  convolution.scan_over_batch): each tap's product with the cotangent reduced over the whole
  batch at once read the batch from memory kh*kw times, and XLA:CPU's reductions that keep the
  channel axis are slow; one image's taps stay in cache (MobileFaceNet's fwd+bwd: see
  "Full train step" in benchmarks/README.md).
  """
  x, kernel = residuals
  kernel_h, kernel_w = kernel.shape[:2]
  accumulate = _accumulation_dtype(x.dtype)
  cotangent = cotangent.astype(accumulate)
  weights = kernel[:, :, 0].astype(accumulate)
  (_, out_h, out_w, _), (_, height, width, _) = cotangent.shape, x.shape
  dilated = lax.pad(
      cotangent,
      jnp.zeros((), accumulate),
      (
          (0, 0, 0),
          (*convolution.transposed_padding(kernel_h, padding, height, out_h, strides), strides - 1),
          (*convolution.transposed_padding(kernel_w, padding, width, out_w, strides), strides - 1),
          (0, 0, 0),
      ),
  )
  x_grad = _correlate(dilated, weights[::-1, ::-1], 1)
  padded = _pad_spatial(x.astype(accumulate), padding)

  def add_images(total, group):
    images_padded, images_cotangent = group
    taps = [
        jnp.sum(_window(images_padded, i, j, out_h, out_w, strides) * images_cotangent, (0, 1, 2))
        for i in range(kernel_h)
        for j in range(kernel_w)
    ]
    return total + jnp.stack(taps)

  # One image of each device's share of the batch at a time.
  kernel_grad = convolution.scan_over_batch(
      add_images, jnp.zeros((kernel_h * kernel_w, x.shape[3]), accumulate), [padded, cotangent], 1
  )
  return x_grad.astype(x.dtype), kernel_grad.reshape(kernel.shape).astype(kernel.dtype)


_shifted_depthwise_conv.defvjp(_shifted_depthwise_conv_fwd, _shifted_depthwise_conv_bwd)


class DepthwiseConv(nn.Module):
  """Bias-free depthwise convolution with nn.Conv(C, ..., feature_group_count=C)'s parameters.

  Its only parameter, 'kernel' [kh, kw, 1, C] (float32, CONV_INIT), has the name, shape and
  initial value of the nn.Conv layer it replaces, so parameter trees and checkpoints are those
  of nn.Conv. It computes depthwise_conv in the implementation of the depthwise_implementation
  context, chosen when it is traced: by default the shifted form on the CPU and
  lax.conv_general_dilated elsewhere, where cuDNN and XLA:TPU have fast depthwise kernels.

  Attributes:
    kernel_size: (kh, kw).
    strides: stride along both spatial axes.
    padding: zero rows (columns) added before and after each spatial axis (0: VALID).
    dtype: compute dtype; the kernel is cast to it, as nn.Conv does.
  """

  kernel_size: tuple[int, int]
  strides: int = 1
  padding: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", CONV_INIT, (*self.kernel_size, 1, x.shape[-1]), jnp.float32)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    return depthwise_conv(x, kernel, self.strides, self.padding)


class Bottleneck(nn.Module):
  """MobileNetV2 linear bottleneck with PReLU: 1x1 expand, 3x3 depthwise, linear 1x1 project."""

  features: int
  expansion: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    conv = conv_layer(self.dtype)
    norm = batch_norm(train, self.dtype)
    hidden = x.shape[-1] * self.expansion
    y = conv(hidden, (1, 1), name="expand_conv")(x)
    y = norm(name="expand_bn")(y, prelu=PReLU(name="expand_prelu"))
    y = DepthwiseConv((3, 3), self.strides, padding=1, dtype=self.dtype, name="depthwise_conv")(y)
    y = norm(name="depthwise_bn")(y, prelu=PReLU(name="depthwise_prelu"))
    y = conv(self.features, (1, 1), name="project_conv")(y)
    y = norm(name="project_bn")(y)
    if self.strides == 1 and x.shape[-1] == self.features:
      y = x + y
    return y


class MobileFaceNet(nn.Module):
  """MobileFaceNet of Chen et al. 2018 (the paper's embedding is 128-d; 512 here by default).

  Attributes:
    embedding_dim: size of the returned (not L2-normalised) embedding.
    dropout_rate: dropout before the embedding projection (the paper uses none: default 0).
    dtype: compute dtype of the body (jnp.float32 or jnp.bfloat16); parameters stay float32.
    stem_width: channels of the two stem convolutions (the paper's 64).
    stem_groups: groups of the second, 3x3 stem convolution; None (the paper) gives one per
      channel, a depthwise convolution ("stem_depthwise_*" layers); fewer give a grouped
      convolution ("stem_grouped_*" layers), which XLA:CPU runs slowly (see DepthwiseConv).
    bottlenecks: (expansion factor, output channels, repeats, first stride) per group of
      bottleneck units: BOTTLENECKS (the paper) or MBF_BOTTLENECKS.
  """

  embedding_dim: int = 512
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  stem_width: int = 64
  stem_groups: int | None = None
  bottlenecks: Sequence[tuple[int, int, int, int]] = BOTTLENECKS

  @nn.compact
  def __call__(self, images, train: bool = False):
    check_images(images)
    conv = conv_layer(self.dtype)
    norm = batch_norm(train, self.dtype)
    x = images.astype(self.dtype)
    groups = self.stem_width if self.stem_groups is None else self.stem_groups
    if groups < 1 or self.stem_width % groups:
      raise ValueError(
          f"stem_groups {groups} does not divide stem_width {self.stem_width}; pick a divisor."
      )
    x = conv(self.stem_width, (3, 3), strides=2, padding=1, name="stem_conv")(x)
    x = norm(name="stem_bn")(x, prelu=PReLU(name="stem_prelu"))
    if groups == self.stem_width:
      x = DepthwiseConv((3, 3), padding=1, dtype=self.dtype, name="stem_depthwise_conv")(x)
      x = norm(name="stem_depthwise_bn")(x, prelu=PReLU(name="stem_depthwise_prelu"))
    else:
      x = conv(
          self.stem_width,
          (3, 3),
          padding=1,
          feature_group_count=groups,
          name="stem_grouped_conv",
      )(x)
      x = norm(name="stem_grouped_bn")(x, prelu=PReLU(name="stem_grouped_prelu"))
    index = 0
    for expansion, features, repeats, strides in self.bottlenecks:
      for repeat in range(repeats):
        index += 1
        x = Bottleneck(
            features,
            expansion,
            strides if repeat == 0 else 1,
            self.dtype,
            name=f"bottleneck{index}",
        )(x, train)
    x = conv(512, (1, 1), name="expand_conv")(x)
    x = norm(name="expand_bn")(x, prelu=PReLU(name="expand_prelu"))
    # Linear GDConv: one depthwise kernel spanning the whole remaining map, no nonlinearity.
    x = DepthwiseConv(x.shape[1:3], dtype=self.dtype, name="gdconv")(x)
    x = norm(name="gdconv_bn")(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    # Linear 1x1 convolution on the 1x1 map == a dense layer without bias, run in float32.
    x = x.reshape(x.shape[0], -1).astype(jnp.float32)
    x = nn.Dense(self.embedding_dim, use_bias=False, dtype=jnp.float32, name="embedding")(x)
    # Scale fixed at 1, as in the iResNet "E" head (insightface fixes gamma of this BN too).
    return batch_norm(train, jnp.float32, use_scale=False)(name="embedding_bn")(x)
