"""The margin-softmax loss library against independently worked-out values."""

import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adam_face import losses

ADDITIVE = [("cosface", 0.35), ("arcface", 0.5), ("adm", 0.3)]
ALL_KINDS = ADDITIVE + [("normface", 0.0), ("sphereface", 4), ("combined", (1.0, 0.3, 0.2))]


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
      m1, m2, m3 = {"arcface": (1.0, m, 0.0), "sphereface": (m, 0.0, 0.0),
                    "combined": m}[kind]
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
  got = losses.target_logits(jnp.asarray(cos), kind=kind, s=30.0, m=m)
  np.testing.assert_allclose(got, _ref_target(cos, kind, 30.0, m), rtol=2e-5, atol=2e-4)


def test_specific_values_by_hand():
  s = 64.0
  c = jnp.asarray([0.5], jnp.float32)  # theta = pi/3
  np.testing.assert_allclose(losses.target_logits(c, kind="cosface", s=s, m=0.35), [64 * 0.15],
                             rtol=1e-6)
  np.testing.assert_allclose(losses.target_logits(c, kind="arcface", s=s, m=0.5),
                             [64 * math.cos(math.pi / 3 + 0.5)], rtol=1e-5)
  np.testing.assert_allclose(losses.target_logits(c, kind="adm", s=s, m=0.3),
                             [64 * (1 - 2 * (math.pi / 3 + 0.3) / math.pi)], rtol=1e-5)
  # SphereFace m=4 at theta=pi/3: k = floor(4/3) = 1, psi = -cos(4pi/3) - 2 = 0.5 - 2.
  np.testing.assert_allclose(losses.target_logits(c, kind="sphereface", s=s, m=4),
                             [64 * (0.5 - 2)], rtol=1e-5)
  # ArcFace past the fall-back point: theta = pi - 0.2, m = 0.5 -> phi = pi + 0.3, k = 1.
  c2 = jnp.asarray([math.cos(math.pi - 0.2)], jnp.float32)
  np.testing.assert_allclose(losses.target_logits(c2, kind="arcface", s=1.0, m=0.5),
                             [-math.cos(math.pi + 0.3) - 2], rtol=1e-5)


@pytest.mark.parametrize("kind,m", ALL_KINDS)
def test_loss_matches_numpy_reference(kind, m):
  rng = np.random.default_rng(0)
  cos = rng.uniform(-1, 1, (6, 11)).astype(np.float32)
  cos[0, 3] = 1.0
  cos[1, 0] = -1.0
  labels = np.array([3, 0, 5, 10, 2, 7])
  loss, metrics = losses.margin_softmax_loss(jnp.asarray(cos), jnp.asarray(labels), kind=kind,
                                             s=16.0, m=m)
  ref_loss, ref_logits = _ref_loss(cos, labels, kind, 16.0, m)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert float(metrics["acc"]) == pytest.approx(np.mean(cos.argmax(1) == labels))
  assert float(metrics["acc_margin"]) == pytest.approx(np.mean(ref_logits.argmax(1) == labels))


def test_nontarget_columns_carry_no_margin():
  cos = jnp.asarray([[0.1, 0.2, 0.3]], jnp.float32)
  logits = losses.margin_logits(cos, jnp.asarray([1]), kind="arcface", s=10.0, m=0.5)
  np.testing.assert_allclose(logits[0, [0, 2]], [1.0, 3.0], rtol=1e-6)
  assert logits[0, 1] < 2.0


# --------------------------------------------------------------------------- reductions


