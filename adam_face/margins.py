"""Margin methods: one small class per method, one registry, one interface.

A margin turns the cosines between normalised embeddings and normalised class centres into logits.
Every method here changes the target column (and CurricularFace also the hard negatives); the
class-sharded head (`classifier.margin_head_loss`) and the single-device reference
(`losses.margin_softmax_loss`) both drive a margin through the same interface and know nothing
about kinds:

  init_state()                                   per-head state: running statistics, auto-margin
  update_statistics(state, cos_target, feature_norm)
                                                 the batch's statistics, taken *before* its logits
                                                 (CurricularFace's t, AdaFace's norm statistics),
                                                 as the papers' code does
  target_logits(cos_target, state, feature_norm, key)         [B]
  nontarget_logits(cos, cos_target, state)                    [B, C], default s*cos; the
                                                 head hands it cos_target without gradient
                                                 (and cos a chunk of the classes at a time)
  extra_loss(feature_norm)                       added to the loss (MagFace's regulariser)
  update_margin(state, acc_margin)               after the batch (auto-margin)
  metrics(state)                                 scalars to log (current margin, t, ...)
  pool_class_cosines(cos)                        [B, C*K] -> [B, C] (sub-centres); identity

Every method's hyper-parameters are dataclass fields, with the paper's values as defaults, and are
checked once, when the object is built (`from_config` builds one from `config.loss`).

Adding a method: write a frozen dataclass deriving from `Margin` that sets `kind` and overrides
`target_logits` (and whatever else it changes), and decorate it with `@register`. That is all:
`config.loss.kind` then accepts it, with its fields as the config's fields.

Numerics: every formula computes in float32 whatever the input dtype, through
`losses.safe_arccos` (exact value, bounded derivative at +-1), so values and gradients are finite
on all of [-1, 1]. Angular margins use `losses.monotone_cos` (psi), which equals cos on [0, pi] and
keeps falling beyond, so the target logit never rises as theta grows. arcface_torch's
`CombinedMarginLoss` (recognition/arcface_torch/losses.py) computes cos(arccos(cos) + m) for
every target angle, with no fall-back past theta + m > pi (where cos rises again); insightface's
older `ArcFace` class switched to cos(theta) - m sin(m) there, which jumps at the switch. psi
agrees with both wherever theta + m <= pi.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from adam_face import losses

State = dict[str, jax.Array]
REGISTRY: dict[str, type["Margin"]] = {}


def register(cls: type["Margin"]) -> type["Margin"]:
  """Class decorator: makes `cls` available as config.loss.kind = cls.kind."""
  if cls.kind in REGISTRY:
    raise ValueError(f"Margin kind {cls.kind!r} is registered twice ({REGISTRY[cls.kind]}, {cls}).")
  REGISTRY[cls.kind] = cls
  return cls


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ValueError(message)


def _check_margin(margin: "Margin", upper: float) -> None:
  """m in [0, upper]; the message quotes the class's default, the paper's value."""
  _require(
      0.0 <= margin.m <= upper,
      f"{margin.kind}: margin m must be in [0, {upper:.4g}] (the paper uses "
      f"{type(margin).m}), got {margin.m}.",
  )


def _check_t_alpha(margin: "Margin") -> None:
  _require(
      0.0 < margin.t_alpha <= 1.0,
      f"{margin.kind}: t_alpha is the weight of the new batch in a moving average, in (0, 1] "
      f"(the paper uses 0.01), got {margin.t_alpha}.",
  )


def _f32(x) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def _arc(cos_target: jax.Array, margin, s) -> jax.Array:
  """s * psi(theta + margin), margin a scalar or one per row."""
  return s * losses.monotone_cos(losses.safe_arccos(_f32(cos_target)) + margin)


def _ema(rate: float, new, old) -> jax.Array:
  """The moving average the papers' code keeps: rate * new + (1 - rate) * old, no gradient."""
  return (rate * jax.lax.stop_gradient(_f32(new)) + (1.0 - rate) * old).astype(jnp.float32)


# ------------------------------------------------------------------------------ the interface


