"""The auto-margin of the ADAM table rows, simulated over their step budgets on a real run's curve.

The curve is the batch acc (arg-max of the cosines) and acc_margin (arg-max of the margin logits,
m = 0.3) logged every 50 steps (`train_log.jsonl`) by a real run on LFW people, 2026-11-30:

  python -m adam_face.main --config=configs/lfw_dev.py:adam --workdir=/tmp/adam_long \
      --config.num_train_steps=1500 --config.optimizer.polynomial_power=2

with configs/lfw_dev.py's adam row as it stood then: auto-margin target 0.5, which the run never
reached, so m stayed at 0.3 throughout, as in the adm_s30 row (the polynomial power was then the
default, 2).

The simulation stretches the curve over a table row's steps, lets acc_margin respond to the margin
in use (linearly between acc at m = 0 and the logged acc_margin at m = 0.3, so a larger margin is
met less often), draws each step's batch as a binomial sample of the global batch, and runs
margins.AutoMargin.update step by step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adam_face import margins
from configs import vggface2_adm, webface_adam_s30_m035

# (step of 1500, acc, acc_margin at m = 0.3), from the run above.
CURVE = np.array(
    [
        (50, 0.0203, 0.0006),
        (100, 0.0325, 0.0012),
        (150, 0.145, 0.0159),
        (200, 0.3084, 0.0344),
        (250, 0.3375, 0.0403),
        (300, 0.4772, 0.0659),
        (350, 0.4697, 0.0694),
        (400, 0.545, 0.0972),
        (450, 0.5997, 0.0997),
        (500, 0.59, 0.0984),
        (550, 0.7044, 0.1481),
        (600, 0.6972, 0.1397),
        (650, 0.7475, 0.1694),
        (700, 0.7747, 0.1856),
        (750, 0.7534, 0.1587),
        (800, 0.8197, 0.2325),
        (850, 0.8037, 0.2259),
        (900, 0.8419, 0.2409),
        (950, 0.8503, 0.2684),
        (1000, 0.8444, 0.2359),
        (1050, 0.8722, 0.2856),
        (1100, 0.8647, 0.2816),
        (1150, 0.8775, 0.28),
        (1200, 0.8825, 0.3069),
        (1250, 0.8772, 0.2975),
        (1300, 0.8925, 0.3203),
        (1350, 0.8831, 0.3119),
        (1400, 0.8909, 0.3244),
        (1450, 0.8953, 0.3203),
        (1500, 0.8909, 0.3066),
    ]
)
CURVE_MARGIN = 0.3
# VGGFace2's training set, about 3.1 M images (configs/recipes.py); a run counts its 20 epochs from
# the prepared dataset's size. CASIA-WebFace's recipe is a fixed 32,000 steps.
VGGFACE2_IMAGES = 3_100_000


def _table_rows():
  webface, vggface2 = webface_adam_s30_m035.get_config(), vggface2_adm.get_config()
  return {
      "webface_adam_s30_m035": (webface, webface.num_train_steps),
      "vggface2_adm": (
          vggface2,
          vggface2.num_epochs * VGGFACE2_IMAGES // vggface2.global_batch_size,
      ),
  }


def _acc_margin_model(total_steps):
  """acc_margin(step, m): the curve stretched to total_steps, responding to the margin m."""
  fraction = CURVE[:, 0] / CURVE[-1, 0]
  steps = np.arange(total_steps) / total_steps
  acc = np.interp(steps, fraction, CURVE[:, 1], left=0.0)
  at_curve = np.interp(steps, fraction, CURVE[:, 2], left=0.0)
  return jnp.asarray(acc), jnp.asarray(at_curve)


def simulate(update, state, total_steps, batch_size, seed=0):
  """m at every step when acc_margin follows the curve; `update(state, acc_margin)` -> state."""
  acc, at_curve = _acc_margin_model(total_steps)
  keys = jax.random.split(jax.random.key(seed), total_steps)

  def step(state, inputs):
    acc, at_curve, key = inputs
    expected = jnp.clip(acc - (acc - at_curve) * state["m"] / CURVE_MARGIN, 0.0, 1.0)
    observed = jax.random.binomial(key, batch_size, expected) / batch_size
    state = update(state, observed)
    return state, state["m"]

  _, ms = jax.lax.scan(step, state, (acc, at_curve, keys))
  return np.asarray(ms)


@pytest.mark.parametrize("row", ["webface_adam_s30_m035", "vggface2_adm"])
def test_table_rows_margin_never_reaches_its_floor(row):
  config, total_steps = _table_rows()[row]
  margin = margins.from_config(config.loss)
  am = margin.auto_margin
  assert am is not None, f"{row} trains with the auto-margin"
  ms = simulate(am.update, margin.init_state(), total_steps, config.global_batch_size)
  assert ms.min() > am.m_min + 0.05, (row, ms.min())
  # The margin is steered, not merely held: once the curve passes the target, m moves.
  assert abs(ms[-1] - margin.m) > 0.02, (row, ms[-1])


def test_the_previous_auto_margin_collapses_on_the_same_curve():
  """The check that the simulation can fail: the table rows' previous auto-margin (target 0.9,
  rate 1e-3, m_min 0; its average started at the target and it steered from step 0) drives m to
  its floor on the same curve."""
  config, total_steps = _table_rows()["webface_adam_s30_m035"]
  target, rate, momentum, m_min, m_max = 0.9, 1e-3, 0.99, 0.0, 0.8

  def steer_from_step_zero(state, acc_margin):
    ema = momentum * state["acc_margin_ema"] + (1 - momentum) * acc_margin
    return {"m": jnp.clip(state["m"] + rate * (ema - target), m_min, m_max), "acc_margin_ema": ema}

  start = {"m": jnp.float32(config.loss.m), "acc_margin_ema": jnp.float32(target)}
  ms = simulate(steer_from_step_zero, start, total_steps, config.global_batch_size)
  assert ms.min() == m_min
  assert np.argmax(ms == m_min) < 1_000, "within the first thousand steps"
