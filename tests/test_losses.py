"""The classic margins (normface, cosface, arcface, sphereface, combined, adm) through
`losses.margin_softmax_loss` against independently worked-out values; acc_margin; the
auto-margin controller; and the errors a bad loss configuration or bad labels raise."""

import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adam_face import losses, margins
from margin_calls import target_logits

ADDITIVE = [("cosface", 0.35), ("arcface", 0.5), ("adm", 0.3)]
ALL_KINDS = ADDITIVE + [("normface", 0.0), ("sphereface", 4), ("combined", (1.0, 0.3, 0.2))]


def _margin(kind, s, m):
  """The margin object of `kind` built from its config, with the old (kind, s, m) signature:
  combined takes m = (m1, m2, m3), normface ignores m."""
  fields = {"s": s}
  if kind == "combined":
    fields.update(zip(("m1", "m2", "m3"), m))
  elif kind != "normface":
    fields["m"] = m
  return margins.from_config(margins.loss_config(kind, **fields))


def _ref_target(cos, kind, s, m):
  """Target logits by hand, written apart from the library (explicit piecewise branches)."""
  out = []
  for c in np.asarray(cos, np.float64).ravel():
    theta = math.acos(min(1.0, max(-1.0, c)))
    if kind == "normface":
      v = c
    elif kind == "cosface":
      v = c - m
    elif kind == "adm":
      v = 1 - 2 * (theta + m) / math.pi
    else:
      m1, m2, m3 = {"arcface": (1.0, m, 0.0), "sphereface": (m, 0.0, 0.0), "combined": m}[kind]
      phi = m1 * theta + m2
      k = int(phi // math.pi)
      v = (-1) ** k * math.cos(phi) - 2 * k - m3
    out.append(s * v)
  return np.array(out).reshape(np.shape(cos))


def _ref_loss(cos, labels, kind, s, m):
  cos = np.asarray(cos, np.float64)
  if kind == "adm":
    logits = s * (1 - 2 * np.arccos(np.clip(cos, -1, 1)) / np.pi)
  else:
    logits = s * cos
  rows = np.arange(len(labels))
  logits[rows, labels] = _ref_target(cos[rows, labels], kind, s, m)
  lse = np.log(np.sum(np.exp(logits - logits.max(1, keepdims=True)), 1)) + logits.max(1)
  return np.mean(lse - logits[rows, labels]), logits


# --------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("kind,m", ALL_KINDS)
def test_target_logits_match_hand_values_across_the_fallback_point(kind, m):
  # Angles from 0 to pi, dense near pi where theta + m crosses pi (the fall-back region).
  theta = np.concatenate([np.linspace(0, math.pi, 41), math.pi - np.array([0.49, 0.5, 0.51])])
  cos = np.cos(theta).astype(np.float32)
  got = target_logits(_margin(kind, 30.0, m), cos)
  np.testing.assert_allclose(got, _ref_target(cos, kind, 30.0, m), rtol=2e-5, atol=2e-4)


def test_specific_values_by_hand():
  s = 64.0
  c = jnp.asarray([0.5], jnp.float32)  # theta = pi/3
  np.testing.assert_allclose(target_logits(margins.CosFace(s=s, m=0.35), c), [64 * 0.15], rtol=1e-6)
  np.testing.assert_allclose(
      target_logits(margins.ArcFace(s=s, m=0.5), c), [64 * math.cos(math.pi / 3 + 0.5)], rtol=1e-5
  )
  np.testing.assert_allclose(
      target_logits(margins.ADM(s=s, m=0.3), c),
      [64 * (1 - 2 * (math.pi / 3 + 0.3) / math.pi)],
      rtol=1e-5,
  )
  # SphereFace m=4 at theta=pi/3: k = floor(4/3) = 1, psi = -cos(4pi/3) - 2 = 0.5 - 2.
  np.testing.assert_allclose(
      target_logits(margins.SphereFace(s=s, m=4), c), [64 * (0.5 - 2)], rtol=1e-5
  )
  # ArcFace past the fall-back point: theta = pi - 0.2, m = 0.5 -> phi = pi + 0.3, k = 1.
  c2 = jnp.asarray([math.cos(math.pi - 0.2)], jnp.float32)
  np.testing.assert_allclose(
      target_logits(margins.ArcFace(s=1.0, m=0.5), c2), [-math.cos(math.pi + 0.3) - 2], rtol=1e-5
  )


@pytest.mark.parametrize("kind,m", ALL_KINDS)
def test_loss_matches_numpy_reference(kind, m):
  rng = np.random.default_rng(0)
  cos = rng.uniform(-1, 1, (6, 11)).astype(np.float32)
  cos[0, 3] = 1.0
  cos[1, 0] = -1.0
  labels = np.array([3, 0, 5, 10, 2, 7])
  loss, metrics, _ = losses.margin_softmax_loss(
      jnp.asarray(cos), jnp.asarray(labels), _margin(kind, 16.0, m)
  )
  ref_loss, ref_logits = _ref_loss(cos, labels, kind, 16.0, m)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert float(metrics["acc"]) == pytest.approx(np.mean(cos.argmax(1) == labels))
  assert float(metrics["acc_margin"]) == pytest.approx(np.mean(ref_logits.argmax(1) == labels))


def test_nontarget_columns_carry_no_margin():
  cos = jnp.asarray([[0.1, 0.2, 0.3]], jnp.float32)
  logits, _ = losses.margin_logits(cos, jnp.asarray([1]), margins.ArcFace(s=10.0, m=0.5))
  np.testing.assert_allclose(logits[0, [0, 2]], [1.0, 3.0], rtol=1e-6)
  assert logits[0, 1] < 2.0


# --------------------------------------------------------------------------- reductions


@pytest.mark.parametrize(
    "combined,single,m",
    [
        ((1.0, 0.5, 0.0), "arcface", 0.5),
        ((1.0, 0.0, 0.35), "cosface", 0.35),
        ((4.0, 0.0, 0.0), "sphereface", 4),
    ],
)
def test_combined_reduces_to_each_single_margin(combined, single, m):
  cos = jnp.asarray(np.cos(np.linspace(0, math.pi, 97)), jnp.float32)
  np.testing.assert_allclose(
      target_logits(_margin("combined", 30.0, combined), cos),
      target_logits(_margin(single, 30.0, m), cos),
      rtol=1e-6,
      atol=1e-5,
  )


@pytest.mark.parametrize("kind,m", ALL_KINDS)
def test_target_logit_never_increases_with_theta(kind, m):
  theta = np.linspace(0, math.pi, 4001)
  t = np.asarray(target_logits(_margin(kind, 1.0, m), np.cos(theta)))
  assert np.all(np.diff(t) <= 1e-5), np.max(np.diff(t))


# --------------------------------------------------------------------------- numerics
# Finite loss and gradient in float32 and bfloat16 on a grid including cos = +-1, for s in
# (1, 64, 128): tests/test_margins.py::test_finite_loss_and_gradients_at_both_ends, over every
# kind in margins.REGISTRY.


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
    c=st.floats(-1.0, 1.0),
    s=st.floats(1.0, 128.0),
    kind_m=st.sampled_from(ADDITIVE + [("sphereface", 3), ("combined", (1.2, 0.4, 0.1))]),
)
def test_property_finite_gradient_anywhere_in_range(c, s, kind_m):
  kind, m = kind_m
  margin = _margin(kind, s, m)
  cos = jnp.asarray([[c, -c, 0.0]], jnp.float32)
  g = jax.grad(lambda x: losses.margin_softmax_loss(x, jnp.asarray([0]), margin)[0])(cos)
  assert np.all(np.isfinite(np.asarray(g)))


