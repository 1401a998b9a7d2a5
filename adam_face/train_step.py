"""The pieces of one training step: state, optimiser, schedule and the jitted-able step itself.

Pure JAX/Flax/optax (no input pipeline, no checkpointing), so benchmarks and notebooks can build
and time exactly the step that `train.py` runs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from adam_face import batch_layout, classifier, config_lib, margins

MESH_AXIS = classifier.MESH_AXIS


@dataclasses.dataclass(frozen=True)
class Head:
  """One training dataset's class-sharded head: what the step needs to know about it (static)."""

  name: str  # The dataset's TFDS builder name; per-dataset metrics are logged under it.
  num_classes: int
  batch_size: int  # Its rows in every global batch.
  margin: margins.Margin


class TrainState(train_state.TrainState):
  """Flax's TrainState (step, apply_fn, params, tx, opt_state) plus what face training adds.

  params = {'backbone': ..., 'head': ({'centers': [C_pad * K, D]}, ...)}: a head per dataset, and
  margin_states[k] is head k's margin state (auto-margin, running statistics). skipped_steps
  counts the steps whose update was dropped as non-finite (see `train_step`). The static fields
  are rebuilt from the config, never checkpointed.
  """

  batch_stats: Any
  margin_states: tuple
  rng: jax.Array
  skipped_steps: jax.Array
  heads: tuple[Head, ...] = flax.struct.field(pytree_node=False)
  mesh: Mesh = flax.struct.field(pytree_node=False)
  sample_rate: float = flax.struct.field(pytree_node=False)
  compute_dtype: Any = flax.struct.field(pytree_node=False)
  learning_rate_fn: optax.Schedule = flax.struct.field(pytree_node=False)


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
        peak, {int(b) - warmup: 0.1 for b in opt.step_boundaries}
    )
  elif opt.schedule == "constant":
    main = optax.constant_schedule(peak)
  else:
    raise ValueError(
        f"optimizer.schedule={opt.schedule!r}; valid: polynomial, cosine, step, constant."
    )
  if not warmup:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def create_optimizer(
    config: ml_collections.ConfigDict, learning_rate_fn: optax.Schedule
) -> optax.GradientTransformation:
  """SGD+momentum with coupled weight decay (insightface's recipe) or AdamW.

  Gradient clipping applies to the backbone only, as insightface clips the backbone's gradient
  norm: the head's gradient is spread over C/N-sharded rows and its scale follows the batch.
  For fine-tuning, the backbone's final updates are scaled by backbone_lr_scale, and zeroed for
  its first freeze_backbone_steps steps (its momentum still gathers their gradients).
  """
  opt = config.optimizer
  parts = []
  if opt.grad_clip_norm > 0:
    parts.append(
        optax.masked(
            optax.clip_by_global_norm(opt.grad_clip_norm), {"backbone": True, "head": False}
        )
    )
  if opt.name == "sgd":
    parts += [
        optax.add_decayed_weights(opt.weight_decay),
        optax.sgd(learning_rate_fn, momentum=opt.momentum),
    ]
  elif opt.name == "adamw":
    parts.append(optax.adamw(learning_rate_fn, b1=opt.momentum, weight_decay=opt.weight_decay))
  else:
    raise ValueError(f"optimizer.name={opt.name!r}; valid: sgd, adamw.")
  if opt.backbone_lr_scale != 1.0 or opt.freeze_backbone_steps > 0:
    parts.append(
        optax.masked(
            optax.scale_by_schedule(
                lambda step: jnp.where(step < opt.freeze_backbone_steps, 0.0, opt.backbone_lr_scale)
            ),
            {"backbone": True, "head": False},
        )
    )
  return optax.chain(*parts)


# ------------------------------------------------------------------------------ state


def state_shardings(abstract_state: TrainState, mesh: Mesh) -> TrainState:
  """Class centres (and their optimiser state) sharded by class; everything else replicated."""

  def sharding(path, leaf):
    on_head = any(getattr(k, "key", None) == "centers" for k in path)
    return NamedSharding(mesh, P(MESH_AXIS, None) if on_head and leaf.ndim == 2 else P())

  return jax.tree_util.tree_map_with_path(sharding, abstract_state)