@pytest.mark.parametrize("combined,single,m", [
    ((1.0, 0.5, 0.0), "arcface", 0.5),
    ((1.0, 0.0, 0.35), "cosface", 0.35),
    ((4.0, 0.0, 0.0), "sphereface", 4),
])
def test_combined_reduces_to_each_single_margin(combined, single, m):
  cos = jnp.asarray(np.cos(np.linspace(0, math.pi, 97)), jnp.float32)
  np.testing.assert_allclose(
      losses.target_logits(cos, kind="combined", s=30.0, m=combined),
      losses.target_logits(cos, kind=single, s=30.0, m=m), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("kind,m", ALL_KINDS)
def test_target_logit_never_increases_with_theta(kind, m):
  theta = np.linspace(0, math.pi, 4001)
  t = np.asarray(losses.target_logits(jnp.asarray(np.cos(theta), jnp.float32), kind=kind, s=1.0,
                                      m=m))
  assert np.all(np.diff(t) <= 1e-5), np.max(np.diff(t))


# --------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kind,m", ALL_KINDS)
def test_finite_loss_and_gradient_on_a_grid_including_both_ends(kind, m, dtype):
  grid = np.linspace(-1, 1, 21)
  cos = jnp.asarray(np.stack([grid, grid[::-1], np.full(21, 1.0), np.full(21, -1.0)]), dtype)
  labels = jnp.asarray([0, 20, 3, 7])
  for s in (1.0, 64.0, 128.0):
    loss, grad = jax.value_and_grad(
        lambda c: losses.margin_softmax_loss(c, labels, kind=kind, s=s, m=m)[0])(cos)
    assert np.isfinite(float(loss))
    assert grad.dtype == dtype
    assert np.all(np.isfinite(np.asarray(grad, np.float32)))


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
    c=st.floats(-1.0, 1.0), s=st.floats(1.0, 128.0),
    kind_m=st.sampled_from(ADDITIVE + [("sphereface", 3), ("combined", (1.2, 0.4, 0.1))]))
def test_property_finite_gradient_anywhere_in_range(c, s, kind_m):
  kind, m = kind_m
  cos = jnp.asarray([[c, -c, 0.0]], jnp.float32)
  g = jax.grad(lambda x: losses.margin_softmax_loss(x, jnp.asarray([0]), kind=kind, s=s, m=m)[0])(
      cos)
  assert np.all(np.isfinite(np.asarray(g)))


def test_margin_logits_value_exact_at_cos_one():
  # The arccos used by adm is exact at the ends, only its derivative is bounded.
  logits = losses.margin_logits(jnp.asarray([[1.0, -1.0]]), jnp.asarray([1]), kind="adm",
                                s=64.0, m=0.0)
  np.testing.assert_allclose(logits, [[64.0, -64.0]], atol=1e-4)


# --------------------------------------------------------------------------- acc_margin


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(seed=st.integers(0, 10_000), m=st.floats(0.0, 1.0),
                  kind=st.sampled_from(["cosface", "arcface", "adm"]))
def test_acc_margin_never_exceeds_acc_for_nonnegative_margin(seed, m, kind):
  rng = np.random.default_rng(seed)
  cos = jnp.asarray(rng.uniform(-1, 1, (32, 9)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 9, 32))
  _, metrics = losses.margin_softmax_loss(cos, labels, kind=kind, s=30.0, m=m)
  assert float(metrics["acc_margin"]) <= float(metrics["acc"])


@pytest.mark.parametrize("kind", ["cosface", "arcface", "adm"])
def test_acc_margin_equals_acc_at_zero_margin(kind):
  rng = np.random.default_rng(1)
  cos = jnp.asarray(rng.uniform(-1, 1, (64, 7)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 7, 64))
  _, metrics = losses.margin_softmax_loss(cos, labels, kind=kind, s=30.0, m=0.0)
  assert float(metrics["acc_margin"]) == float(metrics["acc"])


def test_acc_margin_counts_rows_whose_argmax_survives():
  logits = jnp.asarray([[3.0, 1.0], [0.0, 2.0], [5.0, 4.0], [1.0, 0.0]])
  assert float(losses.acc_margin(logits, jnp.asarray([0, 1, 1, 1]))) == 0.5