def test_margin_logits_value_exact_at_cos_one():
  # The arccos used by adm is exact at the ends, only its derivative is bounded.
  logits, _ = losses.margin_logits(
      jnp.asarray([[1.0, -1.0]]), jnp.asarray([1]), margins.ADM(s=64.0, m=0.0)
  )
  np.testing.assert_allclose(logits, [[64.0, -64.0]], atol=1e-4)


# --------------------------------------------------------------------------- acc_margin


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(
    seed=st.integers(0, 10_000),
    m=st.floats(0.0, 1.0),
    kind=st.sampled_from(["cosface", "arcface", "adm"]),
)
def test_acc_margin_never_exceeds_acc_for_nonnegative_margin(seed, m, kind):
  rng = np.random.default_rng(seed)
  cos = jnp.asarray(rng.uniform(-1, 1, (32, 9)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 9, 32))
  _, metrics, _ = losses.margin_softmax_loss(cos, labels, _margin(kind, 30.0, m))
  assert float(metrics["acc_margin"]) <= float(metrics["acc"])


@pytest.mark.parametrize("kind", ["cosface", "arcface", "adm"])
def test_acc_margin_equals_acc_at_zero_margin(kind):
  rng = np.random.default_rng(1)
  cos = jnp.asarray(rng.uniform(-1, 1, (64, 7)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 7, 64))
  _, metrics, _ = losses.margin_softmax_loss(cos, labels, _margin(kind, 30.0, 0.0))
  assert float(metrics["acc_margin"]) == float(metrics["acc"])


