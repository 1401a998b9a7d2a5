"""Margin losses researchers now compare against, as pure functions of cosine similarities.

Every loss is split into the pieces a class-sharded head needs, where each device holds the cosines
of only some classes and the target cosine of each row is first recovered with a psum:

  * `target_logits_<kind>(cos_target [B], ...) -> [B]`: the margin-applied target logit;
  * `nontarget_logits_<kind>(cos [B, C], cos_target [B], ...) -> [B, C]` where the negatives change
    (CurricularFace); every other kind uses s*cos, as `losses.nontarget_logits`;
  * per-row auxiliary arrays (`feature_norm` [B], the embedding norms before normalisation, for
    AdaFace and MagFace; per-row margins from `elasticface_margins(key, B)` for ElasticFace);
  * a state pytree of float32 scalars with a pure update that takes *batch-level* statistics, so the
    head can compute them over the global batch (they are means over B rows, and B is the global
    batch in the head after its all-gather).

`<kind>_loss(cos, labels, ...) -> (loss, metrics, new_state)` assembles the pieces on one device:
mean cross-entropy, `metrics['acc']` (arg-max of the plain cosines) and `metrics['acc_margin']`
(arg-max of the margin logits), plus per-kind extras; `new_state` is {} for the stateless kinds.

  kind               target logit                              non-target logit     state / aux
  subcenter_arcface  s*psi(theta + m)   on max_k cos_k         s*max_k cos_k        -
  curricularface     s*psi(theta + m)                          s*N(t, cos_j)        t
  adaface            s*(psi(max(theta + g_ang, 0)) - g_add)    s*cos                norm mean, std
  magface            s*psi(theta + m(a))                       s*cos                feature_norm a
  elasticface_arc    s*psi(theta + m_i), m_i ~ N(m, sigma^2)   s*cos                key
  elasticface_cos    s*(cos - m_i),      m_i ~ N(m, sigma^2)   s*cos                key

theta = arccos(cos_target) and psi is `losses.monotone_cos`: cos on [0, pi], still falling beyond.
As in `losses`, every angular margin uses psi where the papers' code uses cos with an ad-hoc
fall-back (or none), so the target logit never rises as theta grows; the two differ only for target
angles beyond pi - m. Everything is computed in float32 whatever the input dtype (bfloat16
included), through `losses.safe_arccos`, so values and gradients are finite on all of [-1, 1].

PAPER_DEFAULTS holds the hyper-parameters of each paper's main face-recognition setting.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from adam_face import losses

SUBCENTER_ARCFACE = "subcenter_arcface"
CURRICULARFACE = "curricularface"
ADAFACE = "adaface"
MAGFACE = "magface"
ELASTICFACE_ARC = "elasticface_arc"
ELASTICFACE_COS = "elasticface_cos"
KINDS = (SUBCENTER_ARCFACE, CURRICULARFACE, ADAFACE, MAGFACE, ELASTICFACE_ARC, ELASTICFACE_COS)

PAPER_DEFAULTS: Mapping[str, Mapping[str, float]] = {
    SUBCENTER_ARCFACE: {"s": 64.0, "m": 0.5, "num_subcenters": 3},
    CURRICULARFACE: {"s": 64.0, "m": 0.5, "t_alpha": 0.01},
    ADAFACE: {"s": 64.0, "m": 0.4, "h": 0.333, "t_alpha": 0.01},
    MAGFACE: {"s": 64.0, "l_a": 10.0, "u_a": 110.0, "l_m": 0.45, "u_m": 0.8, "lambda_g": 35.0},
    ELASTICFACE_ARC: {"s": 64.0, "m": 0.5, "sigma": 0.05},
    ELASTICFACE_COS: {"s": 64.0, "m": 0.35, "sigma": 0.05},
}


# ------------------------------------------------------------------------------ shared pieces


def _check_scale(s) -> None:
  if losses.is_static(s) and not np.all(np.asarray(s) > 0):
    raise ValueError(f"Scale s must be > 0 (the papers use 64), got {s}.")


def _check_range(name: str, value, low: float, high: float, hint: str) -> None:
  """Raises unless low <= value <= high, for a concrete value."""
  if losses.is_static(value) and not (np.ndim(value) == 0 and low <= float(value) <= high):
    raise ValueError(f"{name} must be a scalar in [{low:.4g}, {high:.4g}] ({hint}), got {value!r}.")


def _check_rate(name: str, value) -> None:
  if losses.is_static(value) and not (np.ndim(value) == 0 and 0.0 < float(value) <= 1.0):
    raise ValueError(f"{name} is the weight of the new batch statistic in a moving average and "
                     f"must lie in (0, 1] (the papers use 0.01), got {value!r}.")


def _target_cosines(cos: jax.Array, labels: jax.Array):
  """(cos float32 [B, C], cos_target [B], target_mask [B, C]) after checking shapes and labels."""
  if cos.ndim != 2 or labels.ndim != 1 or labels.shape[0] != cos.shape[0]:
    raise ValueError(f"Expected cos [B, C] and labels [B]; got {cos.shape} and {labels.shape}.")
  losses.check_labels(labels, cos.shape[1])
  cos = jnp.asarray(cos, jnp.float32)
  target_mask = labels[:, None] == jnp.arange(cos.shape[1])[None, :]
  cos_target = jnp.sum(jnp.where(target_mask, cos, 0.0), axis=-1)
  return cos, cos_target, target_mask


def _check_rows(name: str, values: jax.Array, batch: int) -> jax.Array:
  if values.shape != (batch,):
    raise ValueError(f"{name} must hold one value per row, shape ({batch},); got {values.shape}.")
  return jnp.asarray(values, jnp.float32)


def _softmax_loss(cos, labels, target_mask, target_logit, nontarget):
  """Mean cross-entropy of logits whose target column is target_logit, with acc / acc_margin."""
  logits = jnp.where(target_mask, target_logit[:, None], nontarget)
  loss = jnp.mean(jax.nn.logsumexp(logits, axis=-1) - target_logit)
  metrics = {
      "acc": jnp.mean(jnp.argmax(cos, axis=-1) == labels),
      "acc_margin": jnp.mean(jnp.argmax(logits, axis=-1) == labels),
  }
  return loss, metrics


def _arc_logits(cos_target, margin, s):
  """s * psi(theta + margin) for a scalar or per-row margin (psi: losses.monotone_cos)."""
  theta = losses.safe_arccos(jnp.asarray(cos_target, jnp.float32))
  return s * losses.monotone_cos(theta + margin)


def _plain_logits(cos, s):
  return s * jnp.clip(jnp.asarray(cos, jnp.float32), -1.0, 1.0)


# ------------------------------------------------------------------------------ sub-center ArcFace


def subcenter_cos(cos_sub: jax.Array) -> jax.Array:
  """Class cosines [B, C] from sub-centre cosines [B, C, K]: the largest of each class's K.

  Sub-center ArcFace (Deng, Guo, Liu, Gong, Zafeiriou: "Sub-center ArcFace: Boosting Face
  Recognition by Large-scale Noisy Web Faces", ECCV 2020) gives every class K centres (K = 3 in
  the paper) and scores a sample against a class by its nearest sub-centre, cos_j = max_k
  cos(x, W_jk), for the target and the negatives alike. A noisy sample can then settle on a
  non-dominant sub-centre instead of pulling the dominant one. With K = 1 this is the identity.

  For the class-sharded head, store the centres class-major, [C * K, D] with class c's sub-centres
  in rows c*K .. c*K + K - 1, so that each shard's cosines reshape to [B, C_local, K].
  """
  if cos_sub.ndim != 3 or cos_sub.shape[-1] < 1:
    raise ValueError(f"cos_sub must be [B, C, K] with K >= 1 sub-centres; got {cos_sub.shape}. "
                     "Reshape the [B, C*K] cosines of class-major centres to [B, C, K].")
  return jnp.max(jnp.asarray(cos_sub, jnp.float32), axis=-1)


def target_logits_subcenter_arcface(cos_target: jax.Array, *, s: Any, m: Any) -> jax.Array:
  """ArcFace's s*psi(theta + m) on the pooled target cosine (see subcenter_cos)."""
  _check_scale(s)
  _check_range("Sub-center ArcFace margin m", m, 0.0, math.pi, "the paper uses 0.5")
  return _arc_logits(cos_target, m, s)


