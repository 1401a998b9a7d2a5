"""Tests of adam_face.margins: the modern kinds' closed-form values against numpy written from the
papers' formulas, degenerate settings against the classic kinds, state updates under jit, the
registry and config round trip, finite loss and gradients for every registered kind on all of
[-1, 1] in float32 and bfloat16, assembly from class shards through the interface, and named
errors. (The classic kinds and the auto-margin are in tests/test_losses.py.)"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adam_face import losses, margins
from margin_calls import target_logits

# Three rows, four classes. Row 0 (target 0.7) has a hard negative (0.5 > cos(theta + 0.5) = 0.27),
# row 1 (target 0.65) one (0.6 > 0.21), row 2 (target 0.95) none.
COS = np.array([[0.7, 0.2, -0.3, 0.5], [0.1, 0.6, 0.65, -0.9], [-0.2, 0.3, 0.95, 0.0]], np.float32)
LABELS = np.array([0, 2, 2], np.int32)
ROWS = np.arange(3)

KINDS = (
    "normface",
    "cosface",
    "arcface",
    "sphereface",
    "combined",
    "adm",
    "subcenter_arcface",
    "curricularface",
    "adaface",
    "magface",
    "elasticface_arc",
    "elasticface_cos",
)
AUTO_MARGIN_KINDS = ("arcface", "cosface", "adm")
# The papers' main face-recognition settings, written out apart from margins.py's defaults.
PAPER_DEFAULTS = {
    "subcenter_arcface": {"s": 64.0, "m": 0.5, "num_subcenters": 3},
    "curricularface": {"s": 64.0, "m": 0.5, "t_alpha": 0.01},
    "adaface": {"s": 64.0, "m": 0.4, "h": 0.333, "t_alpha": 0.01},
    "magface": {"s": 64.0, "l_a": 10.0, "u_a": 110.0, "l_m": 0.45, "u_m": 0.8, "lambda_g": 35.0},
    "elasticface_arc": {"s": 64.0, "m": 0.5, "sigma": 0.05},
    "elasticface_cos": {"s": 64.0, "m": 0.35, "sigma": 0.05},
}


def _cross_entropy(logits, labels):
  """Mean softmax cross-entropy in float64."""
  logits = np.asarray(logits, np.float64)
  top = logits.max(axis=1, keepdims=True)
  log_sum = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
  return float(np.mean(log_sum - logits[np.arange(len(labels)), labels]))


def _with_target(cos, labels, target_logit, nontarget_logits):
  logits = np.array(nontarget_logits, np.float64)
  logits[np.arange(len(labels)), labels] = target_logit
  return logits


def _assert_loss(actual, expected, rtol=2e-6):
  np.testing.assert_allclose(float(actual), expected, rtol=rtol)


def _flat(cos_sub):
  """[B, C, K] sub-centre cosines -> [B, C*K], class-major as the head stores the centres."""
  cos_sub = np.asarray(cos_sub)
  return cos_sub.reshape(cos_sub.shape[0], -1)


# ---------------------------------------------------------------------------------- sub-center


def test_subcenter_cos_pools_the_nearest_subcentre():
  cos_sub = np.array([[[0.1, 0.9], [-0.5, -0.2]], [[0.3, 0.3], [1.0, -1.0]]], np.float32)
  pool = margins.SubcenterArcFace(num_subcenters=2).pool_class_cosines
  np.testing.assert_array_equal(
      pool(_flat(cos_sub)), np.array([[0.9, -0.2], [0.3, 1.0]], np.float32)
  )
  one = margins.SubcenterArcFace(num_subcenters=1)
  np.testing.assert_array_equal(one.pool_class_cosines(COS), COS)  # K = 1: identity.
  assert one.centers_per_class == 1 and margins.SubcenterArcFace().centers_per_class == 3


def test_subcenter_arcface_closed_form():
  params = PAPER_DEFAULTS["subcenter_arcface"]
  s, m, k = params["s"], params["m"], params["num_subcenters"]
  sub = margins.SubcenterArcFace(s=s, m=m, num_subcenters=k)
  rng = np.random.default_rng(0)
  cos_sub = rng.uniform(-0.6, 1.0, size=(3, 4, k)).astype(np.float32)
  pooled = cos_sub.astype(np.float64).max(axis=2)
  target = s * np.cos(np.arccos(pooled[ROWS, LABELS]) + m)
  expected = _cross_entropy(_with_target(pooled, LABELS, target, s * pooled), LABELS)
  loss, metrics, state = losses.margin_softmax_loss(
      sub.pool_class_cosines(_flat(cos_sub)), LABELS, sub
  )
  _assert_loss(loss, expected)
  assert float(metrics["acc"]) == np.mean(pooled.argmax(axis=1) == LABELS)
  assert state == {}


def test_subcenter_with_one_subcentre_is_arcface():
  sub = margins.SubcenterArcFace(s=32.0, m=0.5, num_subcenters=1)
  loss, metrics, _ = losses.margin_softmax_loss(sub.pool_class_cosines(COS), LABELS, sub)
  arc_loss, arc_metrics, _ = losses.margin_softmax_loss(COS, LABELS, margins.ArcFace(s=32.0, m=0.5))
  assert float(loss) == pytest.approx(float(arc_loss), rel=1e-6)
  assert {k: float(v) for k, v in metrics.items()} == {k: float(v) for k, v in arc_metrics.items()}


# ------------------------------------------------------------------------------ CurricularFace


def _curricular_reference(cos, labels, t_before, s, m, t_alpha):
  cos = np.asarray(cos, np.float64)
  cos_target = cos[np.arange(len(labels)), labels]
  t = t_alpha * cos_target.mean() + (1 - t_alpha) * t_before  # Updated before use.
  positive = np.cos(np.arccos(cos_target) + m)
  negatives = np.where(cos > positive[:, None], cos * (t + cos), cos)
  return _cross_entropy(_with_target(cos, labels, s * positive, s * negatives), labels), t


def test_curricularface_closed_form():
  params = PAPER_DEFAULTS["curricularface"]
  s, m, t_alpha = params["s"], params["m"], params["t_alpha"]
  curricular = margins.CurricularFace(s=s, m=m, t_alpha=t_alpha)
  state = {"t": jnp.asarray(0.3, jnp.float32)}
  loss, metrics, new_state = losses.margin_softmax_loss(COS, LABELS, curricular, state)
  expected, t = _curricular_reference(COS, LABELS, 0.3, s, m, t_alpha)
  _assert_loss(loss, expected)
  assert float(new_state["t"]) == pytest.approx(t, rel=1e-6)
  assert float(metrics["t"]) == float(new_state["t"])
  # The hard negatives of rows 0 and 1 really are re-weighted: cos_j * (t + cos_j).
  logits = margins.CurricularFace(s=1.0, m=m).nontarget_logits(
      COS, cos_target=COS[ROWS, LABELS], state={"t": jnp.float32(0.3)}
  )
  np.testing.assert_allclose(logits[0], [0.7 * 1.0, 0.2, -0.3, 0.5 * 0.8], rtol=1e-6)
  np.testing.assert_allclose(logits[1], [0.1, 0.6 * 0.9, 0.65 * 0.95, -0.9], rtol=1e-6)


@pytest.mark.parametrize("t", [0.0, 0.7])
def test_curricularface_without_hard_negatives_is_arcface(t):
  easy = COS[2:]  # Every negative below cos(theta + m).
  loss, metrics, _ = losses.margin_softmax_loss(
      easy, LABELS[2:], margins.CurricularFace(s=64.0, m=0.5), {"t": jnp.float32(t)}
  )
  arc_loss, arc_metrics, _ = losses.margin_softmax_loss(
      easy, LABELS[2:], margins.ArcFace(s=64.0, m=0.5)
  )
  assert float(loss) == pytest.approx(float(arc_loss), rel=1e-6)
  assert metrics["acc_margin"] == arc_metrics["acc_margin"]
  # t = 0 damps a hard negative to cos_j^2 and otherwise changes nothing.
  damped = margins.CurricularFace(s=2.0, m=0.5).nontarget_logits(
      COS, cos_target=COS[ROWS, LABELS], state={"t": jnp.float32(0.0)}
  )
  np.testing.assert_allclose(damped[0], 2.0 * np.array([0.49, 0.2, -0.3, 0.25]), rtol=1e-6)


def test_curricularface_state_under_jit():
  curricular = margins.CurricularFace(s=64.0, m=0.5, t_alpha=0.01)
  step = jax.jit(lambda cos, state: losses.margin_softmax_loss(cos, LABELS, curricular, state)[2])
  state, t = curricular.init_state(), 0.0
  assert float(state["t"]) == 0.0  # t^(0) = 0.
  for shift in (0.0, 0.05, -0.1):
    cos = np.clip(COS + shift, -1, 1)
    state = step(cos, state)
    t = 0.01 * cos[ROWS, LABELS].astype(np.float64).mean() + 0.99 * t
    assert state["t"].dtype == jnp.float32
    assert float(state["t"]) == pytest.approx(t, rel=1e-5)


# ------------------------------------------------------------------------------------ AdaFace


def _adaface_reference(cos, labels, norms, mean, std, s, m, h, t_alpha):
  cos, norms = np.asarray(cos, np.float64), np.clip(np.asarray(norms, np.float64), 0.001, 100)
  mean = t_alpha * norms.mean() + (1 - t_alpha) * mean
  std = t_alpha * norms.std(ddof=1) + (1 - t_alpha) * std
  z = np.clip(h * (norms - mean) / (std + 1e-3), -1, 1)
  theta = np.arccos(cos[np.arange(len(labels)), labels])
  target = s * (np.cos(np.maximum(theta - m * z, 0)) - (m * z + m))
  return _cross_entropy(_with_target(cos, labels, target, s * cos), labels), mean, std, z


def test_adaface_closed_form():
  params = PAPER_DEFAULTS["adaface"]
  s, m = params["s"], params["m"]
  # h = 2 and a fast average spread z over [-1, 1]: row 2 (z = 1, theta = 0.32 < m) hits the
  # clip of the angle at 0, and the 250 is clipped to 100 before any statistic.
  norms = np.array([5.0, 30.0, 250.0], np.float32)
  ada = margins.AdaFace(s=s, m=m, h=2.0, t_alpha=0.5)
  state = ada.init_state()
  assert float(state["norm_mean"]) == 20.0 and float(state["norm_std"]) == 100.0
  loss, metrics, new_state = losses.margin_softmax_loss(COS, LABELS, ada, state, feature_norm=norms)
  expected, mean, std, z = _adaface_reference(COS, LABELS, norms, 20.0, 100.0, s, m, 2.0, 0.5)
  assert z[2] == 1.0 and np.arccos(0.95) < m
  _assert_loss(loss, expected)
  assert float(new_state["norm_mean"]) == pytest.approx(mean, rel=1e-6)
  assert float(new_state["norm_std"]) == pytest.approx(std, rel=1e-6)
  assert float(metrics["norm_std"]) == float(new_state["norm_std"])
  assert float(metrics["norm_mean"]) == float(new_state["norm_mean"])
  np.testing.assert_allclose(ada.quality(norms, new_state), z, rtol=1e-6)


def test_adaface_degenerate_margins():
  s, m = 64.0, 0.4
  norms = np.array([5.0, 30.0, 80.0], np.float32)
  # h = 0 (or z = 0): CosFace with margin m.
  loss, _, _ = losses.margin_softmax_loss(
      COS, LABELS, margins.AdaFace(s=s, m=m, h=0.0), feature_norm=norms
  )
  cos_loss, _, _ = losses.margin_softmax_loss(COS, LABELS, margins.CosFace(s=s, m=m))
  assert float(loss) == pytest.approx(float(cos_loss), rel=1e-6)
  cos_target = np.linspace(-1, 1, 9, dtype=np.float32)
  # A state and norms that give the row quality z: h (norm - 50) / (10 - 1e-3 + 1e-3) = z.
  ada = margins.AdaFace(s=s, m=m, h=1.0)
  state = {"norm_mean": jnp.float32(50.0), "norm_std": jnp.float32(10.0 - 1e-3)}

  def target_at(z):
    norm = np.full(9, 50.0 + 10.0 * z, np.float32)
    np.testing.assert_allclose(ada.quality(norm, state), np.full(9, z), atol=1e-6)
    return target_logits(ada, cos_target, state=state, feature_norm=jnp.asarray(norm))

  # z = -1 (lowest quality): ArcFace with margin m; z in [-1, 0]: combined (1, -m z, m (1 + z)).
  for z in (-1.0, -0.5, 0.0):
    np.testing.assert_allclose(
        target_at(z),
        target_logits(margins.Combined(s=s, m1=1.0, m2=-m * z, m3=m * (1 + z)), cos_target),
        rtol=1e-5,
        atol=1e-5,
    )
  np.testing.assert_allclose(
      target_at(-1.0), target_logits(margins.ArcFace(s=s, m=m), cos_target), rtol=1e-5, atol=1e-5
  )


def test_adaface_state_under_jit():
  ada = margins.AdaFace(s=64.0, m=0.4, h=0.333, t_alpha=0.01)
  step = jax.jit(
      lambda norms, state: losses.margin_softmax_loss(COS, LABELS, ada, state, feature_norm=norms)[
          2
      ]
  )
  state, mean, std = ada.init_state(), 20.0, 100.0
  for norms in ([10.0, 20.0, 30.0], [12.0, 18.0, 40.0]):
    state = step(np.asarray(norms, np.float32), state)
    mean = 0.01 * np.mean(norms) + 0.99 * mean
    std = 0.01 * np.std(norms, ddof=1) + 0.99 * std
    assert float(state["norm_mean"]) == pytest.approx(mean, rel=1e-6)
    assert float(state["norm_std"]) == pytest.approx(std, rel=1e-6)


# ------------------------------------------------------------------------------------ MagFace


def test_magface_closed_form():
  params = dict(PAPER_DEFAULTS["magface"])
  s, lambda_g = params["s"], params["lambda_g"]
  mag = margins.MagFace(**params)
  assert mag == margins.MagFace()  # The paper's values are the defaults.
  norms = np.array([5.0, 60.0, 200.0], np.float32)  # Clipped to 10 and 110 at the ends.
  a = np.array([10.0, 60.0, 110.0])
  margin = np.array([0.45, 0.45 + 0.35 * 50 / 100, 0.8])
  cos = COS.astype(np.float64)
  target = s * np.cos(np.arccos(cos[ROWS, LABELS]) + margin)
  regularizer = np.mean(1 / a + a / 110.0**2)
  expected = _cross_entropy(_with_target(cos, LABELS, target, s * cos), LABELS)
  loss, metrics, state = losses.margin_softmax_loss(COS, LABELS, mag, feature_norm=norms)
  _assert_loss(loss, expected + lambda_g * regularizer)
  assert float(jnp.mean(mag.regularizer(norms))) == pytest.approx(regularizer, rel=1e-6)
  assert float(mag.extra_loss(norms)) == pytest.approx(lambda_g * regularizer, rel=1e-6)
  assert float(metrics["margin"]) == pytest.approx(margin.mean(), rel=1e-6)
  np.testing.assert_allclose(mag.margin_of(norms), margin, rtol=1e-6)
  # The state only logs the batch's mean margin.
  assert set(state) == {"mean_margin"}
  assert float(state["mean_margin"]) == pytest.approx(margin.mean(), rel=1e-6)


def test_magface_at_a_fixed_norm_is_arcface():
  mag = margins.MagFace(**dict(PAPER_DEFAULTS["magface"], lambda_g=0.0))
  norms = np.full(3, 60.0, np.float32)  # m(60) = 0.45 + 0.35 * 0.5 = 0.625.
  loss, metrics, _ = losses.margin_softmax_loss(COS, LABELS, mag, feature_norm=norms)
  arc_loss, arc_metrics, _ = losses.margin_softmax_loss(
      COS, LABELS, margins.ArcFace(s=64.0, m=0.625)
  )
  assert float(loss) == pytest.approx(float(arc_loss), rel=1e-6)
  assert metrics["acc_margin"] == arc_metrics["acc_margin"]


def test_magface_regulariser_gradient():
  norms = jnp.array([5.0, 10.5, 60.0, 109.0, 200.0])
  mag = margins.MagFace(l_a=10.0, u_a=110.0)
  grad = jax.grad(lambda a: jnp.sum(mag.regularizer(a)))(norms)
  a = np.array([10.5, 60.0, 109.0])
  # g'(a) = -1/a^2 + 1/u_a^2 inside [l_a, u_a] (negative: larger norms are rewarded), 0 outside.
  np.testing.assert_allclose(grad, np.r_[0.0, -1 / a**2 + 1 / 110.0**2, 0.0], rtol=1e-5)


# -------------------------------------------------------------------------------- ElasticFace


@pytest.mark.parametrize(
    "kind, fixed_kind", [("elasticface_arc", "arcface"), ("elasticface_cos", "cosface")]
)
def test_elasticface_with_sigma_zero_is_the_fixed_margin(kind, fixed_kind):
  m = PAPER_DEFAULTS[kind]["m"]
  elastic = margins.from_config(margins.loss_config(kind, s=64.0, m=m, sigma=0.0))
  loss, metrics, state = losses.margin_softmax_loss(COS, LABELS, elastic, key=jax.random.key(0))
  fixed, fixed_metrics, _ = losses.margin_softmax_loss(
      COS, LABELS, margins.from_config(margins.loss_config(fixed_kind, s=64.0, m=m))
  )
  assert float(loss) == pytest.approx(float(fixed), rel=1e-6)
  assert metrics["acc_margin"] == fixed_metrics["acc_margin"]
  assert float(metrics["margin"]) == pytest.approx(m) and state == {}


def test_elasticface_closed_form_with_drawn_margins():
  key = jax.random.key(7)
  params = PAPER_DEFAULTS["elasticface_arc"]
  draws = np.asarray(
      margins.ElasticFaceArc(m=params["m"], sigma=params["sigma"]).row_margins(key, 20_000)
  )
  assert draws.dtype == np.float32
  assert abs(draws.mean() - 0.5) < 4 * 0.05 / np.sqrt(20_000)
  assert draws.std() == pytest.approx(0.05, rel=0.03)
  # The loss uses the margins drawn from the same key for its batch, one per row.
  row_margins = np.asarray(
      margins.ElasticFaceArc(m=0.5, sigma=0.05).row_margins(key, 3), np.float64
  )
  assert len(np.unique(row_margins)) == 3
  cos = COS.astype(np.float64)
  theta = np.arccos(cos[ROWS, LABELS])
  for cls, target in (
      (margins.ElasticFaceArc, np.cos(theta + row_margins)),
      (margins.ElasticFaceCos, cos[ROWS, LABELS] - row_margins),
  ):
    elastic = cls(s=64.0, m=0.5, sigma=0.05)
    np.testing.assert_array_equal(elastic.row_margins(key, 3), row_margins.astype(np.float32))
    loss, metrics, _ = losses.margin_softmax_loss(COS, LABELS, elastic, key=key)
    expected = _cross_entropy(_with_target(cos, LABELS, 64.0 * target, 64.0 * cos), LABELS)
    _assert_loss(loss, expected)
    # metrics["margin"] is now the configured m (the old loss logged the batch's mean draw).
    assert float(metrics["margin"]) == pytest.approx(0.5)
  # A different key draws different margins: a different loss.
  other, _, _ = losses.margin_softmax_loss(
      COS, LABELS, margins.ElasticFaceArc(), key=jax.random.key(8)
  )
  same, _, _ = losses.margin_softmax_loss(COS, LABELS, margins.ElasticFaceArc(), key=key)
  assert float(other) != float(same)


# ------------------------------------------------------------------------- registry and config


def test_registry_holds_every_kind():
  assert set(margins.REGISTRY) == set(KINDS) and len(margins.REGISTRY) == 12
  for kind, cls in margins.REGISTRY.items():
    assert cls.kind == kind and issubclass(cls, margins.Margin)
  assert {k for k, c in margins.REGISTRY.items() if issubclass(c, margins.AdditiveMargin)} == set(
      AUTO_MARGIN_KINDS
  )


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_builds_from_its_default_config(kind):
  cls = margins.REGISTRY[kind]
  config = margins.loss_config(kind)
  fields = {f.name for f in dataclasses.fields(cls)}
  assert set(config.keys()) == {"kind"} | fields
  assert config.kind == kind
  assert ("auto_margin" in config) == (kind in AUTO_MARGIN_KINDS)
  if kind in AUTO_MARGIN_KINDS:
    assert set(config.auto_margin.keys()) == (
        {"enabled"} | {f.name for f in dataclasses.fields(margins.AutoMargin)}
    )
    assert config.auto_margin.enabled is False
  margin = margins.from_config(config)
  assert type(margin) is cls and margin == cls()
  for name in fields - {"auto_margin"}:
    assert config[name] == getattr(margin, name)
  assert getattr(margin, "auto_margin", None) is None
  if kind in PAPER_DEFAULTS:
    assert {name: config[name] for name in PAPER_DEFAULTS[kind]} == PAPER_DEFAULTS[kind]
  # Fields given to loss_config reach the object.
  assert margins.from_config(margins.loss_config(kind, s=16.0)) == cls(s=16.0)
  # A plain mapping works too: a missing field keeps its default, and an int given for a float
  # field (as config files and flags do) becomes a float.
  built = margins.from_config({"kind": kind, "s": 16})
  assert built == cls(s=16.0) and isinstance(built.s, float)


# ---------------------------------------------------------------------------- every kind at once

# Targets and negatives at exactly -1 and +1 (and near them).
EDGE_COS = np.array(
    [
        [1.0, -1.0, 0.3, 1.0],
        [-1.0, 1.0, -1.0, 0.999],
        [0.5, -0.999, 1.0, -1.0],
        [1.0, 1.0, -1.0, 0.0],
    ],
    np.float32,
)
EDGE_LABELS = np.array([0, 0, 2, 2], np.int32)
# A grid over [-1, 1], reversed, and rows of +1 and -1 (the old classic-kind test).
_GRID = np.linspace(-1, 1, 21)
GRID_COS = np.stack([_GRID, _GRID[::-1], np.full(21, 1.0), np.full(21, -1.0)]).astype(np.float32)
GRID_LABELS = np.array([0, 20, 3, 7], np.int32)
# Norms below, inside and above MagFace's [l_a, u_a] and AdaFace's clip range.
EDGE_NORMS = np.array([0.0, 10.0, 110.0, 500.0], np.float32)


def _loss_of(margin, cos, norms, labels):
  """The single-device loss of `margin` with every input it reads; sub-centre cosines are
  [cos, flipped cos, -cos] per class."""
  if margin.centers_per_class > 1:
    subs = [cos, jnp.flip(cos, axis=1), -cos][: margin.centers_per_class]
    cos = jnp.stack(subs, axis=-1).reshape(cos.shape[0], -1)
  state = margin.init_state()
  if "t" in state:
    state = {"t": jnp.float32(0.5)}
  return losses.margin_softmax_loss(
      margin.pool_class_cosines(cos),
      labels,
      margin,
      state,
      feature_norm=norms,
      key=jax.random.key(1),
  )[0]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_finite_loss_and_gradients_at_both_ends(kind, dtype):
  norms = jnp.asarray(EDGE_NORMS, dtype)
  for cos, labels in ((EDGE_COS, EDGE_LABELS), (GRID_COS, GRID_LABELS)):
    cos = jnp.asarray(cos, dtype)
    for s in (1.0, 64.0, 128.0):
      margin = margins.from_config(margins.loss_config(kind, s=s))
      loss, (grad_cos, grad_norms) = jax.value_and_grad(
          lambda c, n: _loss_of(margin, c, n, jnp.asarray(labels)), argnums=(0, 1)
      )(cos, norms)
      assert loss.dtype == jnp.float32 and np.isfinite(float(loss)), (s, float(loss))
      assert grad_cos.dtype == dtype and grad_norms.dtype == dtype
      assert np.all(np.isfinite(np.asarray(grad_cos, np.float32))), s
      assert np.all(np.isfinite(np.asarray(grad_norms, np.float32))), s
      assert np.any(np.asarray(grad_cos, np.float32) != 0), s


@pytest.mark.parametrize("kind", KINDS)
def test_losses_assemble_from_class_shards(kind):
  # A class-sharded head sees two halves of the classes: it recovers cos_target for every row,
  # takes the batch's statistics, builds each half's logits from target_logits and
  # nontarget_logits (each half pooling its own sub-centres), and finishes the softmax over the
  # halves, adding extra_loss. That must equal the single-device loss.
  margin = margins.from_config(margins.loss_config(kind))
  k = margin.centers_per_class
  rng = np.random.default_rng(5)
  cos = rng.uniform(-1, 1, size=(6, 8 * k)).astype(np.float32)
  labels = np.array([0, 3, 4, 7, 7, 1], np.int32)
  norms = np.array([8.0, 15.0, 22.0, 30.0, 60.0, 120.0], np.float32)
  key = jax.random.key(3)
  state = margin.init_state()
  if "t" in state:
    state = {"t": jnp.float32(0.5)}
  pooled = np.asarray(margin.pool_class_cosines(cos))
  cos_target = pooled[np.arange(6), labels]
  batch_state = margin.update_statistics(state, cos_target=cos_target, feature_norm=norms)
  target = margin.target_logits(cos_target, state=batch_state, feature_norm=norms, key=key)
  halves = []
  for classes in (np.arange(4), np.arange(4, 8)):
    local = margin.pool_class_cosines(cos[:, classes[0] * k : (classes[-1] + 1) * k])
    nontarget = margin.nontarget_logits(local, cos_target=cos_target, state=batch_state)
    halves.append(jnp.where(labels[:, None] == classes[None, :], target[:, None], nontarget))
  sharded = jnp.mean(jax.nn.logsumexp(jnp.concatenate(halves, axis=1), axis=1) - target)
  sharded = sharded + margin.extra_loss(norms)
  full = losses.margin_softmax_loss(pooled, labels, margin, state, feature_norm=norms, key=key)[0]
  assert float(sharded) == pytest.approx(float(full), rel=1e-6)


# ------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: margins.SubcenterArcFace(s=0.0, m=0.5), "scale s must be > 0"),
        (lambda: margins.SubcenterArcFace(s=64.0, m=4.0), "subcenter_arcface: margin m"),
        (lambda: margins.SubcenterArcFace(num_subcenters=0), "num_subcenters"),
        (lambda: margins.SubcenterArcFace(num_subcenters=2.0), "num_subcenters"),
        (
            lambda: losses.margin_softmax_loss(
                COS, np.array([0, 4, 1]), margins.CurricularFace(s=64.0, m=0.5)
            ),
            r"Labels must lie in \[0, 4\)",
        ),
        (lambda: margins.CurricularFace(s=64.0, m=0.5, t_alpha=0.0), "t_alpha"),
        (lambda: margins.CurricularFace(m=4.0), "curricularface: margin m"),
        (
            lambda: losses.margin_softmax_loss(
                COS, LABELS, margins.AdaFace(), feature_norm=np.ones(2)
            ),
            r"one value per row, shape \(3,\)",
        ),
        (
            lambda: losses.margin_softmax_loss(
                COS[:1], LABELS[:1], margins.AdaFace(), feature_norm=np.ones(1)
            ),
            "B >= 2",
        ),
        (
            lambda: margins.AdaFace().update_statistics(
                margins.AdaFace().init_state(), cos_target=np.ones(1), feature_norm=np.ones(1)
            ),
            "B >= 2",
        ),
        (lambda: margins.AdaFace(s=64.0, m=0.4, h=-1.0), "adaface: h must be >= 0"),
        (lambda: margins.AdaFace(s=64.0, m=1.5, h=0.333), r"adaface: margin m must be in \[0, 1\]"),
        (lambda: margins.AdaFace(t_alpha=1.5), "adaface: t_alpha"),
        (
            lambda: margins.MagFace(s=64.0, l_a=110.0, u_a=10.0, l_m=0.45, u_m=0.8, lambda_g=35.0),
            "l_a < u_a",
        ),
        (
            lambda: margins.MagFace(s=64.0, l_a=10.0, u_a=110.0, l_m=0.9, u_m=0.8, lambda_g=35.0),
            "l_m <= u_m",
        ),
        (
            lambda: margins.MagFace(s=64.0, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=-1.0),
            "lambda_g",
        ),
        (
            lambda: margins.from_config(
                {"kind": "elasticface", "s": 64.0, "m": 0.5, "sigma": 0.05}
            ),
            r"Unknown loss kind 'elasticface'\. Did you mean 'elasticface_(arc|cos)'\?",
        ),
        (lambda: margins.ElasticFaceArc(s=64.0, m=0.5, sigma=-0.1), "elasticface_arc: sigma"),
        (
            lambda: margins.ElasticFaceCos(s=64.0, m=1.5, sigma=0.05),
            r"elasticface_cos: margin m must be in \[0, 1\]",
        ),
        (lambda: margins.from_config(margins.loss_config("magface", l_m=0.9)), "l_m <= u_m"),
        (
            lambda: margins.loss_config("adaface", sigma=0.1),
            r"Unknown field config\.loss\.sigma for kind='adaface'\..*Valid fields: h, kind, m, s, "
            r"t_alpha\.",
        ),
        (
            lambda: margins.from_config({"kind": "magface", "l_mm": 0.5}),
            r"Unknown field config\.loss\.l_mm for kind='magface'\. Did you mean 'l_m'\?",
        ),
    ],
)
def test_bad_parameters_are_named(call, message):
  with pytest.raises(ValueError, match=message):
    call()


def test_subcenter_pool_refuses_a_width_that_is_not_a_multiple_of_k():
  with pytest.raises(ValueError, match="4 cosines per row is not a multiple of the 3 sub-centres"):
    margins.SubcenterArcFace(num_subcenters=3).pool_class_cosines(jnp.asarray(COS))  # 4, K = 3.
