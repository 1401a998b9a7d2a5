"""The backbones' BatchNorm and PReLU; on the CPU, train-mode BatchNorm(+PReLU) with a written-out
gradient.

`BatchNorm` keeps flax's nn.BatchNorm variables and values (params "scale", "bias"; batch_stats
"mean", "var"; the fast variance E[x^2] - E[x]^2, clipped at 0, reduced in float32; the running
averages left alone while initialising), so checkpoints and converted insightface weights load
unchanged. Called with `prelu=`, a `PReLU` module of its parent, it applies that PReLU too, with
the PReLU's own parameter: `norm(name="bn")(x, prelu=PReLU(name="prelu"))` has the parameters and
values of `PReLU(name="prelu")(norm(name="bn")(x))`.

Why, on the CPU backend only (elsewhere `batch_norm_prelu_by_autodiff`, autodiff of flax's
formulas; not measured on an accelerator): autodiff of flax's train-mode BatchNorm and of the
PReLU behind it writes several arrays of the activation's size in each direction (x - mean, the
normalised output and the PReLU's in the forward pass, more in the backward one), and at the
112x112 and 56x56 maps of tiny and MobileFaceNet those passes over memory are a large part of
their CPU train steps (`python -m benchmarks.profile_train_step`). `batch_norm_prelu` computes
the statistics, then the output in one elementwise pass, and keeps only its input for the
backward pass, which recomputes the normalised values where it needs them. `python -m
benchmarks.bench_train_step --autodiff_batch_norm` times both in the same rounds
(benchmarks/README.md has the figures).
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# PyTorch's BatchNorm momentum 0.1 is flax's 0.9 (flax keeps 0.9 of the old average).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# Train-mode BatchNorm by batch_norm_prelu's written-out gradient on the CPU backend; False: by
# autodiff everywhere (benchmarks switch it off while tracing to compare the two).
WRITTEN_OUT_GRADIENT_ON_CPU = True


def prelu(x, slope):
  """max(x, 0) + slope * min(x, 0), one slope per channel (the last axis)."""
  return jnp.where(x >= 0, x, slope.astype(x.dtype) * x)


def _channel_sum(a, b=None):
  """The per-channel sum of a (times b) [..., C] over every axis but the last, taken over rows of
  k consecutive pixels of one image (k * C <= 128 values) and then over the k partial sums.

  Why the rows: XLA:CPU reduces to few channels slowly (tiny's 8-channel BatchNorm statistics at
  112x112 took 2.4 ms a sum against 0.8 for MobileFaceNet's 128 channels at 56x56, the same bytes,
  in `profile_train_step`). The optimisation barriers keep the rows: without them XLA moved the
  reshape behind the product, which it then took at the narrow layout, as slowly as before. A row
  never spans two images, so a batch sharded over devices stays sharded.
  """
  channels = a.shape[-1]
  pixels_per_image = a.size // (channels * a.shape[0]) if a.ndim > 1 else 1
  k = 1
  while 2 * k * channels <= 128 and pixels_per_image % (2 * k) == 0:
    k *= 2
  rows = jax.lax.optimization_barrier(a.reshape(a.size // (k * channels), k * channels))
  if b is not None:
    rows = rows * jax.lax.optimization_barrier(b.reshape(rows.shape))
  return jnp.sum(rows, 0).reshape(k, channels).sum(0)


def _normalise(x, mean, inverse_std, scale, bias, slope, dtype):
  """x * gain + shift (gain = scale / std, shift = bias - mean * gain) in float32, then the PReLU
  (if any), in `dtype`.

  As PyTorch's CPU BatchNorm computes it, rather than flax's (x - mean) * gain + bias: written so,
  the forward pass has no x - mean for XLA to share with the backward pass's (which made it
  write x - mean to memory in the forward pass). The outputs differ from flax's by rounding; in
  bfloat16 also because the PReLU comes before the cast (it came after flax's BatchNorm).
  """
  gain = scale * inverse_std
  y = x.astype(jnp.float32) * gain + (bias - mean * gain)
  if slope is not None:
    y = prelu(y, slope)
  return y.astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def batch_norm_prelu(x, scale, bias, slope, epsilon, dtype):
  """Train-mode BatchNorm of x with the batch's statistics, then PReLU(slope) unless it is None.

  Args:
    x: activations [..., C], normalised over every axis but the last.
    scale, bias: [C] float32.
    slope: [C] PReLU slopes, or None for BatchNorm alone.
    epsilon: added to the variance.
    dtype: dtype of the output.

  Returns:
    (output [..., C] in `dtype`, mean [C], variance [C]), the statistics in float32 for the
    running averages; they are differentiable like flax's.
  """
  return _batch_norm_prelu_fwd(x, scale, bias, slope, epsilon, dtype)[0]


def _batch_norm_prelu_fwd(x, scale, bias, slope, epsilon, dtype):
  count = x.size // x.shape[-1]
  x32 = x.astype(jnp.float32)
  mean = _channel_sum(x32) / count
  variance = jnp.maximum(0.0, _channel_sum(x32, x32) / count - mean * mean)
  inverse_std = jax.lax.rsqrt(variance + epsilon)
  output = _normalise(x, mean, inverse_std, scale, bias, slope, dtype)
  return (output, mean, variance), (x, mean, inverse_std, scale, bias, slope)


def _batch_norm_prelu_bwd(epsilon, dtype, residuals, cotangents):
  del epsilon, dtype  # inverse_std is kept.
  x, mean, inverse_std, scale, bias, slope = residuals
  d_output, d_mean, d_variance = cotangents
  count = x.size // x.shape[-1]
  centred = x.astype(jnp.float32) - mean
  d_output = d_output.astype(jnp.float32)
  gain = scale * inverse_std
  if slope is None:
    d_normalised, d_slope = d_output, None
  else:
    normalised = centred * gain + bias
    negative = normalised < 0
    d_normalised = jnp.where(negative, slope * d_output, d_output)
    d_slope = _channel_sum(jnp.where(negative, normalised * d_output, 0.0))
  d_bias = _channel_sum(d_normalised)
  d_centred_sum = _channel_sum(d_normalised, centred)
  # d x = gain * (g - mean(g) - x_hat * mean(g * x_hat)) for g the normalised output's gradient,
  # plus what the returned mean and variance carry (d mean/d x = 1/n, d var/d x = 2 (x - mean)/n).
  offset = (d_mean - gain * d_bias) / count
  slope_of_centred = (2.0 * d_variance - gain * inverse_std * inverse_std * d_centred_sum) / count
  d_x = d_normalised * gain + offset + centred * slope_of_centred
  return d_x.astype(x.dtype), d_centred_sum * inverse_std, d_bias, d_slope


batch_norm_prelu.defvjp(_batch_norm_prelu_fwd, _batch_norm_prelu_bwd)


def batch_norm_prelu_by_autodiff(x, scale, bias, slope, epsilon, dtype):
  """batch_norm_prelu by flax's nn.BatchNorm formulas, then the PReLU, differentiated by JAX:
  what the other backends run (and the CPU ran before batch_norm_prelu)."""
  axes = tuple(range(x.ndim - 1))
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axes)
  variance = jnp.maximum(0.0, jnp.mean(x32 * x32, axes) - mean * mean)
  y = (x32 - mean) * (scale * jax.lax.rsqrt(variance + epsilon)) + bias
  if slope is not None:
    y = prelu(y, slope)
  return y.astype(dtype), mean, variance


class PReLU(nn.Module):
  """Parametric ReLU with one learned slope per channel (He et al., ICCV 2015).

  flax's nn.PReLU learns one scalar; insightface (PyTorch nn.PReLU(channels), MXNet's prelu)
  learns a slope per channel, initialised at 0.25. The slope is a float32 parameter cast to
  the activation's dtype. `BatchNorm(...)(x, prelu=...)` takes it through `slope`.
  """

  @nn.compact
  def slope(self, channels: int):
    return self.param("slope", nn.initializers.constant(0.25), (channels,), jnp.float32)

  def __call__(self, x):
    return prelu(x, self.slope(x.shape[-1]))


class BatchNorm(nn.Module):
  """flax's nn.BatchNorm over every axis but the last (same variables and values), optionally
  followed by a PReLU of the parent; in train mode on the CPU by `batch_norm_prelu`.

  Attributes:
    use_running_average: normalise by the running averages (inference) instead of the batch's.
    momentum: the running averages keep this fraction of their old value at each update.
    epsilon: added to the variance.
    dtype: dtype of the output; statistics and parameters are float32.
    use_scale: learn a scale (else it is 1).
  """

  use_running_average: bool
  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPSILON
  dtype: Any = jnp.float32
  use_scale: bool = True

  @nn.compact
  def __call__(self, x, prelu: PReLU | None = None):
    channels = x.shape[-1]
    running_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((channels,), jnp.float32))
    running_variance = self.variable(
        "batch_stats", "var", lambda: jnp.ones((channels,), jnp.float32)
    )
    scale = (
        self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        if self.use_scale
        else jnp.ones((channels,), jnp.float32)
    )
    bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
    slope = None if prelu is None else prelu.slope(channels)
    if self.use_running_average:
      inverse_std = jax.lax.rsqrt(running_variance.value + self.epsilon)
      return _normalise(x, running_mean.value, inverse_std, scale, bias, slope, self.dtype)
    if WRITTEN_OUT_GRADIENT_ON_CPU and jax.default_backend() == "cpu":
      train_mode = batch_norm_prelu
    else:
      train_mode = batch_norm_prelu_by_autodiff
    output, mean, variance = train_mode(x, scale, bias, slope, self.epsilon, self.dtype)
    if not self.is_initializing():
      running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
      running_variance.value = (
          self.momentum * running_variance.value + (1 - self.momentum) * variance
      )
    return output


def batch_norm(train: bool, dtype: Any, **kwargs) -> functools.partial:
  """BatchNorm with insightface's epsilon and momentum; statistics always kept in float32."""
  return functools.partial(BatchNorm, use_running_average=not train, dtype=dtype, **kwargs)
