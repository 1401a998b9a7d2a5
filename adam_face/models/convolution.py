"""The backbones' convolution, rewritten on the CPU where XLA:CPU differentiates it slowly.

`conv_general_dilated` is a drop-in for lax.conv_general_dilated (nn.Conv's
`conv_general_dilated=` attribute) with the same values and gradients. On the CPU backend, for a
2-D NHWC x HWIO convolution without dilation or groups, it takes three forms that XLA:CPU runs
faster in the backward pass; everything else, and every other backend (cuDNN and XLA:TPU
differentiate these well), is lax's own. Figures: `python -m benchmarks.bench_conv_backward`
(one layer's input and kernel gradients, "xla bwd" against "adam bwd"; `--layers tiny` at
batch 64, `--layers iresnet50` at batch 8) and `python -m benchmarks.bench_train_step
--xla_kernel_gradients` (whole train steps), 2026-12-01, benchmarks/README.md.

* A 1x1 kernel without padding (iResNet's stride-2 shortcut, MobileFaceNet's expand and project
  layers) is a matrix product over the channels of the input, subsampled first where strided
  (`pointwise_conv`). XLA:CPU computes a 1x1 convolution's kernel gradient as a convolution,
  several times slower than the matrix product autodiff gives here (tiny's shortcut: 22.0 ms
  against 2.8).
* A strided kernel larger than its stride (the 3x3 stride-2 convolution that opens each iResNet
  stage, MobileFaceNet's stem) takes its input gradient by phases (`phase_input_gradient`).
  JAX's input gradient of a stride-s convolution is a convolution of the cotangent dilated by s
  (`lhs_dilation`), which XLA:CPU runs up to 8x slower than the forward pass (tiny's first
  stage: 81.4 ms against 36.7 for the whole backward).
* A kernel with at least PATCH_GRADIENT_MIN_CHANNELS input channels (every 3x3 layer but the
  RGB stems) takes its kernel gradient as matrix products over image
  patches, a few images at a time (`patch_kernel_gradient`). XLA:CPU's kernel gradient is a
  convolution whose window is the whole cotangent map, run after transposing both operands to
  put the batch innermost (iresnet50's layers: 674 ms of kernel gradients against 300; the
  train steps of iresnet18 and iresnet50 1.19-1.28x and 1.13-1.20x faster in two runs; tiny's
  1.02-1.16x in three).

The phases need no dilation. Along one axis, input pixel i gets the cotangent of output o through
tap k exactly when s*o + k = i + pad_low; writing i + pad_low = s*q + r (0 <= r < s), the taps
that reach it are k = r + s*j, from outputs o = q - j. So the pixels of phase r are a stride-1
correlation of the cotangent with the taps r, r + s, r + 2s, ... of the kernel, flipped.
`phase_input_gradient` runs all s*s phases (both axes) as one stride-1 convolution whose output
channels are the phases' (kernels zero-padded to ceil(k/s) taps), then interleaves the phases
back into rows and columns ("depth to space"). Its work is the forward pass's, times
(s*ceil(k/s)/k)^2 for the padding taps (16/9 for 3x3, stride 2). A 1x1 strided kernel is not
taken by phases (one of its s*s phases is non-zero) but as a matrix product.

Tried and not kept: the kernel gradient as one matrix product over the whole batch's patches,
shifted windows or an explicit im2col (bench_conv_backward's other columns) loses at the large
112x112 and 56x56 maps, where the time is; taking the patches a few images at a time is what
wins there. The whole strided convolution
as a stride-1 one over the input's space-to-depth rearrangement lost too (ad hoc: XLA:CPU's
rearrangement cost more than it saved).
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


def scan_over_batch(add_group, init, arrays, images_per_device):
  """lax.scan of add_group(total, group) over the batch of `arrays` (each [B, ...]), in groups.

  A group holds up to `images_per_device` consecutive images of every device's share of the
  batch: with d devices, shares of m images and n groups of k = m/n, group g is images
  s*m + g*k ... s*m + g*k + k - 1 of every share s. The train step shards the batch over every
  device (classifier.create_mesh); groups of consecutive images of the whole batch would each
  lie on one device, and GSPMD would gather the whole batch onto every device to scan it. Within
  a share a group is one contiguous block, a view of the batch: with groups taken at a stride
  across the batch (images g, g + n, g + 2n, ..., until 2026-12-01), tiny's compiled step wrote
  each scanned array out once more, in group order, before the loop. (A batch that does not
  divide among the devices is grouped as on one device.)

  Args:
    add_group: (total, [group of each array, [images, ...]]) -> total.
    init: the initial total.
    arrays: arrays with the same leading (batch) dimension.
    images_per_device: the most images of one device's share in a group (at least 1).

  Returns:
    The total after every group.
  """
  batch = arrays[0].shape[0]
  devices = jax.device_count() if batch % jax.device_count() == 0 else 1
  share = batch // devices
  per_device = max(d for d in range(1, min(images_per_device, share) + 1) if share % d == 0)
  groups = share // per_device
  # Sliced from [devices, share, ...], or from the batch itself on one device. Reshaped into
  # [groups, images, ...], the scanned arrays were written out once more: XLA:CPU recomputed the
  # BatchNorm in front of tiny's first layer into the new shape rather than read the forward
  # pass's output, and gave axes of size 1 a layout of their own, copied back (benchmarks/
  # profile_train_step.py shows such copies).
  axis = 0 if devices == 1 else 1
  blocks = [a if devices == 1 else a.reshape(devices, share, *a.shape[1:]) for a in arrays]

  def step(total, index):
    group = [
        lax.dynamic_slice_in_dim(block, index * per_device, per_device, axis).reshape(
            devices * per_device, *array.shape[1:]
        )
        for block, array in zip(blocks, arrays)
    ]
    return add_group(total, group), None

  return lax.scan(step, init, jnp.arange(groups))[0]


# Images per step of patch_kernel_gradient's scan: as many as keep one step's column windows
# within this many bytes, so that they are still in cache for the matrix products that read them.
# Chosen by an ad-hoc sweep over tiny's and iresnet50's layers on the development machine (2 MB
# of L2 a core): much larger groups ran slower at 112x112, and so did single images, where the
# loop's own cost shows.
_PATCH_BYTES_PER_STEP = 4 << 20


def patch_kernel_gradient(x, cotangent, kernel_shape, strides, padding, precision=None):
  """The kernel gradient of an NHWC x HWIO convolution, as matrix products over image patches.

  A scan takes the batch a few images at a time (`_PATCH_BYTES_PER_STEP`, `scan_over_batch`):
  it pads them and lays the kw column windows that the kernel's taps see side by side along the
  channels ([images, H_pad, W_out, kw*C_in], a one-axis im2col); the window of kernel row i is
  then every stride-th row of that from row i, and the kernel's row i of the gradient is one
  matrix product of the cotangent ([pixels, C_out]) with it ([pixels, kw*C_in]). The sums over
  the groups of images run in float32.

  Args:
    x: the input [B, H, W, C_in].
    cotangent: the cotangent of the output [B, H_out, W_out, C_out].
    kernel_shape: (kh, kw, C_in, C_out).
    strides: (sh, sw).
    padding: ((low, high), (low, high)) of the forward pass, each >= 0.
    precision: lax precision of the matrix products.

  Returns:
    The gradient with respect to the kernel, float32 [kh, kw, C_in, C_out].
  """
  kh, kw, in_channels, out_channels = kernel_shape
  height = x.shape[1]
  _, out_h, out_w, _ = cotangent.shape
  (sh, sw), ((top, bottom), (left, right)) = strides, padding
  padded_h = height + top + bottom
  bytes_per_image = padded_h * out_w * kw * in_channels * x.dtype.itemsize

  def add_group(total, group):
    inputs, cotangents = group
    images = inputs.shape[0]
    cotangents = cotangents.reshape(-1, out_channels)
    # Padded here, a group at a time, rather than the whole batch up front: the padded copy
    # stays in cache for the windows that read it.
    inputs = jnp.pad(inputs, ((0, 0), (top, bottom), (left, right), (0, 0)))
    columns = jnp.concatenate(
        [
            lax.slice(
                inputs,
                (0, 0, j, 0),
                (images, padded_h, j + sw * (out_w - 1) + 1, in_channels),
                (1, 1, sw, 1),
            )
            for j in range(kw)
        ],
        axis=-1,
    )
    rows = []
    for i in range(kh):
      window = lax.slice(
          columns,
          (0, i, 0, 0),
          (images, i + sh * (out_h - 1) + 1, out_w, kw * in_channels),
          (1, sh, 1, 1),
      )
      # [C_out, kw*C_in]: the cotangent as the left operand ran faster on XLA:CPU than as the
      # right one (an ad-hoc comparison at tiny's 112x112 layer).
      rows.append(
          lax.dot_general(
              cotangents,
              window.reshape(-1, kw * in_channels),
              (((0,), (0,)), ((), ())),
              precision=precision,
              preferred_element_type=jnp.float32,
          )
      )
    return total + jnp.stack(rows)

  total = scan_over_batch(
      add_group,
      jnp.zeros((kh, out_channels, kw * in_channels), jnp.float32),
      [x, cotangent],
      max(2, _PATCH_BYTES_PER_STEP // bytes_per_image),
  )
  return total.reshape(kh, out_channels, kw, in_channels).transpose(0, 2, 3, 1)


# Input channels from which the kernel gradient is taken by patch_kernel_gradient
# (`bench_train_step --xla_kernel_gradients [--patch_gradient_min_channels=N]`,
# benchmarks/README.md). The train steps of iResNet-18 and -50 (64 to 512 channels) ran
# 1.13-1.28x faster with it on an Intel Xeon, iresnet18's 1.02x (two runs) on an AMD EPYC.
# tiny's (8 to 64 channels) ran 1.02x, 1.16x and 1.05x faster with it from 4 channels in three
# runs on the EPYC, once its steps no longer paid page faults for their temporaries
# (adam_face/host_memory.py; with them, eight runs had printed 0.92-1.04x and the threshold had
# stayed at 64). From 1 channel, the RGB stems too: tiny 1.14x, MobileFaceNet (whose stem is its
# only layer under 4 channels) 0.89x in one run; the stems keep XLA's own.
PATCH_GRADIENT_MIN_CHANNELS = 4


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def cpu_conv(x, kernel, strides, padding, precision=None):
  """lax.conv_general_dilated (NHWC x HWIO) with the gradients XLA:CPU runs faster: the input's
  by phase_input_gradient where strided; the kernel's by patch_kernel_gradient from
  PATCH_GRADIENT_MIN_CHANNELS input channels, XLA's own below."""
  return _conv(x, kernel, strides, padding, precision)


