"""The backbones' convolution: lax.conv_general_dilated's values and gradients, XLA:CPU's slow
forms rewritten (a 1x1 kernel as a matrix product, a strided input gradient by phases, kernel
gradients as matrix products over patches)."""

import functools
import math
import re

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from adam_face.models import convolution, mobilefacenet

from host_devices import batch_sharded

NHWC = ("NHWC", "HWIO", "NHWC")

# (input [B, H, W, C_in], kernel [kh, kw, C_in, C_out], strides, padding): the backbones'
# layers (3x3 stride 2 with 1 pixel, 1x1 shortcut at stride 2) on even and odd maps, and shapes
# that exercise the phase arithmetic: unequal strides, a 5x5 kernel at stride 3, a kernel that is
# a multiple of its stride, padding on one side only or larger than the kernel, "SAME" strings.
CASES = [
    ((2, 8, 8, 3), (3, 3, 3, 4), (2, 2), ((1, 1), (1, 1))),
    ((2, 9, 7, 3), (3, 3, 3, 4), (2, 2), ((1, 1), (1, 1))),
    ((2, 10, 7, 3), (3, 2, 3, 4), (2, 1), ((1, 1), (0, 1))),
    ((2, 11, 12, 3), (5, 5, 3, 4), (3, 2), ((2, 0), (1, 3))),
    ((2, 8, 8, 3), (4, 4, 3, 4), (2, 2), ((0, 0), (0, 0))),
    ((2, 7, 7, 3), (3, 3, 3, 4), (2, 2), ((0, 5), (4, 0))),
    ((2, 9, 8, 3), (3, 3, 3, 4), (2, 2), "SAME"),
    ((2, 9, 9, 3), (1, 1, 3, 4), (2, 2), ((0, 0), (0, 0))),
    ((2, 8, 7, 3), (1, 1, 3, 4), (1, 1), "SAME"),
    ((2, 8, 7, 3), (1, 1, 3, 4), (3, 2), "VALID"),
    ((2, 8, 8, 3), (3, 3, 3, 4), (1, 1), ((1, 1), (1, 1))),
    ((1, 6, 5, 3), (3, 2, 3, 4), (1, 1), ((2, 0), (0, 1))),
    ((5, 7, 7, 3), (3, 3, 3, 4), (1, 1), "VALID"),
    ((2, 9, 8, 3), (2, 2, 3, 4), (2, 2), ((0, 1), (1, 0))),  # kernel no larger than the stride
    ((2, 9, 10, 3), (2, 3, 3, 4), (2, 3), "SAME"),
]


def value_and_gradients(conv, x, kernel, strides, padding):
  def apply(x, kernel):
    return conv(x, kernel, strides, padding, dimension_numbers=NHWC)

  y, vjp = jax.vjp(apply, x, kernel)
  # A random cotangent, so that every output pixel weighs differently in both gradients.
  cotangent = jax.random.normal(jax.random.key(1, impl="rbg"), y.shape, y.dtype)
  return (y, *vjp(cotangent))


@pytest.fixture
def patch_gradient_everywhere(monkeypatch):
  """patch_kernel_gradient for every kernel, however few its input channels."""
  monkeypatch.setattr(convolution, "PATCH_GRADIENT_MIN_CHANNELS", 1)


@pytest.mark.parametrize("min_channels", [1, convolution.PATCH_GRADIENT_MIN_CHANNELS])
@pytest.mark.parametrize("x_shape, kernel_shape, strides, padding", CASES)
def test_values_and_gradients_match_lax(
    monkeypatch, min_channels, x_shape, kernel_shape, strides, padding
):
  # At the default threshold these 3-channel inputs keep XLA's kernel gradient (strided: with
  # the input gradient by phases); at 1 every kernel gradient is patch_kernel_gradient's.
  monkeypatch.setattr(convolution, "PATCH_GRADIENT_MIN_CHANNELS", min_channels)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=kernel_shape), jnp.float32)
  expected = value_and_gradients(lax.conv_general_dilated, x, kernel, strides, padding)
  actual = value_and_gradients(convolution.conv_general_dilated, x, kernel, strides, padding)
  for name, e, a in zip(("value", "d/dx", "d/dkernel"), expected, actual):
    assert a.shape == e.shape and a.dtype == e.dtype, name
    np.testing.assert_allclose(a, e, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(e))), err_msg=name)


