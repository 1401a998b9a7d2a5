"""The backbones' convolution, rewritten on the CPU where XLA:CPU differentiates it slowly.

`conv_general_dilated` is a drop-in for lax.conv_general_dilated (nn.Conv's
`conv_general_dilated=` attribute) with the same values and gradients. On the CPU backend, for a
2-D NHWC x HWIO convolution without dilation or groups, it takes two forms that XLA:CPU runs
several times faster in the backward pass; everything else, and every other backend (cuDNN and
XLA:TPU differentiate these well), is lax's own. Figures: `python -m benchmarks.bench_conv_backward`
("xla bwd" against "adam bwd", input and kernel gradients of one layer of the tiny iResNet,
batch 64), 2026-12-01, benchmarks/README.md.

* A 1x1 kernel without padding (iResNet's stride-2 shortcut, MobileFaceNet's expand and project
  layers) is a matrix product over the channels of the input, subsampled first where strided
  (`pointwise_conv`). XLA:CPU computes a 1x1 convolution's kernel gradient as a convolution,
  several times slower than the matrix product autodiff gives here (the shortcut: 42.6 ms
  against 12.0).
* A strided kernel larger than its stride (the 3x3 stride-2 convolution that opens each iResNet
  stage, MobileFaceNet's stem) keeps XLA's forward pass and kernel gradient, and takes its input
  gradient by phases (`strided_conv`). JAX's input gradient of a stride-s convolution is a
  convolution of the cotangent dilated by s (`lhs_dilation`), which XLA:CPU runs up to 8x slower
  than the forward pass (the first stage's: 86.0 ms against 43.2 for the whole backward, of
  which the kernel gradient, the same in both, is 36.0).

The phases need no dilation. Along one axis, input pixel i gets the cotangent of output o through
tap k exactly when s*o + k = i + pad_low; writing i + pad_low = s*q + r (0 <= r < s), the taps
that reach it are k = r + s*j, from outputs o = q - j. So the pixels of phase r are a stride-1
correlation of the cotangent with the taps r, r + s, r + 2s, ... of the kernel, flipped.
`phase_input_gradient` runs all s*s phases (both axes) as one stride-1 convolution whose output
channels are the phases' (kernels zero-padded to ceil(k/s) taps), then interleaves the phases
back into rows and columns ("depth to space"). Its work is the forward pass's, times
(s*ceil(k/s)/k)^2 for the padding taps (16/9 for 3x3, stride 2). A 1x1 strided kernel is not
taken by phases (one of its s*s phases is non-zero) but as a matrix product.

Tried and not kept (bench_conv_backward's other columns): the kernel gradient as matrix products
over patches, shifted windows or an explicit im2col loses at the large 112x112 and 56x56 maps,
where the time is; so does the whole strided convolution as a stride-1 one over the input's
space-to-depth rearrangement (ad hoc: XLA:CPU's rearrangement cost more than it saved).
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp

_NHWC = lax.ConvDimensionNumbers(
    lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2)
)


def _conv(x, kernel, strides, padding, precision):
  return lax.conv_general_dilated(
      x, kernel, strides, padding, dimension_numbers=_NHWC, precision=precision
  )


def phase_input_gradient(input_shape, kernel, cotangent, strides, padding, precision=None):
  """The input gradient of an NHWC x HWIO convolution, as one stride-1 convolution by phases.

  Args:
    input_shape: the input's shape [B, H, W, C_in].
    kernel: the kernel [kh, kw, C_in, C_out].
    cotangent: the cotangent of the output [B, H_out, W_out, C_out].
    strides: (sh, sw).
    padding: ((low, high), (low, high)) of the forward pass, each >= 0.
    precision: lax precision of the convolution.

  Returns:
    The gradient with respect to the input, [B, H, W, C_in], in the input's spatial layout.
  """
  batch, height, width, in_channels = input_shape
  out_channels = kernel.shape[3]
  # Per axis: taps a phase takes (j), phases' rows needed to cover the input (q).
  taps = [-(-size // stride) for size, stride in zip(kernel.shape[:2], strides)]
  rows = [
      -(-(size + low) // stride)
      for size, (low, _), stride in zip((height, width), padding, strides)
  ]
  (sh, sw), (jh, jw) = strides, taps
  # Kernel tap r + s*j sits at [j, r] once zero-padded to j*s taps a side; flipped in j (the
  # cotangent pixel q - j meets tap j), transposed to [j_h, j_w, C_out, (r_h, r_w, C_in)].
  padded = jnp.pad(
      kernel, ((0, jh * sh - kernel.shape[0]), (0, jw * sw - kernel.shape[1]), (0, 0), (0, 0))
  )
  phases = padded.reshape(jh, sh, jw, sw, in_channels, out_channels)[::-1, :, ::-1]
  phases = phases.transpose(0, 2, 5, 1, 3, 4).reshape(jh, jw, out_channels, sh * sw * in_channels)
  # Phase row q reads cotangent rows q - j + 1 ... q: j - 1 zero rows before; rows after up to q.
  conv_padding = [
      (tap - 1, max(row - size, 0)) for tap, row, size in zip(taps, rows, cotangent.shape[1:3])
  ]
  by_phase = lax.conv_general_dilated(
      cotangent, phases, (1, 1), conv_padding, dimension_numbers=_NHWC, precision=precision
  )[:, : rows[0], : rows[1]]
  # Depth to space: pixel s*q + r of the padded input is phase r's row q.
  interleaved = by_phase.reshape(batch, rows[0], rows[1], sh, sw, in_channels)
  interleaved = interleaved.transpose(0, 1, 3, 2, 4, 5).reshape(
      batch, rows[0] * sh, rows[1] * sw, in_channels
  )
  (top, _), (left, _) = padding
  return interleaved[:, top : top + height, left : left + width]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def strided_conv(x, kernel, strides, padding, precision=None):
  """lax.conv_general_dilated (NHWC x HWIO), its input gradient taken by phase_input_gradient."""
  return _conv(x, kernel, strides, padding, precision)


def _strided_conv_fwd(x, kernel, strides, padding, precision):
  return _conv(x, kernel, strides, padding, precision), (x, kernel)


def _strided_conv_bwd(strides, padding, precision, residuals, cotangent):
  x, kernel = residuals
  # XLA's own kernel gradient: rewriting it lost (benchmarks/README.md, bench_conv_backward).
  _, kernel_vjp = jax.vjp(lambda k: _conv(x, k, strides, padding, precision), kernel)
  (kernel_grad,) = kernel_vjp(cotangent)
  x_grad = phase_input_gradient(x.shape, kernel, cotangent, strides, padding, precision)
  return x_grad.astype(x.dtype), kernel_grad


strided_conv.defvjp(_strided_conv_fwd, _strided_conv_bwd)


def pointwise_conv(x, kernel, strides, precision=None):
  """A 1x1 NHWC x HWIO convolution without padding, as one matrix product over the channels.

  The strided form subsamples the input first (output pixel o reads input pixel s*o). Autodiff
  then gives matrix-product gradients, which XLA:CPU runs several times faster than its 1x1
  convolution's kernel gradient (see the module docstring).
  """
  batch, height, width, in_channels = x.shape
  sampled = lax.slice(x, (0, 0, 0, 0), (batch, height, width, in_channels), (1, *strides, 1))
  rows = sampled.reshape(-1, in_channels)
  product = lax.dot(rows, kernel.reshape(in_channels, kernel.shape[3]), precision=precision)
  return product.reshape(*sampled.shape[:3], kernel.shape[3])


def _cpu_rewrite(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
):
  """("pointwise" or "phases", explicit padding) for a convolution XLA:CPU differentiates
  slowly (see the module docstring); None for lax's own. Takes lax.conv_general_dilated's
  arguments."""
  del precision  # The rewrites pass it on.
  if jax.default_backend() != "cpu" or lhs.ndim != 4 or preferred_element_type is not None:
    return None
  if lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != _NHWC:
    return None
  dilations = (*(lhs_dilation or ()), *(rhs_dilation or ()))
  if any(d != 1 for d in dilations) or feature_group_count != 1 or batch_group_count != 1:
    return None
  if isinstance(padding, str):  # "SAME" or "VALID" (nn.Conv's default padding is "SAME").
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  padding = tuple((int(low), int(high)) for low, high in padding)
  if rhs.shape[:2] == (1, 1):
    return ("pointwise", padding) if padding == ((0, 0), (0, 0)) else None
  strided = max(window_strides) > 1 and all(
      size > stride for size, stride in zip(rhs.shape[:2], window_strides)
  )
  if strided and all(low >= 0 and high >= 0 for low, high in padding):
    return "phases", padding
  return None


def conv_general_dilated(lhs, rhs, window_strides, padding, **options):
  """lax.conv_general_dilated (the same arguments), rewritten on the CPU where XLA:CPU
  differentiates it slowly."""
  rewrite = _cpu_rewrite(lhs, rhs, window_strides, padding, **options)
  if rewrite is None:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **options)
  kind, explicit_padding = rewrite
  precision = options.get("precision")
  if kind == "pointwise":
    return pointwise_conv(lhs, rhs, tuple(window_strides), precision)
  return strided_conv(lhs, rhs, tuple(window_strides), explicit_padding, precision)
