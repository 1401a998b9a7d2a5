"""The pieces of one training step: state, optimiser, schedule and the jitted-able step itself.

Pure JAX/Flax/optax (no input pipeline, no checkpointing), so benchmarks and notebooks can build
and time exactly the step that `train.py` runs.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from adam_face import classifier, config_lib, losses, margins

MESH_AXIS = classifier.MESH_AXIS


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # {'backbone': ..., 'head': ({'centers': [C_pad, D]}, ...)}: a head per dataset.
  batch_stats: Any
  opt_state: Any
  margin: Any  # Per head: auto-margin state {'m', 'acc_margin_ema'}; m fixed when disabled.
  loss_state: Any  # Per head: CurricularFace / AdaFace running statistics (margins.py).
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
                       num_classes: Sequence[int], tx: optax.GradientTransformation):
  """Initialises the train state directly in its sharded layout; returns (state, shardings).

  num_classes holds the class count of each training dataset (config_lib.training_datasets);
  each dataset gets its own head params['head'][k], auto-margin state margin[k] and loss
  statistics loss_state[k].
  """
  size = config.dataset.image_size
  num_subcenters = margins.subcenters_per_class(config.loss)

  def init(rng):
    params_rng, dropout_rng, head_rng, state_rng = jax.random.split(rng, 4)
    variables = model.init({"params": params_rng, "dropout": dropout_rng},
                           jnp.zeros((1, size, size, 3), jnp.float32), train=False)
    heads = tuple(
        {"centers": classifier.random_centers(jax.random.fold_in(head_rng, k), classes,
                                              config.model.embedding_dim, mesh.size,
                                              num_subcenters)}
        for k, classes in enumerate(num_classes))
    params = {"backbone": variables["params"], "head": heads}
    m = 0.0 if config.loss.kind == "normface" else config.loss.m
    margin = (losses.init_auto_margin(m, config.loss.auto_margin.target)
              if config.loss.kind in losses.AUTO_MARGIN_KINDS else {})
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                      margin=tuple(margin for _ in num_classes),
                      loss_state=tuple(margins.init_loss_state(config.loss) for _ in num_classes),
                      rng=state_rng)

  rng = jax.random.PRNGKey(config.seed)
  shardings = _state_shardings(jax.eval_shape(init, rng), mesh)
  return jax.jit(init, out_shardings=shardings)(rng), shardings


def split_by_dataset(x: jax.Array, batch_sizes: Sequence[int], num_devices: int) -> list[jax.Array]:
  """Each dataset's rows of a fused global batch (input_pipeline.create_fused_train_iterator).

  Every device holds its share of dataset 0, then of dataset 1, ...; so the split is a reshape
  to [devices, rows per device] and a slice of the per-device axis, local to each device.
  """
  if len(batch_sizes) == 1:
    return [x]
  blocks = x.reshape((num_devices, -1) + x.shape[1:])
  parts, start = [], 0
  for size in batch_sizes:
    per_device = size // num_devices
    parts.append(blocks[:, start:start + per_device].reshape((size,) + x.shape[1:]))
    start += per_device
  return parts


def _margin_for_step(margin_state, config: ml_collections.ConfigDict):
  if config.loss.kind in losses.AUTO_MARGIN_KINDS:
    return margin_state["m"]
  if config.loss.kind in margins.KINDS:
    return 0.0  # Their margins come from margins.margin_fn; logged as 0.
  return config.loss.m


def _batch_mean(values, batch_sizes: Sequence[int]) -> jax.Array:
  """The mean over the rows of a fused batch of per-dataset values (weights: their row counts)."""
  return sum(jnp.asarray(v, jnp.float32) * size
             for v, size in zip(values, batch_sizes)) / sum(batch_sizes)


def _head_loss(config, centers, embeddings, labels, *, margin, loss_state, key, mesh,
               num_classes):
  """One dataset's margin loss against its own head; also returns the updated loss statistics
  and each sample's target cosine."""
  num_subcenters = margins.subcenters_per_class(config.loss)
  margin_fn = None
  if config.loss.kind in margins.KINDS:
    # CurricularFace's statistic takes this batch's target cosines before the head runs.
    cos_target = (margins.target_cosines(embeddings, centers, labels, num_subcenters)
                  if margins.needs_target_cosines(config.loss) else None)
    loss_state = margins.update_loss_state(
        config.loss, loss_state, cos_target=cos_target,
        feature_norm=jnp.linalg.norm(embeddings.astype(jnp.float32), axis=-1))
    margin_fn = margins.margin_fn(config.loss, loss_state, key)
  loss, metrics, sampled = classifier.margin_head_loss(
      centers, embeddings, labels, mesh=mesh, num_classes=num_classes, kind=config.loss.kind,
      s=config.loss.s, m=margin, sample_rate=config.head.sample_rate, sample_key=key,
      compute_dtype=jnp.dtype(config.compute_dtype), margin_fn=margin_fn,
      num_subcenters=num_subcenters)
  metrics = dict(metrics)
  cos_target = metrics.pop("cos_target")
  return loss, metrics, sampled, loss_state, cos_target