def _cpu_conv_fwd(x, kernel, strides, padding, precision):
  return _conv(x, kernel, strides, padding, precision), (x, kernel)


def _cpu_conv_bwd(strides, padding, precision, residuals, cotangent):
  x, kernel = residuals
  if kernel.shape[2] >= PATCH_GRADIENT_MIN_CHANNELS:
    kernel_grad = patch_kernel_gradient(x, cotangent, kernel.shape, strides, padding, precision)
  else:
    _, kernel_vjp = jax.vjp(lambda k: _conv(x, k, strides, padding, precision), kernel)
    (kernel_grad,) = kernel_vjp(cotangent)
  if _by_phases(kernel.shape, strides):
    x_grad = phase_input_gradient(x.shape, kernel, cotangent, strides, padding, precision)
  else:
    # lax's own input gradient, written out (at stride 1 XLA:CPU runs it about as fast as the
    # forward pass): the cotangent, dilated by the strides, correlated with the kernel flipped
    # and transposed.
    flipped = jnp.swapaxes(kernel[::-1, ::-1], 2, 3)
    mirrored = [
        transposed_padding(k, low, size, out, stride)
        for k, (low, _), size, out, stride in zip(
            kernel.shape, padding, x.shape[1:3], cotangent.shape[1:3], strides
        )
    ]
    x_grad = lax.conv_general_dilated(
        cotangent,
        flipped,
        (1, 1),
        mirrored,
        lhs_dilation=strides,
        dimension_numbers=_NHWC,
        precision=precision,
    )
  return x_grad.astype(x.dtype), kernel_grad.astype(kernel.dtype)


cpu_conv.defvjp(_cpu_conv_fwd, _cpu_conv_bwd)


def transposed_padding(kernel_size, low, size, out_size, stride) -> tuple[int, int]:
  """Along one axis, the (low, high) padding of a convolution's input gradient taken as the
  correlation of the cotangent, dilated by the stride, with the flipped kernel: the forward
  padding mirrored, up to the input's last pixel (`size` of them; `out_size` outputs; `low`, the
  forward pass's low padding)."""
  return kernel_size - 1 - low, size + low - (out_size - 1) * stride - 1


def _by_phases(kernel_shape, strides) -> bool:
  """Whether the input gradient is taken by phases: strided, every kernel side above its stride."""
  return max(strides) > 1 and all(size > stride for size, stride in zip(kernel_shape[:2], strides))


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
  """("pointwise" or "custom", explicit padding) for a convolution XLA:CPU differentiates
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
  wide = rhs.shape[2] >= PATCH_GRADIENT_MIN_CHANNELS
  if (wide or _by_phases(rhs.shape, window_strides)) and min(sum(padding, ())) >= 0:
    return "custom", padding
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
  return cpu_conv(lhs, rhs, tuple(window_strides), explicit_padding, precision)
