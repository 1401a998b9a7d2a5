"""Tests of adam_face.modern_losses: closed-form values against numpy written from the papers'
formulas, degenerate settings against adam_face.losses, finite gradients on all of [-1, 1] in
float32 and bfloat16, state updates under jit, assembly from class shards, and named errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adam_face import losses
from adam_face import modern_losses as ml

# Three rows, four classes. Row 0 (target 0.7) has a hard negative (0.5 > cos(theta + 0.5) = 0.27),
# row 1 (target 0.65) one (0.6 > 0.21), row 2 (target 0.95) none.
COS = np.array([[0.7, 0.2, -0.3, 0.5],
                [0.1, 0.6, 0.65, -0.9],
                [-0.2, 0.3, 0.95, 0.0]], np.float32)
LABELS = np.array([0, 2, 2], np.int32)
ROWS = np.arange(3)


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


# ---------------------------------------------------------------------------------- sub-center


def test_subcenter_cos_pools_the_nearest_subcentre():
  cos_sub = np.array([[[0.1, 0.9], [-0.5, -0.2]], [[0.3, 0.3], [1.0, -1.0]]], np.float32)
  np.testing.assert_array_equal(ml.subcenter_cos(cos_sub),
                                np.array([[0.9, -0.2], [0.3, 1.0]], np.float32))
  np.testing.assert_array_equal(ml.subcenter_cos(COS[:, :, None]), COS)  # K = 1: identity.


def test_subcenter_arcface_closed_form():
  params = ml.PAPER_DEFAULTS[ml.SUBCENTER_ARCFACE]
  s, m, k = params["s"], params["m"], params["num_subcenters"]
  rng = np.random.default_rng(0)
  cos_sub = rng.uniform(-0.6, 1.0, size=(3, 4, k)).astype(np.float32)
  pooled = cos_sub.astype(np.float64).max(axis=2)
  target = s * np.cos(np.arccos(pooled[ROWS, LABELS]) + m)
  expected = _cross_entropy(_with_target(pooled, LABELS, target, s * pooled), LABELS)
  loss, metrics, state = ml.subcenter_arcface_loss(cos_sub, LABELS, s=s, m=m)
  _assert_loss(loss, expected)
  assert float(metrics["acc"]) == np.mean(pooled.argmax(axis=1) == LABELS)
  assert state == {}


def test_subcenter_with_one_subcentre_is_arcface():
  loss, metrics, _ = ml.subcenter_arcface_loss(COS[:, :, None], LABELS, s=32.0, m=0.5)
  arc_loss, arc_metrics = losses.margin_softmax_loss(COS, LABELS, kind="arcface", s=32.0, m=0.5)
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
  params = ml.PAPER_DEFAULTS[ml.CURRICULARFACE]
  s, m, t_alpha = params["s"], params["m"], params["t_alpha"]
  state = {"t": jnp.asarray(0.3, jnp.float32)}
  loss, metrics, new_state = ml.curricularface_loss(COS, LABELS, state, s=s, m=m,
                                                    t_alpha=t_alpha)
  expected, t = _curricular_reference(COS, LABELS, 0.3, s, m, t_alpha)
  _assert_loss(loss, expected)
  assert float(new_state["t"]) == pytest.approx(t, rel=1e-6)
  assert float(metrics["t"]) == float(new_state["t"])
  # The hard negatives of rows 0 and 1 really are re-weighted: cos_j * (t + cos_j).
  logits = ml.nontarget_logits_curricularface(COS, COS[ROWS, LABELS], s=1.0, m=m, t=0.3)
  np.testing.assert_allclose(logits[0], [0.7 * 1.0, 0.2, -0.3, 0.5 * 0.8], rtol=1e-6)
  np.testing.assert_allclose(logits[1], [0.1, 0.6 * 0.9, 0.65 * 0.95, -0.9], rtol=1e-6)


@pytest.mark.parametrize("t", [0.0, 0.7])
def test_curricularface_without_hard_negatives_is_arcface(t):
  easy = COS[2:]  # Every negative below cos(theta + m).
  loss, metrics, _ = ml.curricularface_loss(easy, LABELS[2:], {"t": jnp.float32(t)}, s=64.0,
                                            m=0.5)
  arc_loss, arc_metrics = losses.margin_softmax_loss(easy, LABELS[2:], kind="arcface", s=64.0,
                                                     m=0.5)
  assert float(loss) == pytest.approx(float(arc_loss), rel=1e-6)
  assert metrics["acc_margin"] == arc_metrics["acc_margin"]
  # t = 0 damps a hard negative to cos_j^2 and otherwise changes nothing.
  damped = ml.nontarget_logits_curricularface(COS, COS[ROWS, LABELS], s=2.0, m=0.5, t=0.0)
  np.testing.assert_allclose(damped[0], 2.0 * np.array([0.49, 0.2, -0.3, 0.25]), rtol=1e-6)


def test_curricularface_state_under_jit():
  step = jax.jit(lambda cos, state: ml.curricularface_loss(cos, LABELS, state, s=64.0, m=0.5,
                                                           t_alpha=0.01)[2])
  state, t = ml.init_curricularface_state(), 0.0
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
  params = ml.PAPER_DEFAULTS[ml.ADAFACE]
  s, m = params["s"], params["m"]
  # h = 2 and a fast average spread z over [-1, 1]: row 2 (z = 1, theta = 0.32 < m) hits the
  # clip of the angle at 0, and the 250 is clipped to 100 before any statistic.
  norms = np.array([5.0, 30.0, 250.0], np.float32)
  state = ml.init_adaface_state()
  loss, metrics, new_state = ml.adaface_loss(COS, LABELS, norms, state, s=s, m=m, h=2.0,
                                             t_alpha=0.5)
  expected, mean, std, z = _adaface_reference(COS, LABELS, norms, 20.0, 100.0, s, m, 2.0, 0.5)
  assert z[2] == 1.0 and np.arccos(0.95) < m
  _assert_loss(loss, expected)
  assert float(new_state["norm_mean"]) == pytest.approx(mean, rel=1e-6)
  assert float(new_state["norm_std"]) == pytest.approx(std, rel=1e-6)
  assert float(metrics["norm_std"]) == float(new_state["norm_std"])
  np.testing.assert_allclose(ml.adaface_margin_scaler(norms, new_state, h=2.0), z, rtol=1e-6)


def test_adaface_degenerate_margins():
  s, m = 64.0, 0.4
  norms = np.array([5.0, 30.0, 80.0], np.float32)
  # h = 0 (or z = 0): CosFace with margin m.
  loss, _, _ = ml.adaface_loss(COS, LABELS, norms, ml.init_adaface_state(), s=s, m=m, h=0.0)
  cos_loss, _ = losses.margin_softmax_loss(COS, LABELS, kind="cosface", s=s, m=m)
  assert float(loss) == pytest.approx(float(cos_loss), rel=1e-6)
  cos_target = np.linspace(-1, 1, 9, dtype=np.float32)
  # z = -1 (lowest quality): ArcFace with margin m; z in [-1, 0]: combined (1, -m z, m (1 + z)).
  for z in (-1.0, -0.5, 0.0):
    np.testing.assert_allclose(
        ml.target_logits_adaface(cos_target, np.full(9, z, np.float32), s=s, m=m),
        losses.target_logits(cos_target, kind="combined", s=s, m=(1.0, -m * z, m * (1 + z))),
        rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      ml.target_logits_adaface(cos_target, -np.ones(9, np.float32), s=s, m=m),
      losses.target_logits(cos_target, kind="arcface", s=s, m=m), rtol=1e-5, atol=1e-5)


def test_adaface_state_under_jit():
  step = jax.jit(lambda norms, state: ml.adaface_loss(COS, LABELS, norms, state, s=64.0, m=0.4,
                                                      h=0.333, t_alpha=0.01)[2])
  state, mean, std = ml.init_adaface_state(), 20.0, 100.0
  for norms in ([10.0, 20.0, 30.0], [12.0, 18.0, 40.0]):
    state = step(np.asarray(norms, np.float32), state)
    mean = 0.01 * np.mean(norms) + 0.99 * mean
    std = 0.01 * np.std(norms, ddof=1) + 0.99 * std
    assert float(state["norm_mean"]) == pytest.approx(mean, rel=1e-6)
    assert float(state["norm_std"]) == pytest.approx(std, rel=1e-6)


# ------------------------------------------------------------------------------------ MagFace


def test_magface_closed_form():
  params = dict(ml.PAPER_DEFAULTS[ml.MAGFACE])
  s, l_a, u_a, l_m, u_m, lambda_g = (params[k] for k in ("s", "l_a", "u_a", "l_m", "u_m",
                                                         "lambda_g"))
  norms = np.array([5.0, 60.0, 200.0], np.float32)  # Clipped to 10 and 110 at the ends.
  a = np.array([10.0, 60.0, 110.0])
  margin = np.array([0.45, 0.45 + 0.35 * 50 / 100, 0.8])
  cos = COS.astype(np.float64)
  target = s * np.cos(np.arccos(cos[ROWS, LABELS]) + margin)
  regularizer = np.mean(1 / a + a / 110.0**2)
  expected = _cross_entropy(_with_target(cos, LABELS, target, s * cos), LABELS)
  loss, metrics, state = ml.magface_loss(COS, LABELS, norms, **params)
  _assert_loss(loss, expected + lambda_g * regularizer)
  assert float(metrics["regularizer"]) == pytest.approx(regularizer, rel=1e-6)
  assert float(metrics["margin"]) == pytest.approx(margin.mean(), rel=1e-6)
  np.testing.assert_allclose(
      ml.magface_margin(norms, l_a=l_a, u_a=u_a, l_m=l_m, u_m=u_m), margin, rtol=1e-6)
  assert state == {}


def test_magface_at_a_fixed_norm_is_arcface():
  params = dict(ml.PAPER_DEFAULTS[ml.MAGFACE], lambda_g=0.0)
  norms = np.full(3, 60.0, np.float32)  # m(60) = 0.45 + 0.35 * 0.5 = 0.625.
  loss, metrics, _ = ml.magface_loss(COS, LABELS, norms, **params)
  arc_loss, arc_metrics = losses.margin_softmax_loss(COS, LABELS, kind="arcface", s=64.0,
                                                     m=0.625)
  assert float(loss) == pytest.approx(float(arc_loss), rel=1e-6)
  assert metrics["acc_margin"] == arc_metrics["acc_margin"]


def test_magface_regulariser_gradient():
  norms = jnp.array([5.0, 10.5, 60.0, 109.0, 200.0])
  grad = jax.grad(lambda a: jnp.sum(ml.magface_regularizer(a, l_a=10.0, u_a=110.0)))(norms)
  a = np.array([10.5, 60.0, 109.0])
  # g'(a) = -1/a^2 + 1/u_a^2 inside [l_a, u_a] (negative: larger norms are rewarded), 0 outside.
  np.testing.assert_allclose(grad, np.r_[0.0, -1 / a**2 + 1 / 110.0**2, 0.0], rtol=1e-5)


# -------------------------------------------------------------------------------- ElasticFace


@pytest.mark.parametrize("kind, arc_kind", [(ml.ELASTICFACE_ARC, "arcface"),
                                            (ml.ELASTICFACE_COS, "cosface")])
def test_elasticface_with_sigma_zero_is_the_fixed_margin(kind, arc_kind):
  m = ml.PAPER_DEFAULTS[kind]["m"]
  loss, metrics, state = ml.elasticface_loss(COS, LABELS, jax.random.key(0), kind=kind, s=64.0,
                                             m=m, sigma=0.0)
  fixed, fixed_metrics = losses.margin_softmax_loss(COS, LABELS, kind=arc_kind, s=64.0, m=m)
  assert float(loss) == pytest.approx(float(fixed), rel=1e-6)
  assert metrics["acc_margin"] == fixed_metrics["acc_margin"]
  assert float(metrics["margin"]) == pytest.approx(m) and state == {}


def test_elasticface_closed_form_with_drawn_margins():
  key = jax.random.key(7)
  params = ml.PAPER_DEFAULTS[ml.ELASTICFACE_ARC]
  draws = np.asarray(ml.elasticface_margins(key, 20_000, m=params["m"], sigma=params["sigma"]))
  assert abs(draws.mean() - 0.5) < 4 * 0.05 / np.sqrt(20_000)
  assert draws.std() == pytest.approx(0.05, rel=0.03)
  # The loss uses the margins drawn from the same key for its batch, one per row.
  margins = np.asarray(ml.elasticface_margins(key, 3, m=0.5, sigma=0.05), np.float64)
  assert len(np.unique(margins)) == 3
  cos = COS.astype(np.float64)
  theta = np.arccos(cos[ROWS, LABELS])
  for kind, target in ((ml.ELASTICFACE_ARC, np.cos(theta + margins)),
                       (ml.ELASTICFACE_COS, cos[ROWS, LABELS] - margins)):
    loss, metrics, _ = ml.elasticface_loss(COS, LABELS, key, kind=kind, s=64.0, m=0.5,
                                           sigma=0.05)
    expected = _cross_entropy(_with_target(cos, LABELS, 64.0 * target, 64.0 * cos), LABELS)
    _assert_loss(loss, expected)
    assert float(metrics["margin"]) == pytest.approx(margins.mean(), rel=1e-6)


# ---------------------------------------------------------------------------- every kind at once

# Targets and negatives at exactly -1 and +1 (and near them).
EDGE_COS = np.array([[1.0, -1.0, 0.3, 1.0],
                     [-1.0, 1.0, -1.0, 0.999],
                     [0.5, -0.999, 1.0, -1.0],
                     [1.0, 1.0, -1.0, 0.0]], np.float32)
EDGE_LABELS = np.array([0, 0, 2, 2], np.int32)
# Norms below, inside and above MagFace's [l_a, u_a] and AdaFace's clip range.
EDGE_NORMS = np.array([0.0, 10.0, 110.0, 500.0], np.float32)


def _loss_of_kind(kind, cos, norms, labels=EDGE_LABELS):
  if kind == ml.SUBCENTER_ARCFACE:
    cos_sub = jnp.stack([cos, jnp.flip(cos, axis=1)], axis=-1)
    return ml.subcenter_arcface_loss(cos_sub, labels, s=64.0, m=0.5)[0]
  if kind == ml.CURRICULARFACE:
    return ml.curricularface_loss(cos, labels, {"t": jnp.float32(0.5)}, s=64.0, m=0.5)[0]
  if kind == ml.ADAFACE:
    return ml.adaface_loss(cos, labels, norms, ml.init_adaface_state(), s=64.0, m=0.4, h=0.333)[0]
  if kind == ml.MAGFACE:
    return ml.magface_loss(cos, labels, norms, **ml.PAPER_DEFAULTS[ml.MAGFACE])[0]
  return ml.elasticface_loss(cos, labels, jax.random.key(1), kind=kind,
                             **ml.PAPER_DEFAULTS[kind])[0]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kind", ml.KINDS)
def test_gradients_are_finite_at_both_ends(kind, dtype):
  cos = jnp.asarray(EDGE_COS, dtype)
  norms = jnp.asarray(EDGE_NORMS, dtype)
  loss, (grad_cos, grad_norms) = jax.value_and_grad(_loss_of_kind, argnums=(1, 2))(kind, cos, norms)
  assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
  assert np.all(np.isfinite(np.asarray(grad_cos, np.float32)))
  assert np.all(np.isfinite(np.asarray(grad_norms, np.float32)))
  assert np.any(np.asarray(grad_cos, np.float32) != 0)


@pytest.mark.parametrize("kind", ml.KINDS)
def test_losses_assemble_from_class_shards(kind):
  # A class-sharded head sees two halves of the classes: it recovers cos_target for every row,
  # builds each half's logits from the target_logits_* / nontarget_logits_* pieces, and
  # finishes the softmax over the halves. That must equal the single-device loss.
  rng = np.random.default_rng(5)
  cos = rng.uniform(-1, 1, size=(6, 8)).astype(np.float32)
  labels = np.array([0, 3, 4, 7, 7, 1], np.int32)
  norms = np.array([8.0, 15.0, 22.0, 30.0, 60.0, 120.0], np.float32)
  cos_target = cos[np.arange(6), labels]
  key = jax.random.key(3)
  if kind == ml.SUBCENTER_ARCFACE:
    target = ml.target_logits_subcenter_arcface(cos_target, s=64.0, m=0.5)
  elif kind == ml.CURRICULARFACE:
    t = ml.update_curricularface_state({"t": jnp.float32(0.5)}, cos_target.mean())["t"]
    target = ml.target_logits_curricularface(cos_target, s=64.0, m=0.5)
  elif kind == ml.ADAFACE:
    state = ml.update_adaface_state(ml.init_adaface_state(), *ml.adaface_batch_stats(norms))
    scaler = ml.adaface_margin_scaler(norms, state, h=0.333)
    target = ml.target_logits_adaface(cos_target, scaler, s=64.0, m=0.4)
  elif kind == ml.MAGFACE:
    params = dict(ml.PAPER_DEFAULTS[ml.MAGFACE])
    lambda_g = params.pop("lambda_g")
    target = ml.target_logits_magface(cos_target, norms, **params)
  else:
    margins = ml.elasticface_margins(key, 6, m=0.5, sigma=0.05)
    target = (ml.target_logits_elasticface_arc if kind == ml.ELASTICFACE_ARC
              else ml.target_logits_elasticface_cos)(cos_target, margins, s=64.0)
  halves = []
  for classes in (np.arange(4), np.arange(4, 8)):
    local = cos[:, classes]
    if kind == ml.CURRICULARFACE:
      nontarget = ml.nontarget_logits_curricularface(local, cos_target, s=64.0, m=0.5, t=t)
    else:
      nontarget = losses.nontarget_logits(local, kind="cosface", s=64.0)
    halves.append(jnp.where(labels[:, None] == classes[None, :], target[:, None], nontarget))
  sharded = jnp.mean(jax.nn.logsumexp(jnp.concatenate(halves, axis=1), axis=1) - target)

  if kind == ml.SUBCENTER_ARCFACE:
    full = ml.subcenter_arcface_loss(cos[:, :, None], labels, s=64.0, m=0.5)[0]
  elif kind == ml.CURRICULARFACE:
    full = ml.curricularface_loss(cos, labels, {"t": jnp.float32(0.5)}, s=64.0, m=0.5)[0]
  elif kind == ml.ADAFACE:
    full = ml.adaface_loss(cos, labels, norms, ml.init_adaface_state(), s=64.0, m=0.4,
                           h=0.333)[0]
  elif kind == ml.MAGFACE:
    full = ml.magface_loss(cos, labels, norms, **ml.PAPER_DEFAULTS[ml.MAGFACE])[0]
    sharded = sharded + lambda_g * jnp.mean(ml.magface_regularizer(norms, l_a=10.0, u_a=110.0))
  else:
    full = ml.elasticface_loss(cos, labels, key, kind=kind, s=64.0, m=0.5, sigma=0.05)[0]
  assert float(sharded) == pytest.approx(float(full), rel=1e-6)


def test_kinds_and_defaults():
  assert ml.KINDS == ("subcenter_arcface", "curricularface", "adaface", "magface",
                      "elasticface_arc", "elasticface_cos")
  assert set(ml.PAPER_DEFAULTS) == set(ml.KINDS)
  assert not set(ml.KINDS) & set(losses.KINDS)


# ------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("call, message", [
    (lambda: ml.subcenter_cos(COS), r"\[B, C, K\]"),
    (lambda: ml.subcenter_arcface_loss(COS[:, :, None], LABELS, s=0.0, m=0.5), "Scale s"),
    (lambda: ml.subcenter_arcface_loss(COS[:, :, None], LABELS, s=64.0, m=4.0), "margin m"),
    (lambda: ml.curricularface_loss(COS, np.array([0, 4, 1]), ml.init_curricularface_state(),
                                    s=64.0, m=0.5), "Labels must lie in"),
    (lambda: ml.curricularface_loss(COS, LABELS, ml.init_curricularface_state(), s=64.0, m=0.5,
                                    t_alpha=0.0), "t_alpha"),
    (lambda: ml.adaface_loss(COS, LABELS, np.ones(2), ml.init_adaface_state(), s=64.0, m=0.4,
                             h=0.333), "one value per row"),
    (lambda: ml.adaface_batch_stats(np.ones(1)), "B >= 2"),
    (lambda: ml.adaface_loss(COS, LABELS, np.ones(3), ml.init_adaface_state(), s=64.0, m=0.4,
                             h=-1.0), "AdaFace h"),
    (lambda: ml.adaface_loss(COS, LABELS, np.ones(3), ml.init_adaface_state(), s=64.0, m=1.5,
                             h=0.333), "AdaFace margin m"),
    (lambda: ml.magface_loss(COS, LABELS, np.ones(3), s=64.0, l_a=110.0, u_a=10.0, l_m=0.45,
                             u_m=0.8, lambda_g=35.0), "l_a < u_a"),
    (lambda: ml.magface_loss(COS, LABELS, np.ones(3), s=64.0, l_a=10.0, u_a=110.0, l_m=0.9,
                             u_m=0.8, lambda_g=35.0), "l_m <= u_m"),
    (lambda: ml.magface_loss(COS, LABELS, np.ones(3), s=64.0, l_a=10.0, u_a=110.0, l_m=0.45,
                             u_m=0.8, lambda_g=-1.0), "lambda_g"),
    (lambda: ml.elasticface_loss(COS, LABELS, jax.random.key(0), kind="elasticface", s=64.0,
                                 m=0.5, sigma=0.05), "elasticface_arc"),
    (lambda: ml.elasticface_loss(COS, LABELS, jax.random.key(0), kind=ml.ELASTICFACE_ARC,
                                 s=64.0, m=0.5, sigma=-0.1), "sigma"),
    (lambda: ml.elasticface_loss(COS, LABELS, jax.random.key(0), kind=ml.ELASTICFACE_COS,
                                 s=64.0, m=1.5, sigma=0.05), "ElasticFace-Cos margin"),
])
def test_bad_parameters_are_named(call, message):
  with pytest.raises(ValueError, match=message):
    call()