def test_acc_margin_counts_rows_whose_argmax_survives():
  # NormFace at s = 5 turns cos = logits / 5 back into exactly these logits.
  logits = jnp.asarray([[3.0, 1.0], [0.0, 2.0], [5.0, 4.0], [1.0, 0.0]])
  _, metrics, _ = losses.margin_softmax_loss(
      logits / 5.0, jnp.asarray([0, 1, 1, 1]), margins.NormFace(s=5.0)
  )
  assert float(metrics["acc_margin"]) == 0.5
  # With a margin: row 1's target 0.35 - 0.1 falls below its 0.3, row 0's 0.6 - 0.1 does not.
  _, metrics, _ = losses.margin_softmax_loss(
      jnp.asarray([[0.6, 0.2], [0.3, 0.35]]), jnp.asarray([0, 1]), margins.CosFace(s=8.0, m=0.1)
  )
  assert float(metrics["acc"]) == 1.0 and float(metrics["acc_margin"]) == 0.5


# --------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors():
  cos = jnp.zeros((2, 3))
  with pytest.raises(
      ValueError,
      match=r"Unknown loss kind 'arcfce'\. Did you mean 'arcface'\?"
      r" Valid kinds: normface, cosface, arcface",
  ):
    margins.from_config({"kind": "arcfce", "s": 1.0, "m": 0.5})
  with pytest.raises(ValueError, match=r"Labels must lie in \[0, 3\)"):
    losses.margin_logits(cos, jnp.asarray([0, 3]), margins.ArcFace(s=1.0, m=0.5))
  with pytest.raises(ValueError, match=r"Labels must lie"):
    losses.margin_logits(cos, jnp.asarray([-1, 0]), margins.ArcFace(s=1.0, m=0.5))
  with pytest.raises(ValueError, match=r"Labels must lie in \[0, 3\)"):
    losses.margin_softmax_loss(cos, jnp.asarray([0, 3]), margins.ArcFace(s=1.0, m=0.5))
  with pytest.raises(
      ValueError, match=r"cosface: margin m must be in \[0, 1\] \(the paper uses 0.35\), got 1.5"
  ):
    margins.CosFace(s=1.0, m=1.5)
  with pytest.raises(ValueError, match="arcface: margin m must be in"):
    margins.ArcFace(m=-1)
  with pytest.raises(ValueError, match="integer margin m"):
    margins.SphereFace(s=1.0, m=1.5)
  with pytest.raises(ValueError, match="integer margin m"):
    margins.SphereFace(m=2.5)
  with pytest.raises(ValueError, match="integer margin m"):
    margins.SphereFace(m=True)
  with pytest.raises(ValueError, match="m1 > 0"):
    margins.Combined(s=1.0, m1=0.0, m2=0.1, m3=0.1)
  with pytest.raises(ValueError, match="m1 > 0"):
    margins.Combined(m1=0)
  with pytest.raises(ValueError, match="scale s must be > 0"):
    margins.CosFace(s=0.0, m=0.1)
  with pytest.raises(ValueError, match="scale s must be > 0"):
    margins.from_config(margins.loss_config("cosface", s=0.0))


