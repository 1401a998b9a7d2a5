"""Plugs the modern losses (adam_face/modern_losses.py) into the class-sharded head.

The head hands a margin function the global target cosines [B] and the embedding norms [B] and gets
back the target logits [B], a non-target function of the local cosines, and an extra loss term
(MagFace's regulariser). Running statistics (CurricularFace's t, AdaFace's norm mean and std) are
updated *before* the head from the same batch, as the papers' code does, via a cheap gather of
each row's own class centre (CurricularFace only); the updated state is then closed over by the
margin function.
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from adam_face import classifier
from adam_face import modern_losses as ml

KINDS = ml.KINDS
MarginFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, Callable[[jax.Array], jax.Array],
                                                   jax.Array]]


def subcenters_per_class(loss_config: ml_collections.ConfigDict) -> int:
  return loss_config.num_subcenters if loss_config.kind == ml.SUBCENTER_ARCFACE else 1


def init_loss_state(loss_config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
  if loss_config.kind == ml.CURRICULARFACE:
    return ml.init_curricularface_state()
  if loss_config.kind == ml.ADAFACE:
    return ml.init_adaface_state()
  return {}


def needs_target_cosines(loss_config: ml_collections.ConfigDict) -> bool:
  """Whether update_loss_state reads the batch's target cosines (CurricularFace's t does)."""
  return loss_config.kind == ml.CURRICULARFACE


def target_cosines(embeddings: jax.Array, centers: jax.Array, labels: jax.Array,
                   num_subcenters: int = 1) -> jax.Array:
  """cos(embedding_i, centre of its label) [B], without gradient (for running statistics)."""
  emb = classifier.l2_normalize(embeddings)
  rows = classifier.l2_normalize(centers.reshape(-1, num_subcenters, centers.shape[-1])[labels])
  return jax.lax.stop_gradient(jnp.max(jnp.einsum("bd,bkd->bk", emb, rows), axis=-1))


def update_loss_state(loss_config: ml_collections.ConfigDict, state: Mapping[str, jax.Array], *,
                      cos_target: jax.Array | None, feature_norm: jax.Array
                      ) -> dict[str, jax.Array]:
  """The running statistics after seeing this batch (global arrays under jit); cos_target may be
  None where needs_target_cosines is False."""
  if loss_config.kind == ml.CURRICULARFACE:
    return ml.update_curricularface_state(state, jnp.mean(cos_target),
                                          t_alpha=loss_config.t_alpha)
  if loss_config.kind == ml.ADAFACE:
    mean, std = ml.adaface_batch_stats(jax.lax.stop_gradient(feature_norm))
    return ml.update_adaface_state(state, mean, std, t_alpha=loss_config.t_alpha)
  return dict(state)


def margin_fn(loss_config: ml_collections.ConfigDict, state: Mapping[str, jax.Array],
              key: jax.Array) -> MarginFn:
  """(cos_target [B], feature_norm [B]) -> (target logits, nontarget(cos), extra loss)."""
  c = loss_config
  s = c.s

  def plain(cos):
    return s * jnp.clip(cos.astype(jnp.float32), -1.0, 1.0)

  def fn(cos_target, feature_norm):
    extra = jnp.zeros((), jnp.float32)
    nontarget = plain
    if c.kind == ml.SUBCENTER_ARCFACE:
      target = ml.target_logits_subcenter_arcface(cos_target, s=s, m=c.m)
    elif c.kind == ml.CURRICULARFACE:
      target = ml.target_logits_curricularface(cos_target, s=s, m=c.m)
      nontarget = lambda cos: ml.nontarget_logits_curricularface(  # noqa: E731
          cos, cos_target, s=s, m=c.m, t=state["t"])
    elif c.kind == ml.ADAFACE:
      scaler = ml.adaface_margin_scaler(feature_norm, state, h=c.h)
      target = ml.target_logits_adaface(cos_target, scaler, s=s, m=c.m)
    elif c.kind == ml.MAGFACE:
      target = ml.target_logits_magface(cos_target, feature_norm, s=s, l_a=c.l_a, u_a=c.u_a,
                                        l_m=c.l_m, u_m=c.u_m)
      extra = c.lambda_g * jnp.mean(ml.magface_regularizer(feature_norm, l_a=c.l_a, u_a=c.u_a))
    elif c.kind in (ml.ELASTICFACE_ARC, ml.ELASTICFACE_COS):
      # The same key on every device: every shard draws the same per-row margins.
      margins = ml.elasticface_margins(key, cos_target.shape[0], m=c.m, sigma=c.sigma)
      target_logits = (ml.target_logits_elasticface_arc if c.kind == ml.ELASTICFACE_ARC
                       else ml.target_logits_elasticface_cos)
      target = target_logits(cos_target, margins, s=s)
    else:
      raise ValueError(f"{c.kind!r} is not one of the modern kinds {KINDS}.")
    return target, nontarget, extra

  return fn


def check_config(loss_config: ml_collections.ConfigDict) -> None:
  """Runs each modern loss once on a tiny concrete batch so its static checks fire early."""
  fn = margin_fn(loss_config, init_loss_state(loss_config), jax.random.key(0))
  target, nontarget, extra = fn(jnp.asarray([0.5, -0.5]), jnp.asarray([20.0, 30.0]))
  nontarget(jnp.zeros((2, 3)))
  del target, extra