@dataclasses.dataclass(frozen=True)
class Margin:
  """The interface every margin method implements (see the module docstring).

  s is the logit scale shared by every method.
  """

  kind: ClassVar[str] = ""
  s: float = 64.0

  def __post_init__(self):
    _require(
        self.s > 0,
        f"{self.kind}: the scale s must be > 0 (the papers use 30 to 64), got {self.s}.",
    )
    self.validate()

  def validate(self) -> None:
    """Raises a one-line ValueError for hyper-parameters outside their valid range."""

  @property
  def centers_per_class(self) -> int:
    return 1

  def pool_class_cosines(self, cos: jax.Array) -> jax.Array:
    return cos

  def init_state(self) -> State:
    return {}

  def update_statistics(
      self, state: State, *, cos_target: jax.Array, feature_norm: jax.Array
  ) -> State:
    del cos_target, feature_norm
    return state

  def target_logits(
      self, cos_target: jax.Array, *, state: State, feature_norm: jax.Array, key: jax.Array
  ) -> jax.Array:
    raise NotImplementedError

  def nontarget_logits(self, cos: jax.Array, *, cos_target: jax.Array, state: State) -> jax.Array:
    del cos_target, state
    return losses.scaled_cos(cos, self.s)

  def extra_loss(self, feature_norm: jax.Array) -> jax.Array:
    del feature_norm
    return jnp.zeros((), jnp.float32)

  def update_margin(self, state: State, *, acc_margin: jax.Array) -> State:
    del acc_margin
    return state

  def metrics(self, state: State) -> dict[str, jax.Array]:
    del state
    return {}


# ------------------------------------------------------------------------------ auto-margin


@dataclasses.dataclass(frozen=True)
class AutoMargin:
  """Steers an additive margin m by acc_margin (the "AM" of ADAM).

  acc_margin is the fraction of a batch whose arg-max over the margin logits is still the label.
  The state holds m, `acc_margin_ema` (a moving average of acc_margin with decay `momentum`,
  starting at 0) and `engaged`. After every step

    acc_margin_ema <- momentum * acc_margin_ema + (1 - momentum) * acc_margin
    engaged        <- engaged or acc_margin_ema >= target
    m              <- clip(m + rate * (acc_margin_ema - target), m_min, m_max)   once engaged

  so m rises while the batch stays correctly classified *with* the margin more often than
  `target` (the margin is too easy) and falls while it does not.

  Why the engagement rule: early in training acc_margin is near 0 whatever the margin, because
  the network cannot classify yet, not because the margin is too hard. A controller that steers
  from step 0 then drives m to its floor, and with a high target it takes thousands of steps to
  come back; a fixed number of warm-up steps (this class's first form) has to be tuned per dataset
  and schedule. Holding m until the average first reaches the target needs no step count: m stays
  at its configured value, the plain fixed-margin loss, until the network can meet the target, and
  only then does acc_margin say anything about the margin. What decided it: on the acc_margin
  curve of a real run (LFW people, tests/test_auto_margin.py) stretched over the CASIA-WebFace
  row's 32,000 steps, steering from step 0 with the average starting at the target (0.9) took m
  from 0.35 to 0 within the first 1,000 steps; with the engagement rule (and the rows' present
  settings) m stays clear of its floor and is steered once the curve passes the target.

  The alternative in AM-Softmax's Caffe release (happynear/AMSoftmax, `GlobalLSEMargin` layer of
  its Caffe fork) was read and not adopted: there m is a 0.9/0.1 moving average of the mode
  (mean-shift, window 0.1) of cos(theta_y) minus the soft maximum (1/s) log sum_{j != y}
  exp(s cos_j) of the other classes' cosines, applied only while positive. It sets m to the gap
  the network already achieves rather than steering acc_margin, and in a class-sharded head it
  needs a second all-reduce over the negatives; it is not implemented.
  """

  target: float = 0.9
  rate: float = 1e-3
  momentum: float = 0.99
  m_min: float = 0.0
  m_max: float = 0.8

  def __post_init__(self):
    _require(
        0.0 < self.target < 1.0,
        f"auto_margin.target is an acc_margin in (0, 1), got {self.target}.",
    )
    _require(
        0.0 <= self.momentum < 1.0, f"auto_margin.momentum must be in [0, 1), got {self.momentum}."
    )
    _require(self.rate >= 0, f"auto_margin.rate must be >= 0, got {self.rate}.")
    _require(
        0.0 <= self.m_min <= self.m_max,
        f"auto_margin needs 0 <= m_min <= m_max, got {self.m_min}, {self.m_max}.",
    )

  def init_state(self, m: float) -> State:
    return {"m": _f32(m), "acc_margin_ema": _f32(0.0), "engaged": jnp.zeros((), jnp.bool_)}

  def update(self, state: State, acc_margin: jax.Array) -> State:
    ema = self.momentum * state["acc_margin_ema"] + (1.0 - self.momentum) * _f32(acc_margin)
    engaged = state["engaged"] | (ema >= self.target)
    steered = jnp.clip(state["m"] + self.rate * (ema - self.target), self.m_min, self.m_max)
    return {
        "m": jnp.where(engaged, steered, state["m"]).astype(jnp.float32),
        "acc_margin_ema": ema.astype(jnp.float32),
        "engaged": engaged,
    }