def test_unknown_config_fields_are_named_with_a_suggestion():
  config = margins.loss_config("arcface")
  config.mm = 0.3
  with pytest.raises(
      ValueError,
      match=r"Unknown field config\.loss\.mm for kind='arcface'\. "
      r"Did you mean 'm'\? Valid fields: auto_margin, kind, m, s",
  ):
    margins.from_config(config)
  with pytest.raises(
      ValueError,
      match=r"Unknown field config\.loss\.mm for kind='arcface'\. " r"Did you mean 'm'\?",
  ):
    margins.loss_config("arcface", mm=0.3)
  # A field of another kind: no close match, still the valid fields.
  with pytest.raises(
      ValueError,
      match=r"Unknown field config\.loss\.t_alpha for kind='cosface'\. "
      r"Valid fields: auto_margin, kind, m, s\.",
  ):
    margins.from_config({"kind": "cosface", "t_alpha": 0.01})
  with pytest.raises(
      ValueError,
      match=r"Unknown field config\.loss\.auto_margin\.targt for "
      r"kind='adm'\..* Valid fields: enabled, m_max, m_min, "
      r"momentum, rate, target\.",
  ):
    margins.from_config({"kind": "adm", "auto_margin": {"enabled": True, "targt": 0.5}})
  with pytest.raises(ValueError, match="Unknown loss kind 'arcfce'"):
    margins.loss_config("arcfce")


def test_unknown_auto_margin_field_gets_a_suggestion():
  with pytest.raises(
      ValueError,
      match=r"config.loss.auto_margin.targt for kind='adm'. Did you "
      r"mean 'auto_margin\.target'\?",
  ):
    margins.from_config({"kind": "adm", "auto_margin": {"enabled": True, "targt": 0.5}})


def test_a_config_without_kind_is_named():
  with pytest.raises(ValueError, match="config.loss.kind must name a margin kind, got None"):
    margins.from_config({"s": 30.0, "m": 0.5})


def test_traced_margin_and_labels_are_accepted_under_jit():
  # The margin that varies under jit is the auto-margin's state["m"].
  arc = margins.ArcFace(s=30.0, m=0.5, auto_margin=margins.AutoMargin())
  f = jax.jit(lambda c, y, state: losses.margin_softmax_loss(c, y, arc, state)[0])
  assert np.isfinite(float(f(jnp.zeros((2, 3)), jnp.asarray([0, 2]), arc.init_state())))
  # ... and it is the state's m, not the configured one, that the loss uses.
  cos = jnp.asarray([[0.5, 0.1, -0.2], [0.0, 0.3, 0.4]], jnp.float32)
  labels = jnp.asarray([0, 2])
  state = {**arc.init_state(), "m": jnp.float32(0.3)}
  fixed, _, _ = losses.margin_softmax_loss(cos, labels, margins.ArcFace(s=30.0, m=0.3))
  np.testing.assert_allclose(f(cos, labels, state), fixed, rtol=1e-6)


# --------------------------------------------------------------------------- auto-margin

AM = margins.AutoMargin(target=0.8, rate=0.05, momentum=0.9, m_min=0.1, m_max=0.6)
_update = jax.jit(AM.update)


def _run_auto_margin(acc_values, state=None, m0=0.3):
  """Feeds acc_values through the jitted update; the state after, and m and engaged per step."""
  state = AM.init_state(m0) if state is None else state
  history, engaged = [], []
  for acc in acc_values:
    state = _update(state, jnp.float32(acc))
    history.append(float(state["m"]))
    engaged.append(bool(state["engaged"]))
  return state, np.array(history), np.array(engaged)


def _steps_to_engage(acc, momentum=0.9, target=0.8):
  """Steps until an average starting at 0 and fed `acc` first reaches target (float64)."""
  return math.ceil(math.log(1 - target / acc) / math.log(momentum))


def test_auto_margin_state_starts_at_m_with_an_empty_average():
  state = AM.init_state(0.3)
  assert float(state["m"]) == pytest.approx(0.3) and float(state["acc_margin_ema"]) == 0.0
  assert not bool(state["engaged"])
  assert state["m"].dtype == jnp.float32 and state["acc_margin_ema"].dtype == jnp.float32
  assert state["engaged"].dtype == jnp.bool_


def test_auto_margin_rises_under_sustained_high_acc_margin_and_stays_bounded():
  state, hist, engaged = _run_auto_margin([1.0] * 200)
  n = _steps_to_engage(1.0)  # 16: 1 - 0.9^16 = 0.815 >= 0.8 > 1 - 0.9^15.
  assert not engaged[: n - 1].any() and engaged[n - 1 :].all()
  assert np.all(hist[: n - 1] == np.float32(0.3))  # Held until the average reaches target.
  assert hist[n - 1 + 10] > 0.3 and np.all(np.diff(hist) >= 0)
  assert float(state["m"]) == pytest.approx(AM.m_max)
  assert state["m"].dtype == jnp.float32