# --------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors():
  cos = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="valid kinds are"):
    losses.margin_logits(cos, jnp.asarray([0, 1]), kind="arcfce", s=1.0, m=0.5)
  with pytest.raises(ValueError, match=r"Labels must lie in \[0, 3\)"):
    losses.margin_logits(cos, jnp.asarray([0, 3]), kind="arcface", s=1.0, m=0.5)
  with pytest.raises(ValueError, match=r"Labels must lie"):
    losses.margin_logits(cos, jnp.asarray([-1, 0]), kind="arcface", s=1.0, m=0.5)
  with pytest.raises(ValueError, match="cosface"):
    losses.margin_logits(cos, jnp.asarray([0, 1]), kind="cosface", s=1.0, m=1.5)
  with pytest.raises(ValueError, match="integer m"):
    losses.margin_logits(cos, jnp.asarray([0, 1]), kind="sphereface", s=1.0, m=1.5)
  with pytest.raises(ValueError, match="m1 > 0"):
    losses.margin_logits(cos, jnp.asarray([0, 1]), kind="combined", s=1.0, m=(0.0, 0.1, 0.1))
  with pytest.raises(ValueError, match="Scale s"):
    losses.margin_logits(cos, jnp.asarray([0, 1]), kind="cosface", s=0.0, m=0.1)


def test_traced_margin_and_labels_are_accepted_under_jit():
  f = jax.jit(lambda c, y, m: losses.margin_softmax_loss(c, y, kind="arcface", s=30.0, m=m)[0])
  assert np.isfinite(float(f(jnp.zeros((2, 3)), jnp.asarray([0, 2]), jnp.float32(0.5))))


# --------------------------------------------------------------------------- auto-margin

AM = dict(target=0.8, rate=0.05, momentum=0.9, m_min=0.1, m_max=0.6)


def _run_auto_margin(acc_value, steps=200, m0=0.3):
  update = jax.jit(lambda st, a: losses.update_auto_margin(st, a, **AM))
  state = losses.init_auto_margin(m0, AM["target"])
  history = []
  for _ in range(steps):
    state = update(state, jnp.float32(acc_value))
    history.append(float(state["m"]))
  return state, np.array(history)


def test_auto_margin_rises_under_sustained_high_acc_margin_and_stays_bounded():
  state, hist = _run_auto_margin(1.0)
  assert hist[10] > 0.3 and np.all(np.diff(hist) >= 0)
  assert float(state["m"]) == pytest.approx(AM["m_max"])
  assert state["m"].dtype == jnp.float32


def test_auto_margin_falls_under_low_acc_margin_and_stays_bounded():
  state, hist = _run_auto_margin(0.2)
  assert hist[10] < 0.3 and np.all(np.diff(hist) <= 0)
  assert float(state["m"]) == pytest.approx(AM["m_min"])


def test_auto_margin_holds_at_target():
  _, hist = _run_auto_margin(AM["target"], steps=20)
  np.testing.assert_allclose(hist, 0.3, atol=1e-6)


def test_auto_margin_validation():
  with pytest.raises(ValueError, match="additive kinds"):
    losses.validate_auto_margin("sphereface", m=0.3, **AM)
  with pytest.raises(ValueError, match="m_min <= m <= m_max"):
    losses.validate_auto_margin("adm", **{**AM, "m_max": 0.2}, m=0.3)
  losses.validate_auto_margin("adm", m=0.3, **AM)


def test_auto_margin_hold_keeps_m_but_tracks_the_average():
  state = losses.init_auto_margin(0.3, AM["target"])
  held = jax.jit(lambda st, a, h: losses.update_auto_margin(st, a, **AM, hold=h))(
      state, jnp.float32(0.0), jnp.bool_(True))
  assert float(held["m"]) == pytest.approx(0.3)
  assert float(held["acc_margin_ema"]) < AM["target"]
  moved = losses.update_auto_margin(held, jnp.float32(0.0), **AM, hold=False)
  assert float(moved["m"]) < 0.3