@dataclasses.dataclass(frozen=True)
class AdditiveMargin(Margin):
  """A margin m that may be steered by an AutoMargin (kinds cosface, arcface, adm)."""

  m: float = 0.5
  auto_margin: AutoMargin | None = None
  max_margin: ClassVar[float] = math.pi

  def validate(self):
    _check_margin(self, self.max_margin)
    if self.auto_margin is not None:
      am = self.auto_margin
      _require(
          am.m_min <= self.m <= am.m_max,
          f"{self.kind}: need auto_margin.m_min <= m <= auto_margin.m_max, got "
          f"{am.m_min} <= {self.m} <= {am.m_max}.",
      )
      _require(
          am.m_max <= self.max_margin,
          f"{self.kind}: auto_margin.m_max must be <= {self.max_margin:.4g}, got {am.m_max}.",
      )

  def init_state(self) -> State:
    return {} if self.auto_margin is None else self.auto_margin.init_state(self.m)

  def current_margin(self, state: State):
    return self.m if self.auto_margin is None else state["m"]

  def update_margin(self, state, *, acc_margin):
    return state if self.auto_margin is None else self.auto_margin.update(state, acc_margin)

  def metrics(self, state):
    return {"margin": _f32(self.current_margin(state))}


# ------------------------------------------------------------------------------ the classic kinds


@register
@dataclasses.dataclass(frozen=True)
class NormFace(Margin):
  """s * cos for every class, no margin.

  Wang, Xiang, Cheng, Yuille: "NormFace: L2 Hypersphere Embedding for Face Verification", ACM MM
  2017.
  """

  kind: ClassVar[str] = "normface"
  s: float = 30.0

  def target_logits(self, cos_target, *, state, feature_norm, key):
    return losses.scaled_cos(cos_target, self.s)


@register
@dataclasses.dataclass(frozen=True)
class CosFace(AdditiveMargin):
  """Target s * (cos - m).

  Wang et al.: "CosFace: Large Margin Cosine Loss for Deep Face Recognition", CVPR 2018 (s = 64,
  m = 0.35); also Wang, Cheng, Liu, Liu: "Additive Margin Softmax for Face Verification"
  (AM-Softmax), IEEE SPL 2018.
  """

  kind: ClassVar[str] = "cosface"
  m: float = 0.35
  max_margin: ClassVar[float] = 1.0

  def target_logits(self, cos_target, *, state, feature_norm, key):
    return self.s * (jnp.clip(_f32(cos_target), -1.0, 1.0) - self.current_margin(state))


@register
@dataclasses.dataclass(frozen=True)
class ArcFace(AdditiveMargin):
  """Target s * psi(theta + m).

  Deng, Guo, Xue, Zafeiriou: "ArcFace: Additive Angular Margin Loss for Deep Face Recognition",
  CVPR 2019 (s = 64, m = 0.5).
  """

  kind: ClassVar[str] = "arcface"
  m: float = 0.5

  def target_logits(self, cos_target, *, state, feature_norm, key):
    return _arc(cos_target, self.current_margin(state), self.s)


@register
@dataclasses.dataclass(frozen=True)
class ADM(AdditiveMargin):
  """Angular-distance softmax: target s * (1 - 2 (theta + m) / pi), others s * (1 - 2 theta / pi).

  The logit is linear in the angle itself rather than in its cosine, so the margin m is the same
  angular gap at every theta. With an AutoMargin this is ADAM (ADM with auto-margin).
  """

  kind: ClassVar[str] = "adm"
  m: float = 0.3

  def target_logits(self, cos_target, *, state, feature_norm, key):
    theta = losses.safe_arccos(_f32(cos_target))
    return self.s * (1.0 - (2.0 / jnp.pi) * (theta + self.current_margin(state)))

  def nontarget_logits(self, cos, *, cos_target, state):
    return self.s * (1.0 - (2.0 / jnp.pi) * losses.safe_arccos(_f32(cos)))