def add_rows(total, group):
  return total + jnp.sum(group[0], axis=0)


@pytest.mark.parametrize("images_per_device", [1, 2, 3, 6])
def test_scan_over_batch_adds_every_image_once(images_per_device):
  # 6 images do not divide among the session's 8 devices: grouped as on one device.
  values = jnp.arange(6 * 5, dtype=jnp.float32).reshape(6, 5) ** 2
  total = convolution.scan_over_batch(add_rows, jnp.zeros(5), [values], images_per_device)
  np.testing.assert_array_equal(total, jnp.sum(values, axis=0))


def test_scan_groups_are_contiguous_blocks_of_every_device_share():
  # 32 images on 8 devices, 2 of each device's 4 a step: group 0 takes images 0-1 of every
  # share, group 1 images 2-3, so that a group is a view of each share, not a strided copy.
  assert jax.device_count() == 8, "tests/conftest.py forces 8 host devices"

  def record(total, group):
    step, seen = total
    return step + 1, seen.at[step].set(group[0])

  _, seen = convolution.scan_over_batch(
      record, (0, jnp.zeros((2, 16), jnp.int32)), [jnp.arange(32)], 2
  )
  shares = np.arange(32).reshape(8, 2, 2)  # [share, group, image]
  np.testing.assert_array_equal(seen, shares.transpose(1, 0, 2).reshape(2, 16))


def test_scan_over_a_sharded_batch_gathers_nothing():
  # A group holds one image of each device's share (4 groups of 8 images): groups of
  # consecutive images of the whole batch would each lie on one device, and GSPMD would gather
  # the whole batch.
  assert jax.device_count() == 8, "tests/conftest.py forces 8 host devices"
  values = batch_sharded(jnp.arange(32 * 5, dtype=jnp.float32).reshape(32, 5) ** 2)
  scan = jax.jit(lambda v: convolution.scan_over_batch(add_rows, jnp.zeros(5), [v], 1))
  program = scan.lower(values).compile().as_text()
  assert "while" in program and "all-gather" not in program
  np.testing.assert_array_equal(scan(values), jnp.sum(values, axis=0))


def test_scan_copies_no_batch_sized_array():
  # 6 images, grouped as on one device, one a step: with its axes of size 1 kept
  # ([1, 6, 1, ...]), XLA:CPU gave the scanned arrays a layout of their own and copied the padded
  # input and the cotangent once more to undo it.
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(6, 16, 16, 32)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 1, 32)), jnp.float32)
  loss = lambda k, x: jnp.sum(jnp.tanh(mobilefacenet.depthwise_conv(x, k, 1, 1, "shifted")) ** 2)
  program = jax.jit(jax.grad(loss)).lower(kernel, x).compile().as_text()
  copies = [
      re.search(r"= \w+\[([\d,]*)\]", line).group(1)
      for line in program.splitlines()
      if " copy(" in line or "calls=%wrapped_copy" in line
  ]
  assert "while" in program
  assert all(math.prod(int(d) for d in shape.split(",") if d) < x.size for shape in copies), copies


@pytest.mark.parametrize("layer", ["patches", "depthwise"])
def test_kernel_gradients_of_a_sharded_batch_gather_nothing(monkeypatch, layer):
  # patch_kernel_gradient (2 images of each device's share a step) and DepthwiseConv's kernel
  # gradient (1) scan a batch of 32 on 8 devices in several steps without gathering it.
  monkeypatch.setattr(convolution, "_PATCH_BYTES_PER_STEP", 1)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(32, 6, 6, 64)), jnp.float32)
  if layer == "patches":
    kernel = jnp.asarray(rng.normal(size=(3, 3, 64, 4)), jnp.float32)
    conv = functools.partial(convolution.conv_general_dilated, dimension_numbers=NHWC)
    reference = functools.partial(lax.conv_general_dilated, dimension_numbers=NHWC)
  else:
    kernel = jnp.asarray(rng.normal(size=(3, 3, 1, 64)), jnp.float32)
    conv = lambda x, k, strides, padding: mobilefacenet.depthwise_conv(
        x, k, strides[0], padding[0][0], "shifted"
    )
    reference = functools.partial(
        lax.conv_general_dilated, dimension_numbers=NHWC, feature_group_count=64
    )

  def kernel_gradient(conv):
    return jax.jit(jax.grad(lambda k, x: jnp.sum(conv(x, k, (1, 1), ((1, 1), (1, 1))) ** 2)))

  sharded = batch_sharded(x)
  program = kernel_gradient(conv).lower(kernel, sharded).compile().as_text()
  assert "while" in program and "all-gather" not in program
  expected = kernel_gradient(reference)(kernel, x)
  np.testing.assert_allclose(
      kernel_gradient(conv)(kernel, sharded),
      expected,
      rtol=0,
      atol=1e-5 * float(jnp.max(jnp.abs(expected))),
  )


