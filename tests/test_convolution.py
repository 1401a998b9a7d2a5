"""The backbones' convolution: lax.conv_general_dilated's values and gradients, XLA:CPU's slow
forms rewritten (a 1x1 kernel as a matrix product, a strided input gradient by phases)."""

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from adam_face.models import convolution

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
    ((2, 8, 8, 3), (3, 3, 3, 4), (1, 1), ((1, 1), (1, 1))),  # lax's own, unchanged
]


def value_and_gradients(conv, x, kernel, strides, padding):
  def apply(x, kernel):
    return conv(x, kernel, strides, padding, dimension_numbers=NHWC)

  y, vjp = jax.vjp(apply, x, kernel)
  # A random cotangent, so that every output pixel weighs differently in both gradients.
  cotangent = jax.random.normal(jax.random.key(1, impl="rbg"), y.shape, y.dtype)
  return (y, *vjp(cotangent))


@pytest.mark.parametrize("x_shape, kernel_shape, strides, padding", CASES)
def test_values_and_gradients_match_lax(x_shape, kernel_shape, strides, padding):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=kernel_shape), jnp.float32)
  expected = value_and_gradients(lax.conv_general_dilated, x, kernel, strides, padding)
  actual = value_and_gradients(convolution.conv_general_dilated, x, kernel, strides, padding)
  for name, e, a in zip(("value", "d/dx", "d/dkernel"), expected, actual):
    assert a.shape == e.shape and a.dtype == e.dtype, name
    np.testing.assert_allclose(a, e, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(e))), err_msg=name)


def test_bfloat16_matches_lax_to_its_rounding():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 9, 9, 8)), jnp.bfloat16)
  for kernel_shape, padding in (((3, 3, 8, 4), ((1, 1), (1, 1))), ((1, 1, 8, 4), "VALID")):
    kernel = jnp.asarray(rng.normal(size=kernel_shape), jnp.bfloat16)
    expected = value_and_gradients(lax.conv_general_dilated, x, kernel, (2, 2), padding)
    actual = value_and_gradients(convolution.conv_general_dilated, x, kernel, (2, 2), padding)
    for name, e, a in zip(("value", "d/dx", "d/dkernel"), expected, actual):
      assert a.dtype == e.dtype == jnp.bfloat16, name
      e, a = np.asarray(e, np.float32), np.asarray(a, np.float32)
      # A bfloat16 rounding (2^-8) or two of the largest magnitude: the sums run in other orders.
      np.testing.assert_allclose(a, e, rtol=0, atol=1e-2 * np.max(np.abs(e)), err_msg=name)


def gradient_program(conv, kernel_shape, strides, padding, **kwargs):
  """The jaxpr of the input and kernel gradients of conv at a 16x16x4 input."""
  x = jnp.zeros((2, 16, 16, 4))
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
