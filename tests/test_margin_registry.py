"""Adding a margin method is one class and one registry line: a toy margin trains end to end."""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adam_face import config_lib, margins, models, train_step
from tiny_config import tiny_demo_config


@dataclasses.dataclass(frozen=True)
class HalfCosFace(margins.Margin):
  """A toy: target s * (cos - m / 2), logging its margin."""

  kind: ClassVar[str] = "toy_half_cosface"
  m: float = 0.4

  def target_logits(self, cos_target, *, state, feature_norm, key):
    return self.s * (jnp.clip(cos_target, -1.0, 1.0) - self.m / 2)

  def metrics(self, state):
    return {"margin": jnp.float32(self.m / 2)}


@pytest.fixture
def toy_kind():
  margins.register(HalfCosFace)  # The one registry line.
  yield HalfCosFace.kind
  del margins.REGISTRY[HalfCosFace.kind]


def test_a_registered_toy_margin_trains_the_tiny_model_two_steps(toy_kind, mesh8):
  config = tiny_demo_config(
      **{"loss": margins.loss_config(toy_kind, s=16.0, m=0.6), "optimizer.warmup_steps": 0}
  )
  config_lib.validate_config(config)
  model = models.create_model("tiny", embedding_dim=config.model.embedding_dim)
  state, shardings = train_step.create_train_state(config, model, mesh8, (16,), 2)
  assert state.heads[0].margin == HalfCosFace(s=16.0, m=0.6)
  sharding = jax.sharding.NamedSharding(mesh8, jax.sharding.PartitionSpec("data"))
  rng = np.random.default_rng(0)
  batch = {
      "image": jax.device_put(rng.normal(size=(16, 32, 32, 3)).astype(np.float32), sharding),
      "label": jax.device_put(np.arange(16, dtype=np.int32), sharding),
  }
  step = jax.jit(train_step.train_step, in_shardings=(shardings, sharding))
  losses = []
  for _ in range(2):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
    assert float(metrics["margin"]) == pytest.approx(0.3)
  assert int(state.step) == 2 and np.all(np.isfinite(losses))
  assert losses[1] < losses[0], losses


def test_unknown_kind_and_field_name_the_valid_ones(toy_kind):
  with pytest.raises(
      ValueError,
      match=r"Unknown loss kind 'toy_half_cosfac'. Did you mean "
      r"'toy_half_cosface'\? Valid kinds: normface, ",
  ):
    margins.kind_class("toy_half_cosfac")
  with pytest.raises(
      ValueError,
      match=r"Unknown field config.loss.mm for kind='toy_half_cosface'. "
      r"Did you mean 'm'\? Valid fields: kind, m, s.",
  ):
    margins.from_config({"kind": toy_kind, "mm": 1.0})
  with pytest.raises(ValueError, match="registered twice"):
    margins.register(HalfCosFace)