def fused_margin_loss(heads, embeddings: jax.Array, labels: jax.Array, *,
                      config: ml_collections.ConfigDict, step_margins, loss_states, keys, mesh: Mesh,
                      num_classes: Sequence[int]):
  """The margin loss of a (possibly fused) global batch: each dataset's rows against that
  dataset's head only, so identities that two datasets share under different labels never act
  as each other's negatives. The loss is the mean over all rows, i.e. the datasets' losses
  weighted by their share of the batch.

  Returns (loss, (per-dataset losses, metrics, sampled masks, loss statistics), target cosines).
  """
  batch_sizes = config_lib.dataset_batch_sizes(config)
  per_dataset = zip(heads, split_by_dataset(embeddings, batch_sizes, mesh.size),
                    split_by_dataset(labels, batch_sizes, mesh.size), step_margins, loss_states,
                    keys, num_classes)
  outputs = [_head_loss(config, head["centers"], emb, dataset_labels, margin=margin,
                        loss_state=stats, key=key, mesh=mesh, num_classes=classes)
             for head, emb, dataset_labels, margin, stats, key, classes in per_dataset]
  dataset_losses, metrics, sampled, new_loss_states, cos_target = zip(*outputs)
  return (_batch_mean(dataset_losses, batch_sizes),
          (dataset_losses, metrics, sampled, new_loss_states), jnp.concatenate(cos_target))


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: flax.linen.Module,
               tx: optax.GradientTransformation, learning_rate_fn: optax.Schedule, mesh: Mesh,
               num_classes: Sequence[int], config: ml_collections.ConfigDict):
  """One optimisation step on a global batch; returns the new state and scalar metrics.

  With several training datasets (dataset fusion) the backbone sees the whole batch and
  `fused_margin_loss` routes each dataset's rows to its own head.
  """
  rng, dropout_rng, sample_rng = jax.random.split(state.rng, 3)
  batch_sizes = config_lib.dataset_batch_sizes(config)
  names = [d.name for d in config_lib.training_datasets(config)]
  step_margins = [_margin_for_step(m, config) for m in state.margin]

  def loss_fn(params):
    embeddings, new_model_state = model.apply(
        {"params": params["backbone"], "batch_stats": state.batch_stats}, batch["image"],
        train=True, mutable=["batch_stats"], rngs={"dropout": dropout_rng})
    loss, per_dataset, cos_target = fused_margin_loss(
        params["head"], embeddings, batch["label"], config=config, step_margins=step_margins,
        loss_states=state.loss_state, keys=jax.random.split(sample_rng, len(names)), mesh=mesh,
        num_classes=num_classes)
    return loss, (per_dataset, new_model_state["batch_stats"], cos_target)

  (loss, ((head_losses, head_metrics, sampled, loss_state), batch_stats, cos_target)), grads = (
      jax.value_and_grad(loss_fn, has_aux=True)(state.params))
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if config.head.sample_rate < 1.0:
    params, opt_state = classifier.keep_unsampled_rows(
        (params, opt_state), (state.params, state.opt_state), sampled)

  new_margin = state.margin
  am = config.loss.auto_margin
  if am.enabled:  # Each head steers its own margin by its own acc_margin.
    new_margin = tuple(
        losses.update_auto_margin(margin, metrics["acc_margin"], target=am.target, rate=am.rate,
                                  momentum=am.momentum, m_min=am.m_min, m_max=am.m_max,
                                  hold=state.step < am.warmup_steps)
        for margin, metrics in zip(state.margin, head_metrics))

  metrics = {
      "loss": loss,
      "acc": _batch_mean([m["acc"] for m in head_metrics], batch_sizes),
      "acc_margin": _batch_mean([m["acc_margin"] for m in head_metrics], batch_sizes),
      "margin": _batch_mean(step_margins, batch_sizes),
      "learning_rate": learning_rate_fn(state.step),
      "grad_norm": optax.tree.norm(grads["backbone"]),
      # Per-sample difficulty: where on [0, 180] degrees the targets sit (histogram).
      "target_angle_deg": jnp.degrees(jnp.arccos(jnp.clip(cos_target, -1.0, 1.0))),
  }
  if len(names) > 1:  # Per dataset, named by its builder (e.g. "casia_webface/acc_margin").
    for name, head_loss, head, margin in zip(names, head_losses, head_metrics, step_margins):
      metrics.update({f"{name}/loss": head_loss, f"{name}/acc": head["acc"],
                      f"{name}/acc_margin": head["acc_margin"],
                      f"{name}/margin": jnp.asarray(margin, jnp.float32)})
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