def create_train_state(
    config: ml_collections.ConfigDict,
    model: flax.linen.Module,
    mesh: Mesh,
    num_classes: Sequence[int],
    total_steps: int,
):
  """Initialises the train state directly in its sharded layout; returns (state, shardings).

  num_classes holds the class count of each training dataset (config_lib.training_datasets);
  each dataset gets its own head params['head'][k] and margin state margin_states[k].
  """
  size = config.dataset.image_size
  margin = margins.from_config(config.loss)
  names = [d.name for d in config_lib.training_datasets(config)]
  heads = tuple(
      Head(name, classes, batch_size, margin)
      for name, classes, batch_size in zip(
          names, num_classes, config_lib.dataset_batch_sizes(config)
      )
  )
  learning_rate_fn = create_learning_rate_fn(config, total_steps)
  tx = create_optimizer(config, learning_rate_fn)

  def init(rng):
    params_rng, dropout_rng, head_rng, state_rng = jax.random.split(rng, 4)
    variables = model.init(
        {"params": params_rng, "dropout": dropout_rng},
        jnp.zeros((1, size, size, 3), jnp.float32),
        train=False,
    )
    centers = tuple(
        {
            "centers": classifier.random_centers(
                jax.random.fold_in(head_rng, k),
                head.num_classes,
                config.model.embedding_dim,
                mesh,
                head.margin.centers_per_class,
            )
        }
        for k, head in enumerate(heads)
    )
    return TrainState.create(
        apply_fn=model.apply,
        params={"backbone": variables["params"], "head": centers},
        tx=tx,
        batch_stats=variables.get("batch_stats", {}),
        margin_states=tuple(head.margin.init_state() for head in heads),
        rng=state_rng,
        skipped_steps=jnp.zeros((), jnp.int32),
        heads=heads,
        mesh=mesh,
        sample_rate=config.head.sample_rate,
        compute_dtype=jnp.dtype(config.compute_dtype),
        learning_rate_fn=learning_rate_fn,
    )

  rng = jax.random.PRNGKey(config.seed)
  shardings = state_shardings(jax.eval_shape(init, rng), mesh)
  return jax.jit(init, out_shardings=shardings)(rng), shardings


def _batch_mean(values, batch_sizes: Sequence[int]) -> jax.Array:
  """The mean over the rows of a fused batch of per-dataset values (weights: their row counts)."""
  return sum(jnp.asarray(v, jnp.float32) * size for v, size in zip(values, batch_sizes)) / sum(
      batch_sizes
  )


def fused_margin_loss(
    head_params,
    margin_states,
    embeddings: jax.Array,
    labels: jax.Array,
    keys,
    *,
    heads: Sequence[Head],
    mesh: Mesh,
    rows=None,
    compute_dtype: Any = jnp.float32,
):
  """The margin loss of a (possibly fused) global batch: each dataset's rows against that
  dataset's head only, so identities that two datasets share under different labels never act
  as each other's negatives. The loss is the mean over all rows, i.e. the datasets' losses
  weighted by their share of the batch.

  keys holds a margin key per head; rows, if given, each head's Partial FC rows (None for a head
  that uses every centre), its head_params then holding only those rows (gather_center_rows).

  Returns (loss, (per-dataset losses, metrics, margin states)).
  """
  batch_sizes = [head.batch_size for head in heads]
  rows = (None,) * len(heads) if rows is None else rows
  outputs = [
      classifier.margin_head_loss(
          # A Partial FC block comes as [rows, 1, D] (gather_center_rows): a free reshape.
          params["centers"].reshape(-1, params["centers"].shape[-1]),
          emb,
          dataset_labels,
          head.margin,
          state,
          mesh=mesh,
          num_classes=head.num_classes,
          rows=rows_k,
          key=key,
          compute_dtype=compute_dtype,
      )
      for head, params, state, emb, dataset_labels, rows_k, key in zip(
          heads,
          head_params,
          margin_states,
          batch_layout.split_by_dataset(embeddings, batch_sizes, mesh.size),
          batch_layout.split_by_dataset(labels, batch_sizes, mesh.size),
          rows,
          keys,
      )
  ]
  dataset_losses, metrics, new_states = zip(*outputs)
  return _batch_mean(dataset_losses, batch_sizes), (dataset_losses, metrics, new_states)


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


def step_keys(state: TrainState):
  """(next rng, dropout key, per-head Partial FC sampling keys, per-head margin keys)."""
  rng, dropout_rng, head_rng = jax.random.split(state.rng, 3)
  head_keys = [jax.random.split(k) for k in jax.random.split(head_rng, len(state.heads))]
  return rng, dropout_rng, tuple(k[0] for k in head_keys), tuple(k[1] for k in head_keys)


def head_rows(state: TrainState, labels: jax.Array, sample_keys) -> tuple:
  """Each head's Partial FC rows for this global batch (None for a head that uses all)."""
  batch_sizes = [head.batch_size for head in state.heads]
  return tuple(
      classifier.partial_fc_rows(
          dataset_labels,
          key,
          mesh=state.mesh,
          num_classes=head.num_classes,
          sample_rate=state.sample_rate,
      )
      for head, dataset_labels, key in zip(
          state.heads,
          batch_layout.split_by_dataset(labels, batch_sizes, state.mesh.size),
          sample_keys,
      )
  )


