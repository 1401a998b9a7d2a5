"""The pieces of one training step: state, optimiser, schedule and the jitted-able step itself.

Pure JAX/Flax/optax (no input pipeline, no checkpointing), so benchmarks and notebooks can build
and time exactly the step that `train.py` runs.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from adam_face import classifier, losses, margins

MESH_AXIS = classifier.MESH_AXIS


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # {'backbone': ..., 'head': {'centers': [C_pad, D]}}
  batch_stats: Any
  opt_state: Any
  margin: Any  # Auto-margin state {'m', 'acc_margin_ema'}; m stays fixed when disabled.
  loss_state: Any  # Running statistics of CurricularFace / AdaFace (adam_face/margins.py).
  rng: jax.Array


# ------------------------------------------------------------------------------ optimisation


def create_learning_rate_fn(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warm-up to the peak, then the configured decay over the remaining steps."""
  opt = config.optimizer
  warmup, peak = opt.warmup_steps, opt.learning_rate
  decay_steps = max(total_steps - warmup, 1)
  if opt.schedule == "polynomial":
    main = optax.polynomial_schedule(peak, 0.0, opt.polynomial_power, decay_steps)
  elif opt.schedule == "cosine":
    main = optax.cosine_decay_schedule(peak, decay_steps)
  elif opt.schedule == "step":
    main = optax.piecewise_constant_schedule(
        peak, {int(b) - warmup: 0.1 for b in opt.step_boundaries})
  elif opt.schedule == "constant":
    main = optax.constant_schedule(peak)
  else:
    raise ValueError(f"optimizer.schedule={opt.schedule!r}; valid: polynomial, cosine, step, "
                     "constant.")
  if not warmup:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def create_optimizer(config: ml_collections.ConfigDict,
                     learning_rate_fn: optax.Schedule) -> optax.GradientTransformation:
  """SGD+momentum with coupled weight decay (insightface's recipe) or AdamW.

  Gradient clipping applies to the backbone only, as insightface clips the backbone's gradient
  norm: the head's gradient is spread over C/N-sharded rows and its scale follows the batch.
  """
  opt = config.optimizer
  parts = []
  if opt.grad_clip_norm > 0:
    parts.append(optax.masked(optax.clip_by_global_norm(opt.grad_clip_norm),
                              {"backbone": True, "head": False}))
  if opt.name == "sgd":
    parts += [optax.add_decayed_weights(opt.weight_decay),
              optax.sgd(learning_rate_fn, momentum=opt.momentum)]
  elif opt.name == "adamw":
    parts.append(optax.adamw(learning_rate_fn, b1=opt.momentum, weight_decay=opt.weight_decay))
  else:
    raise ValueError(f"optimizer.name={opt.name!r}; valid: sgd, adamw.")
  return optax.chain(*parts)


# ------------------------------------------------------------------------------ state


def _state_shardings(abstract_state: TrainState, mesh: Mesh) -> TrainState:
  """Class centres (and their optimiser state) sharded by class; everything else replicated."""

  def sharding(path, leaf):
    on_head = any(getattr(k, "key", None) == "centers" for k in path)
    return NamedSharding(mesh, P(MESH_AXIS, None) if on_head and leaf.ndim == 2 else P())

  return jax.tree_util.tree_map_with_path(sharding, abstract_state)


def create_train_state(config: ml_collections.ConfigDict, model: flax.linen.Module, mesh: Mesh,
                       num_classes: int, tx: optax.GradientTransformation):
  """Initialises the train state directly in its sharded layout; returns (state, shardings)."""
  size = config.dataset.image_size
  num_centers = (classifier.padded_num_classes(num_classes, mesh.size)
                 * margins.subcenters_per_class(config.loss))

  def init(rng):
    params_rng, dropout_rng, head_rng, state_rng = jax.random.split(rng, 4)
    variables = model.init({"params": params_rng, "dropout": dropout_rng},
                           jnp.zeros((1, size, size, 3), jnp.float32), train=False)
    centers = 0.01 * jax.random.normal(head_rng, (num_centers, config.model.embedding_dim))
    params = {"backbone": variables["params"], "head": {"centers": centers}}
    m = 0.0 if config.loss.kind == "normface" else config.loss.m
    margin = (losses.init_auto_margin(m, config.loss.auto_margin.target)
              if config.loss.kind in losses.AUTO_MARGIN_KINDS else {})
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                      margin=margin, loss_state=margins.init_loss_state(config.loss),
                      rng=state_rng)

  rng = jax.random.PRNGKey(config.seed)
  shardings = _state_shardings(jax.eval_shape(init, rng), mesh)
  return jax.jit(init, out_shardings=shardings)(rng), shardings


