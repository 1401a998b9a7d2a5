"""Tests of adam_face.models.normalization: the train-mode BatchNorm(+PReLU) with a written-out
gradient against autodiff of flax's nn.BatchNorm followed by a per-channel PReLU, and the module's
variables, statistics and inference mode against flax's."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adam_face.models import normalization

from host_devices import batch_sharded


def flax_batch_norm_prelu(x, scale, bias, slope, epsilon, dtype):
  """flax's own nn.BatchNorm in train mode, then a per-channel PReLU; with momentum 0 the updated
  running averages are the batch's statistics, returned as batch_norm_prelu returns them."""
  channels = x.shape[-1]
  variables = {
      "params": {"scale": scale, "bias": bias},
      "batch_stats": {"mean": jnp.zeros(channels), "var": jnp.ones(channels)},
  }
  bn = nn.BatchNorm(use_running_average=False, momentum=0.0, epsilon=epsilon, dtype=dtype)
  y, state = bn.apply(variables, x, mutable=["batch_stats"])
  if slope is not None:
    y = jnp.where(y >= 0, y, slope.astype(y.dtype) * y)
  return y, state["batch_stats"]["mean"], state["batch_stats"]["var"]


def loss_of(function, x, scale, bias, slope, weights, dtype):
  """A loss that uses all three outputs, so their cotangents all reach the backward pass."""
  output, mean, variance = function(x, scale, bias, slope, normalization.BN_EPSILON, dtype)
  return (
      jnp.sum(output.astype(jnp.float32) * weights)
      + jnp.sum(jnp.sin(mean))
      + jnp.sum(variance * jnp.arange(variance.size))
  )


def inputs(shape, dtype, key=0, offset=0.5):
  keys = jax.random.split(jax.random.key(key), 5)
  channels = shape[-1]
  x = (2.0 * jax.random.normal(keys[0], shape) + offset).astype(dtype)
  weights = jax.random.normal(keys[1], shape)
  scale = 1.0 + 0.3 * jax.random.normal(keys[2], (channels,))
  bias = 0.2 * jax.random.normal(keys[3], (channels,))
  # Slopes of both signs and at 0 and 1, where a derivation that divides by them would break.
  slope = jnp.resize(jnp.array([0.25, -0.3, 0.0, 1.0, 0.7]), (channels,))
  return x, scale, bias, slope, weights


@pytest.mark.parametrize(
    "implementation",
    [normalization.batch_norm_prelu, normalization.batch_norm_prelu_by_autodiff],
    ids=["written_out", "autodiff"],
)
@pytest.mark.parametrize("with_prelu", [True, False])
@pytest.mark.parametrize("shape", [(4, 6, 5, 8), (16, 3)])
def test_gradients_match_autodiff_of_flax(shape, with_prelu, implementation):
  x, scale, bias, slope, weights = inputs(shape, jnp.float32)
  slope = slope if with_prelu else None
  results = []
  for function in (flax_batch_norm_prelu, implementation):
    loss = functools.partial(loss_of, function, dtype=jnp.float32)
    value, grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(x, scale, bias, slope, weights)
    outputs = function(x, scale, bias, slope, normalization.BN_EPSILON, jnp.float32)
    results.append((value, grads, outputs))
  (want_value, want_grads, want_outputs), (value, grads, outputs) = results
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  for got, want in zip(outputs, want_outputs):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert (grads[3] is None) == (not with_prelu)
  for got, want in zip(grads, want_grads):
    if want is not None:
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(want))))


def test_gradients_with_a_large_mean_are_accurate():
  """Channels whose mean is 100 standard deviations from zero (the backward pass centres x rather
  than subtracting mean * sum from sums of x, which would lose digits here)."""
  x, scale, bias, slope, weights = inputs((8, 4, 4, 8), jnp.float32, offset=200.0)
  x64 = jax.tree.map(lambda a: np.asarray(a, np.float64), (x, scale, bias, slope, weights))
  with jax.enable_x64(True):
    loss = functools.partial(loss_of, flax_batch_norm_prelu, dtype=jnp.float64)
    want = jax.grad(loss, argnums=(0, 1, 2, 3))(*x64)
  loss = functools.partial(loss_of, normalization.batch_norm_prelu, dtype=jnp.float32)
  got = jax.grad(loss, argnums=(0, 1, 2, 3))(x, scale, bias, slope, weights)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=2e-3, atol=2e-3 * float(np.max(np.abs(w))))