def subcenter_arcface_loss(cos_sub: jax.Array, labels: jax.Array, *, s: Any, m: Any):
  """Sub-center ArcFace over sub-centre cosines [B, C, K]. Returns (loss, metrics, {})."""
  cos, cos_target, target_mask = _target_cosines(subcenter_cos(cos_sub), labels)
  target = target_logits_subcenter_arcface(cos_target, s=s, m=m)
  loss, metrics = _softmax_loss(cos, labels, target_mask, target, _plain_logits(cos, s))
  return loss, metrics, {}


# ------------------------------------------------------------------------------ CurricularFace


def init_curricularface_state() -> dict[str, jax.Array]:
  """CurricularFace's running statistic t, which starts at 0 (t^(0) = 0 in the paper)."""
  return {"t": jnp.zeros((), jnp.float32)}


def update_curricularface_state(state: Mapping[str, jax.Array], batch_mean_cos_target: jax.Array,
                                *, t_alpha: Any = 0.01) -> dict[str, jax.Array]:
  """t <- t_alpha * r + (1 - t_alpha) * t, with r the batch mean of the target cosines.

  t_alpha = 0.01 is the weight the official code gives the new batch. r carries no gradient. In
  the class-sharded head, r is the mean over the global batch of the psum-recovered cos_target.
  """
  _check_rate("CurricularFace t_alpha", t_alpha)
  r = jax.lax.stop_gradient(jnp.asarray(batch_mean_cos_target, jnp.float32))
  return {"t": (t_alpha * r + (1.0 - t_alpha) * state["t"]).astype(jnp.float32)}