def _margin_for_step(state: TrainState, config: ml_collections.ConfigDict):
  if config.loss.kind in losses.AUTO_MARGIN_KINDS:
    return state.margin["m"]
  if config.loss.kind in margins.KINDS:
    return 0.0  # Their margins come from margins.margin_fn; logged as 0.
  return config.loss.m


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: flax.linen.Module,
               tx: optax.GradientTransformation, learning_rate_fn: optax.Schedule, mesh: Mesh,
               num_classes: int, config: ml_collections.ConfigDict):
  """One optimisation step on a global batch; returns the new state and scalar metrics."""
  rng, dropout_rng, sample_rng = jax.random.split(state.rng, 3)
  compute_dtype = jnp.dtype(config.compute_dtype)
  margin = _margin_for_step(state, config)

  num_subcenters = margins.subcenters_per_class(config.loss)

  def loss_fn(params):
    embeddings, new_model_state = model.apply(
        {"params": params["backbone"], "batch_stats": state.batch_stats}, batch["image"],
        train=True, mutable=["batch_stats"], rngs={"dropout": dropout_rng})
    centers = params["head"]["centers"]
    cos_target = margins.target_cosines(embeddings, centers, batch["label"], num_subcenters)
    loss_state, margin_fn = state.loss_state, None
    if config.loss.kind in margins.KINDS:
      loss_state = margins.update_loss_state(
          config.loss, state.loss_state, cos_target=cos_target,
          feature_norm=jnp.linalg.norm(embeddings.astype(jnp.float32), axis=-1))
      margin_fn = margins.margin_fn(config.loss, loss_state, sample_rng)
    loss, metrics, sampled = classifier.margin_head_loss(
        centers, embeddings, batch["label"], mesh=mesh, num_classes=num_classes,
        kind=config.loss.kind, s=config.loss.s, m=margin, sample_rate=config.head.sample_rate,
        sample_key=sample_rng, compute_dtype=compute_dtype, margin_fn=margin_fn,
        num_subcenters=num_subcenters)
    angles = jnp.degrees(jnp.arccos(jnp.clip(cos_target, -1.0, 1.0)))
    return loss, (metrics, sampled, new_model_state["batch_stats"], loss_state, angles)

  (loss, (metrics, sampled, batch_stats, loss_state, target_angles)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if config.head.sample_rate < 1.0:
    params, opt_state = classifier.keep_unsampled_rows(
        (params, opt_state), (state.params, state.opt_state), sampled)

  new_margin = state.margin
  am = config.loss.auto_margin
  if am.enabled:
    new_margin = losses.update_auto_margin(state.margin, metrics["acc_margin"], target=am.target,
                                           rate=am.rate, momentum=am.momentum, m_min=am.m_min,
                                           m_max=am.m_max, hold=state.step < am.warmup_steps)
  metrics = dict(metrics, loss=loss, margin=jnp.asarray(margin, jnp.float32),
                 learning_rate=learning_rate_fn(state.step),
                 grad_norm=optax.tree.norm(grads["backbone"]),
                 # Per-sample difficulty: where on [0, 180] degrees the targets sit (histogram).
                 target_angle_deg=target_angles)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, margin=new_margin, loss_state=loss_state,
                            rng=rng)
  return new_state, metrics


def embed_fn_for(model: flax.linen.Module, state: TrainState) -> jax.tree_util.Partial:
  """The inference embedding as a Partial over the variables (traced, never baked in)."""

  def embed(variables, images):
    return model.apply(variables, images, train=False)

  return jax.tree_util.Partial(
      embed, {"params": state.params["backbone"], "batch_stats": state.batch_stats})