def test_auto_margin_falls_under_low_acc_margin_and_stays_bounded():
  # Engaged first (20 steps at 1.0), then a low acc_margin for 200 steps.
  engaged_state, _, _ = _run_auto_margin([1.0] * 20)
  m_engaged = float(engaged_state["m"])
  assert bool(engaged_state["engaged"]) and m_engaged > 0.3
  state, hist, engaged = _run_auto_margin([0.2] * 200, engaged_state)
  # Once engaged it stays engaged after the average drops below target, and m falls.
  assert engaged.all()
  ema, below = float(engaged_state["acc_margin_ema"]), None
  for i in range(200):
    ema = 0.9 * ema + 0.1 * 0.2
    if ema < AM.target:
      below = i
      break
  assert below is not None and below <= 2
  assert hist[below + 10] < hist[below] < m_engaged and np.all(np.diff(hist[below:]) <= 0)
  assert float(state["m"]) == pytest.approx(AM.m_min)


def test_auto_margin_holds_at_target():
  # Not engaged: an average approaching target from below leaves m where it is.
  _, hist, engaged = _run_auto_margin([AM.target] * 20)
  np.testing.assert_allclose(hist, 0.3, atol=1e-6)
  assert not engaged.any()
  # Engaged with the average at target: m holds.
  state = {
      "m": jnp.float32(0.3),
      "acc_margin_ema": jnp.float32(AM.target),
      "engaged": jnp.bool_(True),
  }
  _, hist, engaged = _run_auto_margin([AM.target] * 20, state)
  np.testing.assert_allclose(hist, 0.3, atol=1e-6)
  assert engaged.all()


def test_auto_margin_does_not_move_while_not_engaged():
  # acc_margin 0 for many steps (an untrained network): m stays exactly where it is.
  state, hist, engaged = _run_auto_margin([0.0] * 1000)
  assert np.all(hist == np.float32(0.3)) and not engaged.any()
  assert float(state["acc_margin_ema"]) == 0.0
  # Just below target for long enough that the average has settled there: still held.
  state, hist, engaged = _run_auto_margin([0.79] * 400)
  assert np.all(hist == np.float32(0.3)) and not engaged.any()
  assert float(state["acc_margin_ema"]) == pytest.approx(0.79, abs=1e-4)


def test_auto_margin_hold_keeps_m_but_tracks_the_average():
  # The old `hold` is now "not engaged": the average tracks acc_margin while m is held, and m
  # moves from the very step on which the average first reaches target.
  held = _update(AM.init_state(0.3), jnp.float32(0.5))
  assert float(held["m"]) == pytest.approx(0.3)
  assert float(held["acc_margin_ema"]) == pytest.approx(0.05)
  about_to_engage = {**held, "acc_margin_ema": jnp.float32(0.79)}
  moved = _update(about_to_engage, jnp.float32(1.0))  # ema 0.811 >= 0.8
  assert bool(moved["engaged"])
  assert float(moved["m"]) == pytest.approx(0.3 + 0.05 * (0.811 - 0.8), rel=1e-5)


def test_auto_margin_steers_by_rate_times_distance_from_target_once_engaged():
  state = {"m": jnp.float32(0.3), "acc_margin_ema": jnp.float32(0.85), "engaged": jnp.bool_(True)}
  up = _update(state, jnp.float32(0.5))  # ema 0.815: above target, m rises.
  assert float(up["acc_margin_ema"]) == pytest.approx(0.815, rel=1e-6)
  assert float(up["m"]) == pytest.approx(0.3 + 0.05 * 0.015, rel=1e-6)
  down = _update(state, jnp.float32(0.0))  # ema 0.765: below target, m falls.
  assert float(down["m"]) == pytest.approx(0.3 - 0.05 * 0.035, rel=1e-6)
  assert bool(down["engaged"])
  # Clipped at both ends.
  top = _update(
      {**state, "m": jnp.float32(0.599), "acc_margin_ema": jnp.float32(1.0)}, jnp.float32(1.0)
  )
  assert float(top["m"]) == pytest.approx(AM.m_max)
  bottom = _update(
      {**state, "m": jnp.float32(0.101), "acc_margin_ema": jnp.float32(0.0)}, jnp.float32(0.0)
  )
  assert float(bottom["m"]) == pytest.approx(AM.m_min)