@pytest.mark.usefixtures("patch_gradient_everywhere")
@pytest.mark.parametrize("images", [2, 3])
def test_kernel_gradient_over_groups_of_images(monkeypatch, images):
  # patch_kernel_gradient adds the batch up a few images at a time (at least 2); force groups of
  # 2 and 3 images (a batch of 6) so that the scan's sum over several groups is what is compared.
  x_shape = (6, 9, 8, 3)
  # One image's columns: (9 + 2 padding) rows x 8 columns x 3 taps x 3 channels x 4 bytes.
  monkeypatch.setattr(convolution, "_PATCH_BYTES_PER_STEP", images * 11 * 8 * 3 * 3 * 4)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
  for strides in ((1, 1), (2, 2)):
    expected = value_and_gradients(lax.conv_general_dilated, x, kernel, strides, "SAME")
    actual = value_and_gradients(convolution.conv_general_dilated, x, kernel, strides, "SAME")
    np.testing.assert_allclose(
        actual[2], expected[2], rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(expected[2])))
    )
  # The groups are what the scan runs over: batch / images steps (at least 2 images a group).
  program = gradient_program(convolution.conv_general_dilated, (3, 3, 4, 8), (1, 1), "SAME")
  assert "scan" in program


@pytest.mark.usefixtures("patch_gradient_everywhere")
def test_bfloat16_matches_lax_to_its_rounding():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 9, 9, 8)), jnp.bfloat16)
  for kernel_shape, strides, padding in (
      ((3, 3, 8, 4), (2, 2), ((1, 1), (1, 1))),
      ((3, 3, 8, 4), (1, 1), ((1, 1), (1, 1))),
      ((1, 1, 8, 4), (2, 2), "VALID"),
  ):
    kernel = jnp.asarray(rng.normal(size=kernel_shape), jnp.bfloat16)
    expected = value_and_gradients(lax.conv_general_dilated, x, kernel, strides, padding)
    actual = value_and_gradients(convolution.conv_general_dilated, x, kernel, strides, padding)
    for name, e, a in zip(("value", "d/dx", "d/dkernel"), expected, actual):
      assert a.dtype == e.dtype == jnp.bfloat16, name
      e, a = np.asarray(e, np.float32), np.asarray(a, np.float32)
      # A bfloat16 rounding (2^-8) or two of the largest magnitude: the sums run in other orders.
      np.testing.assert_allclose(a, e, rtol=0, atol=1e-2 * np.max(np.abs(e)), err_msg=name)


def gradient_program(conv, kernel_shape, strides, padding, **kwargs):
  """The jaxpr of the input and kernel gradients of conv at a 16x16 input."""
  x = jnp.zeros((2, 16, 16, kernel_shape[2] * kwargs.get("feature_group_count", 1)))
  kernel = jnp.zeros(kernel_shape)

  def loss(x, kernel):
    return jnp.sum(conv(x, kernel, strides, padding, dimension_numbers=NHWC, **kwargs))

  return str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, kernel))


def test_strided_input_gradient_has_no_dilated_convolution_on_the_cpu():
  # The point of the rewrite: lax's input gradient of a strided convolution is a convolution of
  # the cotangent dilated by the stride, the form XLA:CPU runs slowly.
  padding = ((1, 1), (1, 1))
  lax_program = gradient_program(lax.conv_general_dilated, (3, 3, 4, 8), (2, 2), padding)
  assert "lhs_dilation=(2, 2)" in lax_program
  program = gradient_program(convolution.conv_general_dilated, (3, 3, 4, 8), (2, 2), padding)
  assert "lhs_dilation=(2, 2)" not in program
  assert "conv_general_dilated" in program