def test_bfloat16_activations_keep_float32_statistics():
  x, scale, bias, slope, weights = inputs((4, 6, 5, 8), jnp.bfloat16)
  output, mean, variance = normalization.batch_norm_prelu(
      x, scale, bias, slope, normalization.BN_EPSILON, jnp.bfloat16
  )
  assert (output.dtype, mean.dtype, variance.dtype) == (jnp.bfloat16, jnp.float32, jnp.float32)
  loss = functools.partial(loss_of, dtype=jnp.bfloat16)
  got = jax.grad(functools.partial(loss, normalization.batch_norm_prelu))(
      x, scale, bias, slope, weights
  )
  want = jax.grad(functools.partial(loss, flax_batch_norm_prelu))(x, scale, bias, slope, weights)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(
      got.astype(np.float32), want.astype(np.float32), rtol=0.02, atol=0.02 * float(jnp.max(want))
  )


class FlaxLayers(nn.Module):
  """flax's BatchNorm, then the per-channel PReLU the backbones used: the reference layout."""

  train: bool

  @nn.compact
  def __call__(self, x):
    norm = functools.partial(
        nn.BatchNorm,
        use_running_average=not self.train,
        momentum=normalization.BN_MOMENTUM,
        epsilon=normalization.BN_EPSILON,
    )
    x = norm(name="bn")(x)
    slope = self.param("slope", nn.initializers.constant(0.25), (x.shape[-1],), jnp.float32)
    x = normalization.prelu(x, slope)
    return norm(use_scale=False, name="bn_no_scale")(x)


class OwnLayers(nn.Module):
  train: bool

  @nn.compact
  def __call__(self, x):
    norm = normalization.batch_norm(self.train, jnp.float32)
    x = norm(name="bn")(x, prelu=normalization.PReLU(name="prelu_owner"))
    return norm(use_scale=False, name="bn_no_scale")(x)


@pytest.mark.parametrize("written_out", [True, False])
def test_module_has_flax_variables_values_and_statistics(written_out, monkeypatch):
  monkeypatch.setattr(normalization, "WRITTEN_OUT_GRADIENT_ON_CPU", written_out)
  x = jax.random.normal(jax.random.key(1), (6, 5, 4, 8)) * 3.0 + 1.0
  flax_layers, own_layers = FlaxLayers(train=True), OwnLayers(train=True)
  want_vars = flax_layers.init(jax.random.key(0), x)
  got_vars = own_layers.init(jax.random.key(0), x)
  # The same tree but the PReLU's scope: {"bn", "bn_no_scale", "prelu_owner": {"slope"}}.
  slope = want_vars["params"].pop("slope")
  np.testing.assert_array_equal(got_vars["params"].pop("prelu_owner")["slope"], slope)
  assert jax.tree.map(np.shape, got_vars) == jax.tree.map(np.shape, want_vars)
  assert "scale" not in got_vars["params"]["bn_no_scale"]
  jax.tree.map(np.testing.assert_array_equal, got_vars, want_vars)  # init leaves stats alone

  params = jax.tree.map(lambda a: a + 0.1, want_vars["params"])
  params["bn"]["scale"] = params["bn"]["scale"] * jnp.linspace(0.5, 2.0, 8)
  want, want_state = flax_layers.apply(
      {**want_vars, "params": {**params, "slope": slope - 0.4}}, x, mutable=["batch_stats"]
  )
  got, got_state = own_layers.apply(
      {**want_vars, "params": {**params, "prelu_owner": {"slope": slope - 0.4}}},
      x,
      mutable=["batch_stats"],
  )
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6), got_state, want_state)
  own_vars = {**want_vars, "params": {**params, "prelu_owner": {"slope": slope}}}
  program = jax.make_jaxpr(lambda x: own_layers.apply(own_vars, x, mutable=["batch_stats"]))(x)
  assert ("custom_vjp_call" in str(program)) == written_out  # The CPU's path, or autodiff.
  assert not np.allclose(got_state["batch_stats"]["bn"]["mean"], 0.0)

  eval_vars = {**want_vars, **want_state}
  want = FlaxLayers(train=False).apply({**eval_vars, "params": {**params, "slope": slope}}, x)
  got = OwnLayers(train=False).apply(
      {**eval_vars, "params": {**params, "prelu_owner": {"slope": slope}}}, x
  )
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_sharded_batch_is_normalised_without_gathering_it():
  # The statistics are per-channel sums of each device's rows, all-reduced; the rows of
  # _channel_sum never span two images, so no device needs another's.
  assert jax.device_count() == 8, "tests/conftest.py forces 8 host devices"
  x, scale, bias, slope, weights = inputs((32, 6, 6, 8), jnp.float32)
  sharded = batch_sharded(x)
  loss = functools.partial(loss_of, normalization.batch_norm_prelu, dtype=jnp.float32)
  gradients = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
  program = gradients.lower(sharded, scale, bias, slope, weights).compile().as_text()
  assert "all-reduce" in program and "all-gather" not in program
  for got, want in zip(
      gradients(sharded, scale, bias, slope, weights), gradients(x, scale, bias, slope, weights)
  ):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