def target_logits_curricularface(cos_target: jax.Array, *, s: Any, m: Any) -> jax.Array:
  """The positive logit s*T(cos theta_y) = s*psi(theta_y + m), as ArcFace's."""
  _check_scale(s)
  _check_range("CurricularFace margin m", m, 0.0, math.pi, "the paper uses 0.5")
  return _arc_logits(cos_target, m, s)


def nontarget_logits_curricularface(cos: jax.Array, cos_target: jax.Array, *, s: Any, m: Any,
                                    t: jax.Array) -> jax.Array:
  """Negative logits s*N(t, cos_j) [B, C]: hard negatives are re-weighted by the curriculum.

  CurricularFace (Huang, Wang, Tai, Liu, Shen, Li, Li, Huang: "CurricularFace: Adaptive Curriculum
  Learning Loss for Deep Face Recognition", CVPR 2020):

    N(t, cos_j) = cos_j               if T(cos theta_y) >= cos_j   (easy negative)
                = cos_j * (t + cos_j) otherwise                    (hard negative)

  with T(cos theta_y) = psi(theta_y + m) the margin-applied target cosine of the same row. Early in
  training t (the running mean of the target cosine) is small and hard negatives are damped;
  as t grows towards 1 they are emphasised. The hard/easy mask carries no gradient; t is state.

  Args:
    cos: [B, C] cosines of the classes on this device (the target column is overwritten later).
    cos_target: [B] target cosine of each row (psum-recovered in the sharded head).
  """
  _check_scale(s)
  _check_range("CurricularFace margin m", m, 0.0, math.pi, "the paper uses 0.5")
  cos = jnp.clip(jnp.asarray(cos, jnp.float32), -1.0, 1.0)
  threshold = jax.lax.stop_gradient(_arc_logits(cos_target, m, 1.0))
  t = jax.lax.stop_gradient(jnp.asarray(t, jnp.float32))
  hard = cos > threshold[:, None]
  return s * jnp.where(hard, cos * (t + cos), cos)


def curricularface_loss(cos: jax.Array, labels: jax.Array, state: Mapping[str, jax.Array], *,
                        s: Any, m: Any, t_alpha: Any = 0.01):
  """CurricularFace. Returns (loss, metrics incl. 't', new_state).

  As in the official code, t is updated with this batch's mean target cosine first, and the new t
  weighs this batch's hard negatives.
  """
  cos, cos_target, target_mask = _target_cosines(cos, labels)
  new_state = update_curricularface_state(state, jnp.mean(cos_target), t_alpha=t_alpha)
  target = target_logits_curricularface(cos_target, s=s, m=m)
  nontarget = nontarget_logits_curricularface(cos, cos_target, s=s, m=m, t=new_state["t"])
  loss, metrics = _softmax_loss(cos, labels, target_mask, target, nontarget)
  metrics["t"] = new_state["t"]
  return loss, metrics, new_state


# ------------------------------------------------------------------------------ AdaFace