def test_auto_margin_through_the_loss():
  # margin_softmax_loss logs the margin its logits used and returns the state update_margin gives.
  adm = margins.ADM(s=30.0, m=0.3, auto_margin=AM)
  rng = np.random.default_rng(2)
  cos = jnp.asarray(rng.uniform(-1, 1, (16, 5)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 5, 16))
  state = {"m": jnp.float32(0.25), "acc_margin_ema": jnp.float32(0.9), "engaged": jnp.bool_(True)}
  step = jax.jit(lambda c, y, st: losses.margin_softmax_loss(c, y, adm, st))
  loss, metrics, new_state = step(cos, labels, state)
  fixed_loss, fixed_metrics, _ = losses.margin_softmax_loss(
      cos, labels, margins.ADM(s=30.0, m=0.25)
  )
  np.testing.assert_allclose(loss, fixed_loss, rtol=1e-6)
  assert float(metrics["margin"]) == pytest.approx(0.25)
  assert float(metrics["acc_margin"]) == float(fixed_metrics["acc_margin"])
  expected = AM.update(state, metrics["acc_margin"])
  for name in ("m", "acc_margin_ema"):
    np.testing.assert_allclose(new_state[name], expected[name], rtol=1e-6, err_msg=name)
  assert bool(new_state["engaged"]) and new_state["m"].dtype == jnp.float32
  # Without an auto-margin the state stays empty and the margin is the configured one.
  _, metrics, new_state = losses.margin_softmax_loss(cos, labels, margins.ADM(s=30.0, m=0.25))
  assert new_state == {} and float(metrics["margin"]) == pytest.approx(0.25)


def test_auto_margin_from_config():
  adm = margins.from_config(
      margins.loss_config(
          "adm",
          m=0.3,
          auto_margin={
              "enabled": True,
              "target": 0.8,
              "rate": 0.05,
              "momentum": 0.9,
              "m_min": 0.1,
              "m_max": 0.6,
          },
      )
  )
  assert adm == margins.ADM(m=0.3, auto_margin=AM)
  assert margins.from_config(margins.loss_config("adm")).auto_margin is None  # Off by default.


def test_auto_margin_validation():
  with pytest.raises(
      ValueError, match=r"Unknown field config\.loss\.auto_margin for " r"kind='sphereface'"
  ):
    margins.from_config({"kind": "sphereface", "m": 4, "auto_margin": {"enabled": True}})
  with pytest.raises(
      ValueError,
      match=r"need auto_margin\.m_min <= m <= auto_margin\.m_max, " r"got 0\.1 <= 0\.3 <= 0\.2",
  ):
    margins.ADM(m=0.3, auto_margin=margins.AutoMargin(m_min=0.1, m_max=0.2))
  with pytest.raises(ValueError, match=r"m_min <= m <= auto_margin\.m_max"):
    margins.ArcFace(m=0.05, auto_margin=AM)  # Below m_min.
  with pytest.raises(ValueError, match=r"auto_margin\.m_max must be <= 1"):
    margins.CosFace(m=0.3, auto_margin=margins.AutoMargin(m_max=1.5))
  for target in (0.0, 1.0, -0.5, 1.5):
    with pytest.raises(ValueError, match=r"auto_margin\.target is an acc_margin in \(0, 1\)"):
      margins.AutoMargin(target=target)
  for momentum in (1.0, -0.1):
    with pytest.raises(ValueError, match=r"auto_margin\.momentum must be in \[0, 1\)"):
      margins.AutoMargin(momentum=momentum)
  with pytest.raises(ValueError, match=r"auto_margin\.rate must be >= 0"):
    margins.AutoMargin(rate=-1e-3)
  with pytest.raises(ValueError, match="0 <= m_min <= m_max"):
    margins.AutoMargin(m_min=0.5, m_max=0.4)
  with pytest.raises(ValueError, match=r"auto_margin\.target"):  # Through the config too.
    margins.from_config(
        margins.loss_config("arcface", auto_margin={"enabled": True, "target": 1.0})
    )
  margins.ADM(m=0.3, auto_margin=AM)
  margins.AutoMargin(momentum=0.0)
