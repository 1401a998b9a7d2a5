"""Margin-softmax numerics, and the single-device margin softmax loss.

`adam_face.margins` holds the methods (ArcFace, CosFace, ADM, ...), one class each; this module
holds the few numeric pieces they share and `margin_softmax_loss`, the plain single-device loss
over a full cosine matrix [B, C]. That function is the public reference: the class-sharded head
(`classifier.margin_head_loss`), which never holds all of [B, C] on one device, is tested against
it for every kind (`tests/test_classifier.py`).

  safe_arccos(cos)      arccos on [-1, 1], exact value, derivative bounded at +-1
  monotone_cos(phi)     psi(phi) = (-1)^k cos(phi) - 2k on [k pi, (k+1) pi]: cos on [0, pi] and
                        still falling beyond, so an angular margin never makes the target logit
                        rise as theta grows, and insightface's combined margin (m1, m2, m3) reduces
                        exactly to ArcFace (1, m, 0), CosFace (1, 0, m) and SphereFace (m, 0, 0)
  scaled_cos(cos, s)    s * cos in float32, clipped to [-1, 1]
  target_cosines(cos, target_mask)   each row's cosine to its own class

Numerics: everything computes in float32 whatever the input dtype (bfloat16 included); the
1/sqrt(1 - cos^2) of d arccos / d cos is bounded at 1/sqrt(_ARCCOS_GRAD_FLOOR), so loss and
gradient are finite for every cos in [-1, 1], both ends included.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Bounds 1/sqrt(1 - cos^2) in d arccos / d cos at |cos| -> 1 to 1000; the value stays exact.
_ARCCOS_GRAD_FLOOR = 1e-6


@jax.custom_jvp
def safe_arccos(cos: jax.Array) -> jax.Array:
  """arccos on [-1, 1] (inputs clipped) with a finite derivative at both ends."""
  return jnp.arccos(jnp.clip(cos, -1.0, 1.0))


@safe_arccos.defjvp
def _safe_arccos_jvp(primals, tangents):
  (cos,), (dcos,) = primals, tangents
  inside = jnp.abs(cos) <= 1.0  # Clipped inputs get no gradient, as jnp.clip would give.
  slope = -jax.lax.rsqrt(jnp.maximum(1.0 - jnp.square(cos), _ARCCOS_GRAD_FLOOR))
  return safe_arccos(cos), jnp.where(inside, slope, 0.0) * dcos


def monotone_cos(phi: jax.Array) -> jax.Array:
  """psi(phi) = (-1)^k cos(phi) - 2k on [k*pi, (k+1)*pi]: cos on [0, pi], falling beyond."""
  k = jnp.floor(phi / jnp.pi)
  sign = 1.0 - 2.0 * jnp.mod(k, 2.0)
  return sign * jnp.cos(phi) - 2.0 * k


def scaled_cos(cos: jax.Array, s: Any) -> jax.Array:
  """s * cos in float32, cos clipped to [-1, 1]: the logit of a class without margin."""
  return s * jnp.clip(jnp.asarray(cos, jnp.float32), -1.0, 1.0)


def target_cosines(cos: jax.Array, target_mask: jax.Array) -> jax.Array:
  """Each row's cosine to its target class [B], 0 for a row whose target is not among the columns
  (on a class-sharded head, another shard's)."""
  return jnp.sum(jnp.where(target_mask, cos, 0.0), axis=-1)


def check_labels(labels, num_classes: int) -> None:
  """Refuses labels outside [0, num_classes) whenever they are concrete (not traced)."""
  if isinstance(labels, jax.core.Tracer):
    return
  labels = np.asarray(labels)
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    bad = labels[(labels < 0) | (labels >= num_classes)]
    raise ValueError(
        f"Labels must lie in [0, {num_classes}); got {bad[:5].tolist()} "
        f"({bad.size} out of range). Check the dataset's num_classes against the config."
    )


def _checked_feature_norm(feature_norm, batch: int) -> jax.Array:
  if feature_norm is None:  # Only AdaFace and MagFace read it; the others see ones.
    return jnp.ones((batch,), jnp.float32)
  feature_norm = jnp.asarray(feature_norm, jnp.float32)
  if feature_norm.shape != (batch,):
    raise ValueError(
        f"feature_norm must hold one value per row, shape ({batch},); got {feature_norm.shape}."
    )
  return feature_norm


def margin_logits(
    cos: jax.Array, labels: jax.Array, margin, state=None, *, feature_norm=None, key=None
) -> tuple[jax.Array, Any]:
  """Scaled logits [B, C] (float32) of `margin` (an adam_face.margins.Margin) and the state this
  batch's logits used (its running statistics updated with the batch, as the papers do).

  cos: [B, C] class cosines; labels: [B]; state: the margin's state before the batch
  (margin.init_state() when None); feature_norm: [B] embedding norms before normalisation
  (AdaFace, MagFace); key: a PRNG key (ElasticFace's drawn margins; key 0 when None).
  """
  if cos.ndim != 2 or labels.ndim != 1 or labels.shape[0] != cos.shape[0]:
    raise ValueError(f"Expected cos [B, C] and labels [B]; got {cos.shape} and {labels.shape}.")
  check_labels(labels, cos.shape[1])
  cos = jnp.asarray(cos, jnp.float32)
  feature_norm = _checked_feature_norm(feature_norm, cos.shape[0])
  state = margin.init_state() if state is None else state
  key = jax.random.key(0) if key is None else key
  target_mask = labels[:, None] == jnp.arange(cos.shape[1])[None, :]
  cos_target = target_cosines(cos, target_mask)
  state = margin.update_statistics(state, cos_target=cos_target, feature_norm=feature_norm)
  target = margin.target_logits(cos_target, state=state, feature_norm=feature_norm, key=key)
  others = margin.nontarget_logits(cos, cos_target=cos_target, state=state)
  return jnp.where(target_mask, target[:, None], others), state


def margin_softmax_loss(
    cos: jax.Array, labels: jax.Array, margin, state=None, *, feature_norm=None, key=None
):
  """Mean cross-entropy over margin logits (plus the margin's extra loss), on one device.

  Returns (loss, metrics, new_state): metrics hold `acc` (arg-max of the cosines), `acc_margin`
  (arg-max of the margin logits still the label) and margin.metrics of the state the logits used;
  new_state is the state after the batch (statistics, then auto-margin).
  """
  logits, state = margin_logits(cos, labels, margin, state, feature_norm=feature_norm, key=key)
  target = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  loss = jnp.mean(jax.nn.logsumexp(logits, axis=-1) - target)
  loss = loss + margin.extra_loss(_checked_feature_norm(feature_norm, cos.shape[0]))
  acc_margin = jnp.mean(jnp.argmax(logits, axis=-1) == labels)
  metrics = {
      "acc": jnp.mean(jnp.argmax(cos, axis=-1) == labels),
      "acc_margin": acc_margin,
      **margin.metrics(state),
  }  # The margin and statistics this batch's logits used.
  return loss, metrics, margin.update_margin(state, acc_margin=acc_margin)