# Feature norms are clipped to this range before any statistic (as in the official code).
_ADAFACE_NORM_RANGE = (0.001, 100.0)
# Added to the running std before dividing by it (as in the official code).
_ADAFACE_STD_EPS = 1e-3


def init_adaface_state() -> dict[str, jax.Array]:
  """AdaFace's running mean and std of the feature norm; the official code starts at 20 and 100."""
  return {"norm_mean": jnp.asarray(20.0, jnp.float32), "norm_std": jnp.asarray(100.0, jnp.float32)}


def adaface_batch_stats(feature_norm: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(mean, std) of the batch's clipped feature norms, without gradient; std with ddof=1.

  In the class-sharded head, pass the norms of the global (all-gathered) batch; equivalently
  mean = S1 / B and std = sqrt((S2 - B * mean^2) / (B - 1)) from psums S1, S2 of norm, norm^2.
  """
  feature_norm = jnp.asarray(feature_norm, jnp.float32)
  if feature_norm.ndim != 1 or feature_norm.shape[0] < 2:
    raise ValueError(f"AdaFace batch statistics need feature_norm [B] with B >= 2 (the std of "
                     f"one norm is undefined); got shape {feature_norm.shape}.")
  norms = jax.lax.stop_gradient(jnp.clip(feature_norm, *_ADAFACE_NORM_RANGE))
  return jnp.mean(norms), jnp.std(norms, ddof=1)


def update_adaface_state(state: Mapping[str, jax.Array], batch_mean: jax.Array,
                         batch_std: jax.Array, *, t_alpha: Any = 0.01) -> dict[str, jax.Array]:
  """mu <- t_alpha * batch_mean + (1 - t_alpha) * mu, and likewise sigma with batch_std."""
  _check_rate("AdaFace t_alpha", t_alpha)
  batch_mean, batch_std = (jax.lax.stop_gradient(jnp.asarray(v, jnp.float32))
                           for v in (batch_mean, batch_std))
  mean = t_alpha * batch_mean + (1.0 - t_alpha) * state["norm_mean"]
  std = t_alpha * batch_std + (1.0 - t_alpha) * state["norm_std"]
  return {"norm_mean": mean.astype(jnp.float32), "norm_std": std.astype(jnp.float32)}


def adaface_margin_scaler(feature_norm: jax.Array, state: Mapping[str, jax.Array], *,
                          h: Any) -> jax.Array:
  """Image-quality proxy z = clip(h * (||x|| - mu) / (sigma + 1e-3), -1, 1), [B], no gradient."""
  _check_range("AdaFace h", h, 0.0, math.inf, "the paper uses 0.333")
  norms = jax.lax.stop_gradient(jnp.clip(jnp.asarray(feature_norm, jnp.float32),
                                         *_ADAFACE_NORM_RANGE))
  scaled = h * (norms - state["norm_mean"]) / (state["norm_std"] + _ADAFACE_STD_EPS)
  return jnp.clip(scaled, -1.0, 1.0)


def target_logits_adaface(cos_target: jax.Array, margin_scaler: jax.Array, *, s: Any,
                          m: Any) -> jax.Array:
  """AdaFace's target logit s*(psi(max(theta + g_angle, 0)) - g_add), [B].

  AdaFace (Kim, Jain, Liu: "AdaFace: Quality Adaptive Margin for Face Recognition", CVPR 2022)
  adapts the margin to image quality, approximated by the normalised feature norm z in [-1, 1]
  (adaface_margin_scaler):

    g_angle = -m * z,   g_add = m * z + m.

  z = -1 (low quality) gives ArcFace with margin m, z = 0 CosFace with margin m, and z in [-1, 0]
  insightface's combined margin (1, -m*z, m*(1 + z)); z = 1 (high quality) moves the margin into
  the cosine (angle - m, cosine - 2m). The angle theta + g_angle is held at >= 0, where the
  official code clips it to [eps, pi - eps]; beyond pi, psi keeps falling instead of holding.
  """
  _check_scale(s)
  # m is an angle and a cosine offset at once (2m at z = 1): keep it within the cosine's range.
  _check_range("AdaFace margin m", m, 0.0, 1.0, "the paper uses 0.4")
  theta = losses.safe_arccos(jnp.asarray(cos_target, jnp.float32))
  z = jnp.asarray(margin_scaler, jnp.float32)
  g_angle, g_add = -m * z, m * z + m
  return s * (losses.monotone_cos(jnp.maximum(theta + g_angle, 0.0)) - g_add)


def adaface_loss(cos: jax.Array, labels: jax.Array, feature_norm: jax.Array,
                 state: Mapping[str, jax.Array], *, s: Any, m: Any, h: Any, t_alpha: Any = 0.01):
  """AdaFace. Returns (loss, metrics incl. 'norm_mean', 'norm_std', new_state).

  As in the official code, the running statistics take this batch's mean and std first, and the
  updated ones normalise this batch's norms. Non-target logits are s*cos.
  """
  cos, cos_target, target_mask = _target_cosines(cos, labels)
  feature_norm = _check_rows("feature_norm", feature_norm, cos.shape[0])
  new_state = update_adaface_state(state, *adaface_batch_stats(feature_norm), t_alpha=t_alpha)
  scaler = adaface_margin_scaler(feature_norm, new_state, h=h)
  target = target_logits_adaface(cos_target, scaler, s=s, m=m)
  loss, metrics = _softmax_loss(cos, labels, target_mask, target, _plain_logits(cos, s))
  metrics.update(new_state)
  return loss, metrics, new_state


# ------------------------------------------------------------------------------ MagFace


def _check_magface(l_a, u_a, l_m, u_m) -> None:
  values = (l_a, u_a, l_m, u_m)
  if all(losses.is_static(v) for v in values):
    l_a, u_a, l_m, u_m = (float(v) for v in values)
    if not (0 < l_a < u_a and 0 <= l_m <= u_m < math.pi):
      raise ValueError(f"MagFace needs 0 < l_a < u_a and 0 <= l_m <= u_m < pi; got l_a={l_a}, "
                       f"u_a={u_a}, l_m={l_m}, u_m={u_m} (the paper: 10, 110, 0.45, 0.8).")


def magface_margin(feature_norm: jax.Array, *, l_a: Any, u_a: Any, l_m: Any,
                   u_m: Any) -> jax.Array:
  """m(a) = l_m + (u_m - l_m) * (a - l_a) / (u_a - l_a), a = clip(||x||, l_a, u_a); [B].

  The margin rises linearly with the feature magnitude, so the magnitude learns to rank quality.
  It is differentiable in the norm inside [l_a, u_a] (flat outside), as in the official code.
  """
  _check_magface(l_a, u_a, l_m, u_m)
  a = jnp.clip(jnp.asarray(feature_norm, jnp.float32), l_a, u_a)
  return l_m + (u_m - l_m) * (a - l_a) / (u_a - l_a)


def target_logits_magface(cos_target: jax.Array, feature_norm: jax.Array, *, s: Any, l_a: Any,
                          u_a: Any, l_m: Any, u_m: Any) -> jax.Array:
  """MagFace's target logit s*psi(theta + m(a)), [B].

  MagFace (Meng, Zhao, Huang, Zhou: "MagFace: A Universal Representation for Face Recognition and
  Quality Assessment", CVPR 2021) is ArcFace with the magnitude-aware margin m(a) of
  magface_margin, plus the regulariser of magface_regularizer. (The official code's default
  "easy margin" drops the margin where cos theta <= 0; the paper's formula, used here, does not.)
  """
  _check_scale(s)
  margin = magface_margin(feature_norm, l_a=l_a, u_a=u_a, l_m=l_m, u_m=u_m)
  return _arc_logits(cos_target, margin, s)


def magface_regularizer(feature_norm: jax.Array, *, l_a: Any, u_a: Any) -> jax.Array:
  """g(a) = 1/a + a/u_a^2 with a = clip(||x||, l_a, u_a), per row [B].

  g is convex and decreasing on [l_a, u_a], rewarding large magnitudes; the loss adds
  lambda_g * mean(g). Gradients flow into the feature norm (none outside [l_a, u_a]).
  """
  if losses.is_static(l_a) and losses.is_static(u_a) and not 0 < float(l_a) < float(u_a):
    raise ValueError(f"MagFace needs 0 < l_a < u_a (the paper: 10, 110); got {l_a}, {u_a}.")
  a = jnp.clip(jnp.asarray(feature_norm, jnp.float32), l_a, u_a)
  return 1.0 / a + a / (u_a * u_a)


def magface_loss(cos: jax.Array, labels: jax.Array, feature_norm: jax.Array, *, s: Any, l_a: Any,
                 u_a: Any, l_m: Any, u_m: Any, lambda_g: Any):
  """MagFace: cross-entropy + lambda_g * mean g(a). Returns (loss, metrics, {}).

  metrics also hold 'regularizer' (mean g) and 'margin' (mean m(a)).
  """
  if losses.is_static(lambda_g) and not float(lambda_g) >= 0:
    raise ValueError(f"MagFace lambda_g must be >= 0 (the paper uses 35), got {lambda_g}.")
  cos, cos_target, target_mask = _target_cosines(cos, labels)
  feature_norm = _check_rows("feature_norm", feature_norm, cos.shape[0])
  target = target_logits_magface(cos_target, feature_norm, s=s, l_a=l_a, u_a=u_a, l_m=l_m,
                                 u_m=u_m)
  loss, metrics = _softmax_loss(cos, labels, target_mask, target, _plain_logits(cos, s))
  regularizer = jnp.mean(magface_regularizer(feature_norm, l_a=l_a, u_a=u_a))
  metrics["regularizer"] = regularizer
  metrics["margin"] = jnp.mean(magface_margin(feature_norm, l_a=l_a, u_a=u_a, l_m=l_m, u_m=u_m))
  return loss + lambda_g * regularizer, metrics, {}


# ------------------------------------------------------------------------------ ElasticFace


def elasticface_margins(key: jax.Array, batch_size: int, *, m: Any, sigma: Any) -> jax.Array:
  """Per-row margins m_i ~ N(m, sigma^2), float32 [batch_size], drawn afresh every step.

  ElasticFace (Boutros, Damer, Kirchbuchner, Kuijper: "ElasticFace: Elastic Margin Loss for Deep
  Face Recognition", CVPR Workshops 2022) replaces the fixed margin by a normally distributed one
  (sigma = 0.05 in the paper), relaxing the fixed decision boundary. In the class-sharded head use
  the same key on every device, so that each row gets one margin.
  """
  if losses.is_static(sigma) and not (np.ndim(sigma) == 0 and float(sigma) >= 0):
    raise ValueError(f"ElasticFace sigma must be a scalar >= 0 (the paper uses 0.05), got {sigma}.")
  if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
  return m + sigma * jax.random.normal(key, (batch_size,), jnp.float32)


def target_logits_elasticface_arc(cos_target: jax.Array, margins: jax.Array, *,
                                  s: Any) -> jax.Array:
  """ElasticFace-Arc: s*psi(theta + m_i) with the row's drawn margin m_i, [B]."""
  _check_scale(s)
  return _arc_logits(cos_target, jnp.asarray(margins, jnp.float32), s)


def target_logits_elasticface_cos(cos_target: jax.Array, margins: jax.Array, *,
                                  s: Any) -> jax.Array:
  """ElasticFace-Cos: s*(cos theta - m_i) with the row's drawn margin m_i, [B]."""
  _check_scale(s)
  cos_target = jnp.clip(jnp.asarray(cos_target, jnp.float32), -1.0, 1.0)
  return s * (cos_target - jnp.asarray(margins, jnp.float32))


def elasticface_loss(cos: jax.Array, labels: jax.Array, key: jax.Array, *, kind: str, s: Any,
                     m: Any, sigma: Any):
  """ElasticFace-Arc (kind 'elasticface_arc') or -Cos ('elasticface_cos').

  Returns (loss, metrics incl. 'margin' (the batch's mean drawn margin), {}).
  """
  if kind == ELASTICFACE_ARC:
    _check_range("ElasticFace-Arc margin m", m, 0.0, math.pi, "the paper uses 0.5")
    target_fn = target_logits_elasticface_arc
  elif kind == ELASTICFACE_COS:
    _check_range("ElasticFace-Cos margin m", m, 0.0, 1.0, "the paper uses 0.35")
    target_fn = target_logits_elasticface_cos
  else:
    raise ValueError(f"elasticface_loss takes kind={ELASTICFACE_ARC!r} or {ELASTICFACE_COS!r}, "
                     f"got {kind!r}.")
  cos, cos_target, target_mask = _target_cosines(cos, labels)
  margins = elasticface_margins(key, cos.shape[0], m=m, sigma=sigma)
  target = target_fn(cos_target, margins, s=s)
  loss, metrics = _softmax_loss(cos, labels, target_mask, target, _plain_logits(cos, s))
  metrics["margin"] = jnp.mean(margins)
  return loss, metrics, {}
