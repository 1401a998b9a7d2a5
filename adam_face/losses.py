"""Margin-based softmax losses as pure functions of cosine similarities.

Every loss here takes `cos` [B, C], the cosine similarities between L2-normalised embeddings and
L2-normalised class centres, and integer `labels` [B]. Only the target column carries a margin:

  kind         non-target logit        target logit
  normface     s*cos                   s*cos
  cosface      s*cos                   s*(cos - m)                       (AM-Softmax / CosFace)
  arcface      s*cos                   s*psi(theta + m)                  (ArcFace)
  sphereface   s*cos                   s*psi(m*theta)                    (SphereFace, integer m)
  combined     s*cos                   s*(psi(m1*theta + m2) - m3)       (insightface's combined)
  adm          s*(1 - 2*theta/pi)      s*(1 - 2*(theta + m)/pi)          (angular-distance softmax)

with theta = arccos(cos) and psi the monotone extension of cos used by SphereFace:

  psi(phi) = (-1)^k cos(phi) - 2k   for phi in [k*pi, (k+1)*pi].

psi equals cos(phi) on [0, pi] and keeps falling past pi, continuously. This is how every angular
margin here handles theta + m > pi: the target logit never increases as theta grows, and
`combined` reduces *exactly* to `arcface` (1, m, 0), `cosface` (1, 0, m) and `sphereface` (m, 0, 0).
It differs from insightface's arcface fall-back (cos(theta) - m*sin(m) once theta > pi - m, which
jumps down at the switch) only for target angles beyond pi - m, which is a continuous rather than a
discontinuous extension of the same idea.

Numerics: everything is computed in float32 whatever the input dtype; arccos has its exact value on
[-1, 1] and a derivative whose 1/sqrt(1 - cos^2) is bounded at 1/sqrt(_ARCCOS_GRAD_FLOOR), so the
loss and its gradient are finite for every cos in [-1, 1], both ends included.

Auto-margin (the "AM" of ADAM). The ADAM seed names an automatic margin without defining it; ours:
the state holds the current margin `m` and `acc_margin_ema`, an exponential moving average of the
batch's acc_margin with decay `momentum`. After every step

  acc_margin_ema <- momentum * acc_margin_ema + (1 - momentum) * acc_margin
  m              <- clip(m + rate * (acc_margin_ema - target), m_min, m_max)

so m rises while the batch stays classified correctly *with* the margin more often than `target`
(the margin is too easy), and falls while it does not (the margin is too hard). The average starts at
`target`, so the margin holds still until evidence accumulates, and the training step holds m for
the first `auto_margin.warmup_steps` steps (the average keeps tracking), since acc_margin is near 0
early in training whatever the margin. It applies to the additive kinds
(arcface, cosface, adm); m is a float32 array so the update runs inside the jitted train step and is
checkpointed with the train state.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("normface", "cosface", "arcface", "sphereface", "combined", "adm")
AUTO_MARGIN_KINDS = ("arcface", "cosface", "adm")

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


def is_static(x) -> bool:
  """True for a concrete value (checkable now), False for a tracer inside jit."""
  return not isinstance(x, jax.core.Tracer)


def validate_margin(kind: str, s: Any, m: Any) -> None:
  """Raises ValueError for an unknown kind, or a static s or m outside its valid range."""
  if kind not in KINDS:
    raise ValueError(f"Unknown loss kind {kind!r}; valid kinds are {', '.join(KINDS)}.")
  if is_static(s) and not np.all(np.asarray(s) > 0):
    raise ValueError(f"Scale s must be > 0 (typically 16..64), got {s}.")
  if kind == "combined":
    if not (isinstance(m, (tuple, list)) and len(m) == 3):
      raise ValueError(f"kind='combined' takes m=(m1, m2, m3), got {m!r}.")
    m1, m2, m3 = (float(v) for v in m)
    if not (m1 > 0 and 0 <= m2 < math.pi and 0 <= m3 <= 1):
      raise ValueError(
          f"combined margin (m1, m2, m3)={tuple(m)} out of range: need m1 > 0, 0 <= m2 < pi, "
          "0 <= m3 <= 1 (insightface uses e.g. (1.0, 0.3, 0.2)).")
    return
  if kind == "sphereface":
    if not (isinstance(m, (int, np.integer)) and m >= 1):
      raise ValueError(f"kind='sphereface' takes an integer m >= 1 (e.g. 4), got {m!r}.")
    return
  if not is_static(m):
    return  # A traced margin (auto-margin) is kept in range by its own update.
  if kind == "normface":
    if m not in (None, 0, 0.0):
      raise ValueError(f"kind='normface' has no margin; pass m=0 or None, got {m!r}.")
    return
  upper = {"cosface": 1.0, "arcface": math.pi, "adm": math.pi}[kind]
  m_arr = np.asarray(m, dtype=np.float64)
  if m_arr.ndim != 0 or not (0.0 <= float(m_arr) <= upper):
    raise ValueError(f"Margin m for kind={kind!r} must be a scalar in [0, {upper:.4g}], got {m!r}.")


def check_labels(labels, num_classes: int) -> None:
  """Refuses labels outside [0, num_classes) whenever they are concrete (not traced)."""
  if not is_static(labels):
    return
  labels = np.asarray(labels)
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    bad = labels[(labels < 0) | (labels >= num_classes)]
    raise ValueError(
        f"Labels must lie in [0, {num_classes}); got {bad[:5].tolist()} "
        f"({bad.size} out of range). Check the dataset's num_classes against the config.")


def nontarget_logits(cos: jax.Array, *, kind: str, s: Any) -> jax.Array:
  """The logit of every class that is not the target: s*cos, or s*(1 - 2*theta/pi) for adm."""
  cos = jnp.asarray(cos, jnp.float32)
  if kind == "adm":
    return s * (1.0 - (2.0 / jnp.pi) * safe_arccos(cos))
  return s * jnp.clip(cos, -1.0, 1.0)


def target_logits(cos_target: jax.Array, *, kind: str, s: Any, m: Any) -> jax.Array:
  """The margin-applied logit of the target class, given its cosine (any shape)."""
  cos_target = jnp.clip(jnp.asarray(cos_target, jnp.float32), -1.0, 1.0)
  if kind == "normface":
    return s * cos_target
  if kind == "cosface":
    return s * (cos_target - m)
  theta = safe_arccos(cos_target)
  if kind == "adm":
    return s * (1.0 - (2.0 / jnp.pi) * (theta + m))
  if kind == "arcface":
    return s * monotone_cos(theta + m)
  if kind == "sphereface":
    return s * monotone_cos(m * theta)
  if kind == "combined":
    m1, m2, m3 = m
    return s * (monotone_cos(m1 * theta + m2) - m3)
  raise ValueError(f"Unknown loss kind {kind!r}; valid kinds are {', '.join(KINDS)}.")


def apply_target_margin(cos: jax.Array, target_mask: jax.Array, *, kind: str, s: Any,
                        m: Any) -> jax.Array:
  """Logits [B, C] where columns with target_mask carry the margin.

  `target_mask` is a boolean [B, C] with at most one True per row; a row without one (its target
  lives on another shard of a class-sharded head) gets non-target logits only. The margin is only
  evaluated on the B target cosines, not on all B*C entries.
  """
  cos32 = jnp.asarray(cos, jnp.float32)
  cos_target = jnp.sum(jnp.where(target_mask, cos32, 0.0), axis=-1)
  target = target_logits(cos_target, kind=kind, s=s, m=m)
  return jnp.where(target_mask, target[:, None], nontarget_logits(cos32, kind=kind, s=s))


def margin_logits(cos: jax.Array, labels: jax.Array, *, kind: str, s: Any, m: Any) -> jax.Array:
  """Scaled logits [B, C] (float32) in which only the target column carries the margin."""
  validate_margin(kind, s, m)
  check_labels(labels, cos.shape[-1])
  target_mask = labels[:, None] == jnp.arange(cos.shape[-1])[None, :]
  return apply_target_margin(cos, target_mask, kind=kind, s=s, m=m)


def acc_margin(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Fraction of the batch whose arg-max over the margin-applied logits is still the label."""
  return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