@register
@dataclasses.dataclass(frozen=True)
class SphereFace(Margin):
  """Target s * psi(m theta), integer m; this is the feature-normalised form (fixed s).

  Liu, Wen, Yu, Li, Raj, Song: "SphereFace: Deep Hypersphere Embedding for Face Recognition",
  CVPR 2017 (m = 4). The original's annealing towards plain softmax is not part of this loss.
  """

  kind: ClassVar[str] = "sphereface"
  s: float = 30.0
  m: int = 4

  def validate(self):
    _require(
        isinstance(self.m, int) and not isinstance(self.m, bool) and self.m >= 1,
        f"sphereface takes an integer margin m >= 1 (the paper uses 4), got {self.m!r}.",
    )

  def target_logits(self, cos_target, *, state, feature_norm, key):
    return self.s * losses.monotone_cos(self.m * losses.safe_arccos(_f32(cos_target)))

  def metrics(self, state):
    return {"margin": _f32(self.m)}


@register
@dataclasses.dataclass(frozen=True)
class Combined(Margin):
  """Target s * (psi(m1 theta + m2) - m3): insightface's combined margin.

  (1, m, 0) is ArcFace, (1, 0, m) CosFace and (m, 0, 0) SphereFace, exactly.
  """

  kind: ClassVar[str] = "combined"
  m1: float = 1.0
  m2: float = 0.3
  m3: float = 0.2

  def validate(self):
    _require(
        self.m1 > 0 and 0 <= self.m2 < math.pi and 0 <= self.m3 <= 1,
        f"combined margin (m1, m2, m3)=({self.m1}, {self.m2}, {self.m3}) out of range: need "
        "m1 > 0, 0 <= m2 < pi, 0 <= m3 <= 1 (insightface uses (1.0, 0.3, 0.2)).",
    )

  def target_logits(self, cos_target, *, state, feature_norm, key):
    theta = losses.safe_arccos(_f32(cos_target))
    return self.s * (losses.monotone_cos(self.m1 * theta + self.m2) - self.m3)


# ------------------------------------------------------------------------------ the modern kinds