def convolution_windows(conv, kernel_shape, strides, padding):
  """The window (spatial kernel size) of every convolution in the gradient program of conv."""

  def loss(x, kernel):
    return jnp.sum(conv(x, kernel, strides, padding, dimension_numbers=NHWC))

  closed = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(
      jnp.zeros((2, 16, 16, kernel_shape[2])), jnp.zeros(kernel_shape)
  )
  windows, jaxprs = [], [closed.jaxpr]
  while jaxprs:  # Into scans' bodies and custom VJPs' calls.
    for eqn in jaxprs.pop().eqns:
      for param in eqn.params.values():
        for value in param if isinstance(param, tuple) else (param,):
          jaxpr = getattr(value, "jaxpr", value)  # A ClosedJaxpr's Jaxpr, or a Jaxpr.
          if hasattr(jaxpr, "eqns"):
            jaxprs.append(jaxpr)
      if eqn.primitive.name == "conv_general_dilated":
        rhs_spec = eqn.params["dimension_numbers"].rhs_spec
        windows.append(tuple(eqn.invars[1].aval.shape[d] for d in rhs_spec[2:]))
  return windows


@pytest.mark.parametrize("strides", [(1, 1), (2, 2)])
def test_wide_kernel_gradient_is_no_convolution_on_the_cpu(strides):
  # lax's kernel gradient is a convolution whose window is the cotangent's whole map (XLA:CPU
  # runs it after transposing both operands, batch innermost); from PATCH_GRADIENT_MIN_CHANNELS
  # input channels the rewrite has only the forward pass and the input gradient as
  # convolutions, each with a window of kernel size; below, XLA's kernel gradient stays.
  padding = ((1, 1), (1, 1))
  wide = (3, 3, convolution.PATCH_GRADIENT_MIN_CHANNELS, 8)
  lax_windows = convolution_windows(lax.conv_general_dilated, wide, strides, padding)
  assert any(window[0] > 3 for window in lax_windows)
  windows = convolution_windows(convolution.conv_general_dilated, wide, strides, padding)
  assert len(windows) == 2 and all(window[0] <= 3 for window in windows), windows
  narrow = (3, 3, convolution.PATCH_GRADIENT_MIN_CHANNELS - 1, 8)
  windows = convolution_windows(convolution.conv_general_dilated, narrow, strides, padding)
  assert any(window[0] > 3 for window in windows), windows


def test_pointwise_convolution_is_a_matrix_product_on_the_cpu():
  program = gradient_program(convolution.conv_general_dilated, (1, 1, 4, 8), (2, 2), "VALID")
  assert "conv_general_dilated" not in program and "dot_general" in program


@pytest.mark.parametrize(
    "kernel_shape, strides, padding, kwargs",
    [
        ((3, 3, 2, 8), (2, 2), ((1, 1), (1, 1)), {"feature_group_count": 2}),
        ((3, 3, 4, 8), (2, 2), ((1, 1), (1, 1)), {"rhs_dilation": (2, 2)}),
        ((1, 1, 4, 8), (1, 1), ((1, 1), (1, 1)), {}),  # a padded 1x1 kernel
        ((3, 3, 4, 8), (2, 2), ((-1, 1), (1, 1)), {}),  # negative padding
        # stride 1, fewer input channels than PATCH_GRADIENT_MIN_CHANNELS
        ((3, 3, convolution.PATCH_GRADIENT_MIN_CHANNELS - 1, 8), (1, 1), ((1, 1), (1, 1)), {}),
    ],
)
def test_other_convolutions_are_lax_own(kernel_shape, strides, padding, kwargs):
  expected = gradient_program(lax.conv_general_dilated, kernel_shape, strides, padding, **kwargs)
  actual = gradient_program(
      convolution.conv_general_dilated, kernel_shape, strides, padding, **kwargs
  )
  assert actual == expected


def test_other_backends_keep_lax_own(monkeypatch):
  # cuDNN and XLA:TPU differentiate strided and 1x1 convolutions well: no rewrite there.
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  for kernel_shape, padding in (((3, 3, 4, 8), ((1, 1), (1, 1))), ((1, 1, 4, 8), "VALID")):
    expected = gradient_program(lax.conv_general_dilated, kernel_shape, (2, 2), padding)
    actual = gradient_program(convolution.conv_general_dilated, kernel_shape, (2, 2), padding)
    assert actual == expected