def train_step(state: TrainState, batch: dict[str, jax.Array]):
  """One optimisation step on a global batch; returns the new state and metrics.

  With several training datasets (dataset fusion) the backbone sees the whole batch and
  `fused_margin_loss` routes each dataset's rows to its own head.

  With Partial FC (sample_rate < 1) the step sees only the sampled rows of each head's centres
  and of their optimiser state: it gathers them, differentiates and updates that block, and
  writes it back, in place when the state is donated (as train.py does). Unsampled centres and
  their optimiser state are untouched (the lazy rule, see adam_face.classifier).

  A step whose loss, gradient or updated parameters hold a NaN or an infinity changes nothing
  but the step count, the rng and `skipped_steps` (its batch is consumed, so the data position
  stays a function of the step): the state is never poisoned, and the training loop decides from
  metrics['finite'] whether to go on (config.nonfinite_policy).
  """
  rng, dropout_rng, sample_keys, margin_keys = step_keys(state)
  heads, mesh = state.heads, state.mesh
  rows = head_rows(state, batch["label"], sample_keys)
  params = classifier.gather_center_rows(state.params, rows, mesh)
  opt_state = classifier.gather_center_rows(state.opt_state, rows, mesh)

  def loss_fn(params):
    embeddings, new_model_state = state.apply_fn(
        {"params": params["backbone"], "batch_stats": state.batch_stats},
        batch["image"],
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": dropout_rng},
    )
    loss, per_dataset = fused_margin_loss(
        params["head"],
        state.margin_states,
        embeddings,
        batch["label"],
        margin_keys,
        heads=heads,
        mesh=mesh,
        rows=rows,
        compute_dtype=state.compute_dtype,
    )
    return loss, (per_dataset, new_model_state["batch_stats"])

  (loss, ((head_losses, head_metrics, margin_states), batch_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True
  )(params)
  updates, new_opt_state = state.tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  finite = (
      jnp.isfinite(loss)
      & _all_finite(grads)
      & _all_finite((new_params, batch_stats, margin_states))
  )

  def unless_finite_keep_old(new, old, *, counts_advance=False):
    # The optimiser's step counts advance anyway, so its schedule stays a function of the step.
    if counts_advance and jnp.issubdtype(new.dtype, jnp.integer):
      return new
    return jnp.where(finite, new, old)

  # The Partial FC blocks are guarded by their write-back, which skips them when the step is not
  # finite: a select would hold the old and the new block side by side (and a dense guard would
  # copy [C, D]).
  new_params = classifier.map_unsampled_leaves(unless_finite_keep_old, rows, new_params, params)
  new_opt_state = classifier.map_unsampled_leaves(
      functools.partial(unless_finite_keep_old, counts_advance=True), rows, new_opt_state, opt_state
  )
  new_state = state.replace(
      step=state.step + 1,
      params=classifier.scatter_center_rows(state.params, new_params, rows, mesh, write=finite),
      opt_state=classifier.scatter_center_rows(
          state.opt_state, new_opt_state, rows, mesh, write=finite
      ),
      batch_stats=jax.tree.map(unless_finite_keep_old, batch_stats, state.batch_stats),
      margin_states=jax.tree.map(unless_finite_keep_old, margin_states, state.margin_states),
      rng=rng,
      skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32),
  )

  batch_sizes = [head.batch_size for head in heads]
  scalars = {
      k: _batch_mean([m[k] for m in head_metrics], batch_sizes)
      for k in head_metrics[0]
      if k != "cos_target"
  }
  metrics = {
      "loss": loss,
      **scalars,  # acc, acc_margin and each margin's own (margin, t, norm statistics ...).
      "learning_rate": state.learning_rate_fn(state.step),
      "grad_norm": optax.tree.norm(grads["backbone"]),
      "finite": finite,
      "skipped_steps": new_state.skipped_steps,
      # Per-sample difficulty: where on [0, 180] degrees the targets sit (histogram).
      "target_angle_deg": jnp.degrees(
          jnp.arccos(jnp.clip(jnp.concatenate([m["cos_target"] for m in head_metrics]), -1.0, 1.0))
      ),
  }
  if len(heads) > 1:  # Per dataset, named by its builder (e.g. "casia_webface/acc_margin").
    for head, head_loss, head_metric in zip(heads, head_losses, head_metrics):
      metrics[f"{head.name}/loss"] = head_loss
      metrics.update({f"{head.name}/{k}": v for k, v in head_metric.items() if k != "cos_target"})
  return new_state, metrics


def embed_fn_for(state: TrainState) -> jax.tree_util.Partial:
  """The inference embedding as a Partial over the variables (traced, never baked in)."""

  def embed(variables, images):
    return state.apply_fn(variables, images, train=False)

  return jax.tree_util.Partial(
      embed, {"params": state.params["backbone"], "batch_stats": state.batch_stats}
  )