@register
@dataclasses.dataclass(frozen=True)
class SubcenterArcFace(Margin):
  """ArcFace on the nearest of K sub-centres per class: cos_j = max_k cos(x, W_jk).

  Deng, Guo, Liu, Gong, Zafeiriou: "Sub-center ArcFace: Boosting Face Recognition by Large-scale
  Noisy Web Faces", ECCV 2020 (K = 3, m = 0.5). A noisy sample can settle on a non-dominant
  sub-centre instead of pulling the dominant one. Centres are stored class-major, [C * K, D], class
  c's sub-centres in rows c*K .. c*K + K - 1, so each shard's cosines reshape to [B, C_local, K].
  """

  kind: ClassVar[str] = "subcenter_arcface"
  m: float = 0.5
  num_subcenters: int = 3

  def validate(self):
    _check_margin(self, math.pi)
    _require(
        isinstance(self.num_subcenters, int) and self.num_subcenters >= 1,
        f"subcenter_arcface: num_subcenters must be an integer >= 1 (the paper uses 3), got "
        f"{self.num_subcenters!r}.",
    )

  @property
  def centers_per_class(self):
    return self.num_subcenters

  def pool_class_cosines(self, cos):
    k = self.num_subcenters
    if cos.shape[-1] % k:
      raise ValueError(
          f"subcenter_arcface: {cos.shape[-1]} cosines per row is not a multiple of "
          f"the {k} sub-centres per class; centres must be [C * {k}, D], class-major."
      )
    return jnp.max(cos.reshape(cos.shape[:-1] + (cos.shape[-1] // k, k)), axis=-1)

  def target_logits(self, cos_target, *, state, feature_norm, key):
    return _arc(cos_target, self.m, self.s)

  def metrics(self, state):
    return {"margin": _f32(self.m)}


@register
@dataclasses.dataclass(frozen=True)
class CurricularFace(Margin):
  """ArcFace's target; hard negatives re-weighted by a curriculum t.

  Huang et al.: "CurricularFace: Adaptive Curriculum Learning Loss for Deep Face Recognition",
  CVPR 2020 (m = 0.5, t_alpha = 0.01):

    N(t, cos_j) = cos_j               if T(cos theta_y) >= cos_j   (easy negative)
                = cos_j * (t + cos_j) otherwise                    (hard negative)

  with T(cos theta_y) = psi(theta_y + m) the row's margin-applied target cosine and t the running
  mean of the target cosine (t^(0) = 0), updated with each batch before use. Early in training t is
  small and hard negatives are damped; as t grows they are emphasised. The hard/easy mask and t
  carry no gradient.
  """

  kind: ClassVar[str] = "curricularface"
  m: float = 0.5
  t_alpha: float = 0.01

  def validate(self):
    _check_margin(self, math.pi)
    _check_t_alpha(self)

  def init_state(self):
    return {"t": jnp.zeros((), jnp.float32)}

  def update_statistics(self, state, *, cos_target, feature_norm):
    return {"t": _ema(self.t_alpha, jnp.mean(_f32(cos_target)), state["t"])}

  def target_logits(self, cos_target, *, state, feature_norm, key):
    return _arc(cos_target, self.m, self.s)

  def nontarget_logits(self, cos, *, cos_target, state):
    cos = jnp.clip(_f32(cos), -1.0, 1.0)
    threshold = jax.lax.stop_gradient(_arc(cos_target, self.m, 1.0))
    t = jax.lax.stop_gradient(state["t"])
    return self.s * jnp.where(cos > threshold[:, None], cos * (t + cos), cos)

  def metrics(self, state):
    return {"margin": _f32(self.m), "t": state["t"]}


# Feature norms are clipped to this range before any statistic, and the std is offset by
# _ADAFACE_STD_EPS before dividing by it, as in AdaFace's official code.
_ADAFACE_NORM_RANGE = (0.001, 100.0)
_ADAFACE_STD_EPS = 1e-3


@register
@dataclasses.dataclass(frozen=True)
class AdaFace(Margin):
  """Target s * (psi(max(theta + g_angle, 0)) - g_add), a margin set by image quality.

  Kim, Jain, Liu: "AdaFace: Quality Adaptive Margin for Face Recognition", CVPR 2022 (m = 0.4,
  h = 0.333, t_alpha = 0.01). Quality is approximated by the normalised feature norm
  z = clip(h (||x|| - mu) / (sigma + 1e-3), -1, 1), with mu, sigma running statistics of the batch
  norms (starting at 20 and 100, updated with each batch before use); g_angle = -m z and
  g_add = m z + m. z = -1 gives ArcFace, z = 0 CosFace, z = 1 moves the margin into the cosine.
  The official code clips theta + g_angle to [eps, pi - eps]; here it is held at >= 0 and psi
  keeps falling beyond pi.
  """

  kind: ClassVar[str] = "adaface"
  m: float = 0.4
  h: float = 0.333
  t_alpha: float = 0.01

  def validate(self):
    # m is an angle and a cosine offset at once (2m at z = 1): keep it within the cosine's range.
    _check_margin(self, 1.0)
    _require(self.h >= 0, f"adaface: h must be >= 0 (the paper uses 0.333), got {self.h}.")
    _check_t_alpha(self)

  def init_state(self):
    return {"norm_mean": _f32(20.0), "norm_std": _f32(100.0)}

  @staticmethod
  def _clipped(feature_norm):
    return jax.lax.stop_gradient(jnp.clip(_f32(feature_norm), *_ADAFACE_NORM_RANGE))

  def update_statistics(self, state, *, cos_target, feature_norm):
    norms = self._clipped(feature_norm)
    _require(
        norms.ndim == 1 and norms.shape[0] >= 2,
        f"adaface: batch statistics need B >= 2 feature norms, got shape {norms.shape}.",
    )
    return {
        "norm_mean": _ema(self.t_alpha, jnp.mean(norms), state["norm_mean"]),
        "norm_std": _ema(self.t_alpha, jnp.std(norms, ddof=1), state["norm_std"]),
    }

  def quality(self, feature_norm, state) -> jax.Array:
    """z in [-1, 1] per row, without gradient."""
    scaled = (
        self.h
        * (self._clipped(feature_norm) - state["norm_mean"])
        / (state["norm_std"] + _ADAFACE_STD_EPS)
    )
    return jnp.clip(scaled, -1.0, 1.0)

  def target_logits(self, cos_target, *, state, feature_norm, key):
    theta = losses.safe_arccos(_f32(cos_target))
    z = self.quality(feature_norm, state)
    g_angle, g_add = -self.m * z, self.m * z + self.m
    return self.s * (losses.monotone_cos(jnp.maximum(theta + g_angle, 0.0)) - g_add)

  def metrics(self, state):
    return {"margin": _f32(self.m), "norm_mean": state["norm_mean"], "norm_std": state["norm_std"]}


@register
@dataclasses.dataclass(frozen=True)
class MagFace(Margin):
  """ArcFace with a margin that grows with the feature magnitude, plus a magnitude regulariser.

  Meng, Zhao, Huang, Zhou: "MagFace: A Universal Representation for Face Recognition and Quality
  Assessment", CVPR 2021 (l_a = 10, u_a = 110, l_m = 0.45, u_m = 0.8, lambda_g = 35). With
  a = clip(||x||, l_a, u_a): target s * psi(theta + m(a)), m(a) = l_m + (u_m - l_m)(a - l_a) /
  (u_a - l_a), and the loss adds lambda_g * mean(g(a)), g(a) = 1/a + a/u_a^2 (convex, decreasing on
  [l_a, u_a]). Gradients reach the norm inside [l_a, u_a]. (The official code's default "easy
  margin" drops the margin where cos theta <= 0; the paper's formula, used here, does not.)
  """

  kind: ClassVar[str] = "magface"
  l_a: float = 10.0
  u_a: float = 110.0
  l_m: float = 0.45
  u_m: float = 0.8
  lambda_g: float = 35.0

  def validate(self):
    _require(
        0 < self.l_a < self.u_a and 0 <= self.l_m <= self.u_m < math.pi,
        f"magface needs 0 < l_a < u_a and 0 <= l_m <= u_m < pi; got l_a={self.l_a}, "
        f"u_a={self.u_a}, l_m={self.l_m}, u_m={self.u_m} (the paper: 10, 110, 0.45, 0.8).",
    )
    _require(
        self.lambda_g >= 0,
        f"magface: lambda_g must be >= 0 (the paper uses 35), got {self.lambda_g}.",
    )

  def _magnitude(self, feature_norm):
    return jnp.clip(_f32(feature_norm), self.l_a, self.u_a)

  def margin_of(self, feature_norm) -> jax.Array:
    a = self._magnitude(feature_norm)
    return self.l_m + (self.u_m - self.l_m) * (a - self.l_a) / (self.u_a - self.l_a)

  def init_state(self):
    return {"mean_margin": _f32(self.l_m)}

  def update_statistics(self, state, *, cos_target, feature_norm):
    # Logged only: the mean margin this batch's magnitudes receive.
    return {"mean_margin": jax.lax.stop_gradient(jnp.mean(self.margin_of(feature_norm)))}

  def target_logits(self, cos_target, *, state, feature_norm, key):
    return _arc(cos_target, self.margin_of(feature_norm), self.s)

  def regularizer(self, feature_norm) -> jax.Array:
    a = self._magnitude(feature_norm)
    return 1.0 / a + a / (self.u_a * self.u_a)

  def extra_loss(self, feature_norm):
    return self.lambda_g * jnp.mean(self.regularizer(feature_norm))

  def metrics(self, state):
    return {"margin": state["mean_margin"]}


@dataclasses.dataclass(frozen=True)
class _ElasticFace(Margin):
  """ElasticFace: a margin drawn afresh per row and step, m_i ~ N(m, sigma^2).

  Boutros, Damer, Kirchbuchner, Kuijper: "ElasticFace: Elastic Margin Loss for Deep Face
  Recognition", CVPR Workshops 2022 (sigma = 0.05; m = 0.5 for -Arc, 0.35 for -Cos). The head
  passes the same key to every shard, so each row gets one margin.
  """

  sigma: float = 0.05
  max_margin: ClassVar[float] = math.pi

  def validate(self):
    _check_margin(self, self.max_margin)
    _require(
        self.sigma >= 0, f"{self.kind}: sigma must be >= 0 (the paper uses 0.05), got {self.sigma}."
    )

  def row_margins(self, key: jax.Array, batch_size: int) -> jax.Array:
    return self.m + self.sigma * jax.random.normal(key, (batch_size,), jnp.float32)

  def metrics(self, state):
    return {"margin": _f32(self.m)}


@register
@dataclasses.dataclass(frozen=True)
class ElasticFaceArc(_ElasticFace):
  """ElasticFace-Arc: target s * psi(theta + m_i)."""

  kind: ClassVar[str] = "elasticface_arc"
  m: float = 0.5

  def target_logits(self, cos_target, *, state, feature_norm, key):
    return _arc(cos_target, self.row_margins(key, cos_target.shape[0]), self.s)


@register
@dataclasses.dataclass(frozen=True)
class ElasticFaceCos(_ElasticFace):
  """ElasticFace-Cos: target s * (cos - m_i)."""

  kind: ClassVar[str] = "elasticface_cos"
  m: float = 0.35
  max_margin: ClassVar[float] = 1.0

  def target_logits(self, cos_target, *, state, feature_norm, key):
    margins = self.row_margins(key, cos_target.shape[0])
    return self.s * (jnp.clip(_f32(cos_target), -1.0, 1.0) - margins)


# ------------------------------------------------------------------------------ configuration


def _fields(cls: type[Margin]) -> dict[str, Any]:
  """{name: default} of a margin class's hyper-parameters."""
  return {f.name: f.default for f in dataclasses.fields(cls)}


def _unknown_key_error(kind: str, key: str, valid, block: str = "") -> ValueError:
  """`key` was given under config.loss.<block>, whose fields are `valid`."""
  close = difflib.get_close_matches(key, valid, n=1)
  hint = f" Did you mean {block + close[0]!r}?" if close else ""
  return ValueError(
      f"Unknown field config.loss.{block}{key} for kind={kind!r}.{hint} Valid "
      f"fields: {', '.join(sorted(valid))}. (Each kind has its own fields: to "
      "switch kinds, start from a config that takes the kind as its argument, e.g. "
      "--config=configs/demo.py:curricularface.)"
  )


def loss_config(kind: str, **fields) -> ml_collections.ConfigDict:
  """config.loss for `kind`: its kind and only its fields, at the paper's defaults, updated with
  `fields`. Kinds with auto-margin get an `auto_margin` block with `enabled` False unless given."""
  cls = kind_class(kind)
  values = {"kind": kind, **_fields(cls)}
  if "auto_margin" in values:
    values["auto_margin"] = {"enabled": False, **dataclasses.asdict(AutoMargin())}
  config = ml_collections.ConfigDict(values)
  for key, value in fields.items():
    if key not in config:
      raise _unknown_key_error(kind, key, list(config))
    if key == "auto_margin":
      config.auto_margin.update(value)
    else:
      config[key] = value
  return config


def kind_class(kind: str) -> type[Margin]:
  if not isinstance(kind, str):
    raise ValueError(
        f"config.loss.kind must name a margin kind, got {kind!r}. Valid kinds: "
        f"{', '.join(REGISTRY)}."
    )
  if kind not in REGISTRY:
    close = difflib.get_close_matches(kind, REGISTRY, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"Unknown loss kind {kind!r}.{hint} Valid kinds: {', '.join(REGISTRY)}.")
  return REGISTRY[kind]


def from_config(config: Mapping[str, Any]) -> Margin:
  """The margin that config.loss describes; a one-line ValueError for an unknown kind or field,
  a missing field keeping its default, or a value outside its range."""
  values = dict(config)
  kind = values.pop("kind", None)
  cls = kind_class(kind)
  valid = _fields(cls)
  for key in values:
    if key not in valid:
      raise _unknown_key_error(kind, key, ["kind", *valid])
  if "auto_margin" in values:
    am = dict(values["auto_margin"])
    enabled = am.pop("enabled", False)
    am_valid = [f.name for f in dataclasses.fields(AutoMargin)]
    for key in am:
      if key not in am_valid:
        raise _unknown_key_error(kind, key, ["enabled", *am_valid], block="auto_margin.")
    values["auto_margin"] = AutoMargin(**am) if enabled else None
  defaults = valid
  for key, value in values.items():  # Config files and flags give ints for floats and back.
    default = defaults[key]
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
      values[key] = float(value)
  return cls(**values)
