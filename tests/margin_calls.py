"""Calling a margin's pieces with the defaults the loss would pass (not a test module itself)."""

import jax
import jax.numpy as jnp


def target_logits(margin, cos, state=None, feature_norm=None, key=None):
  """margin.target_logits on 1-D target cosines, with the state, norms and key that
  losses.margin_logits passes when none are given."""
  cos = jnp.asarray(cos, jnp.float32)
  return margin.target_logits(
      cos,
      state=margin.init_state() if state is None else state,
      feature_norm=jnp.ones(cos.shape, jnp.float32) if feature_norm is None else feature_norm,
      key=jax.random.key(0) if key is None else key,
  )