def margin_softmax_loss(cos: jax.Array, labels: jax.Array, *, kind: str, s: Any,
                        m: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean cross-entropy over margin logits, with `acc` (arg-max of cos) and `acc_margin`."""
  logits = margin_logits(cos, labels, kind=kind, s=s, m=m)
  target = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  loss = jnp.mean(jax.nn.logsumexp(logits, axis=-1) - target)
  metrics = {
      "acc": jnp.mean(jnp.argmax(cos, axis=-1) == labels),
      "acc_margin": acc_margin(logits, labels),
  }
  return loss, metrics


# ------------------------------------------------------------------------------ auto-margin


def init_auto_margin(m: float, target: float) -> dict[str, jax.Array]:
  """Auto-margin state: the current margin and the running acc_margin (starting at target)."""
  return {"m": jnp.asarray(m, jnp.float32), "acc_margin_ema": jnp.asarray(target, jnp.float32)}


def update_auto_margin(state: Mapping[str, jax.Array], batch_acc_margin: jax.Array, *,
                       target: float, rate: float, momentum: float, m_min: float,
                       m_max: float, hold: Any = False) -> dict[str, jax.Array]:
  """One auto-margin step (see the module docstring). Pure and jit-compatible.

  `hold` (a bool, or a bool array under jit) keeps m as it is while the average still tracks
  acc_margin: early in training acc_margin is near 0 whatever the margin, and steering on it then
  would only drive m to m_min.
  """
  ema = momentum * state["acc_margin_ema"] + (1.0 - momentum) * batch_acc_margin
  m = jnp.where(hold, state["m"], jnp.clip(state["m"] + rate * (ema - target), m_min, m_max))
  return {"m": m.astype(jnp.float32), "acc_margin_ema": ema.astype(jnp.float32)}


def validate_auto_margin(kind: str, *, target: float, rate: float, momentum: float, m_min: float,
                         m_max: float, m: float) -> None:
  """Raises ValueError for an auto-margin configuration that cannot work."""
  if kind not in AUTO_MARGIN_KINDS:
    raise ValueError(f"Auto-margin works with the additive kinds {AUTO_MARGIN_KINDS}, "
                     f"not kind={kind!r}; set loss.auto_margin.enabled=False.")
  if not 0.0 < target < 1.0:
    raise ValueError(f"auto_margin.target is an acc_margin in (0, 1), got {target}.")
  if not 0.0 <= momentum < 1.0:
    raise ValueError(f"auto_margin.momentum must be in [0, 1), got {momentum}.")
  if rate < 0:
    raise ValueError(f"auto_margin.rate must be >= 0, got {rate}.")
  if not 0.0 <= m_min <= m <= m_max:
    raise ValueError(f"Need 0 <= m_min <= m <= m_max for auto-margin, got m_min={m_min}, "
                     f"m={m}, m_max={m_max}.")
  validate_margin(kind, 1.0, m_max)
