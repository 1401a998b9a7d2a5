"""The training loop: backbone data-parallel, margin head sharded by class, one jitted step.

Read `train_and_evaluate` top to bottom: it validates the config, builds the mesh, data and model,
restores the latest checkpoint in the workdir if there is one (parameters, optimiser state, step,
auto-margin state and rng; the data iterator is re-positioned at that step), then loops over
`train_step`, logging, checkpointing and evaluating.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers, periodic_actions
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from adam_face import classifier, config_lib, evaluation, input_pipeline, losses, models

MESH_AXIS = classifier.MESH_AXIS


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # {'backbone': ..., 'head': {'centers': [C_pad, D]}}
  batch_stats: Any
  opt_state: Any
  margin: Any  # Auto-margin state {'m', 'acc_margin_ema'}; m stays fixed when disabled.
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
  c_pad = classifier.padded_num_classes(num_classes, mesh.size)

  def init(rng):
    params_rng, dropout_rng, head_rng, state_rng = jax.random.split(rng, 4)
    variables = model.init({"params": params_rng, "dropout": dropout_rng},
                           jnp.zeros((1, size, size, 3), jnp.float32), train=False)
    centers = 0.01 * jax.random.normal(head_rng, (c_pad, config.model.embedding_dim))
    params = {"backbone": variables["params"], "head": {"centers": centers}}
    m = 0.0 if config.loss.kind == "normface" else config.loss.m
    margin = (losses.init_auto_margin(m, config.loss.auto_margin.target)
              if config.loss.kind in losses.AUTO_MARGIN_KINDS else {})
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                      margin=margin, rng=state_rng)

  rng = jax.random.PRNGKey(config.seed)
  shardings = _state_shardings(jax.eval_shape(init, rng), mesh)
  return jax.jit(init, out_shardings=shardings)(rng), shardings


def _margin_for_step(state: TrainState, config: ml_collections.ConfigDict):
  if config.loss.kind in losses.AUTO_MARGIN_KINDS:
    return state.margin["m"]
  return config.loss.m


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: flax.linen.Module,
               tx: optax.GradientTransformation, learning_rate_fn: optax.Schedule, mesh: Mesh,
               num_classes: int, config: ml_collections.ConfigDict):
  """One optimisation step on a global batch; returns the new state and scalar metrics."""
  rng, dropout_rng, sample_rng = jax.random.split(state.rng, 3)
  compute_dtype = jnp.dtype(config.compute_dtype)
  margin = _margin_for_step(state, config)

  def loss_fn(params):
    embeddings, new_model_state = model.apply(
        {"params": params["backbone"], "batch_stats": state.batch_stats}, batch["image"],
        train=True, mutable=["batch_stats"], rngs={"dropout": dropout_rng})
    loss, metrics, sampled = classifier.margin_head_loss(
        params["head"]["centers"], embeddings, batch["label"], mesh=mesh,
        num_classes=num_classes, kind=config.loss.kind, s=config.loss.s, m=margin,
        sample_rate=config.head.sample_rate, sample_key=sample_rng, compute_dtype=compute_dtype)
    return loss, (metrics, sampled, new_model_state["batch_stats"])

  (loss, (metrics, sampled, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
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
                                           m_max=am.m_max)
  metrics = dict(metrics, loss=loss, margin=jnp.asarray(margin, jnp.float32),
                 learning_rate=learning_rate_fn(state.step),
                 grad_norm=optax.global_norm(grads["backbone"]))
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, margin=new_margin, rng=rng)
  return new_state, metrics


def embed_fn_for(model: flax.linen.Module, state: TrainState) -> jax.tree_util.Partial:
  """The inference embedding as a Partial over the variables (traced, never baked in)."""

  def embed(variables, images):
    return model.apply(variables, images, train=False)

  return jax.tree_util.Partial(
      embed, {"params": state.params["backbone"], "batch_stats": state.batch_stats})


# ------------------------------------------------------------------------------ the loop


class _PreemptionFlag:
  """Set by SIGTERM so the loop can save a final checkpoint and exit cleanly."""

  def __init__(self):
    self.raised = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and stopping.")
    self.raised = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def total_train_steps(config: ml_collections.ConfigDict, num_examples: int) -> int:
  if config.num_train_steps > 0:
    return config.num_train_steps
  return int(config.num_epochs * num_examples // config.global_batch_size)


def _global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding):
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def _evaluate(evaluator, model, state, step, writer, workdir, best):
  result = evaluator(embed_fn_for(model, state))
  scalars = result.scalars()
  writer.write_scalars(step, {f"eval/{k}": v for k, v in scalars.items()})
  for name, value in scalars.items():
    if name.endswith("/accuracy") and value > best.get(name, -1.0):
      best[name] = value
  writer.write_scalars(step, {f"best/{k}": v for k, v in best.items()})
  if jax.process_index() == 0:
    evaluation.plot_roc(result.curves, os.path.join(workdir, "roc.png"))
  logging.info("Verification at step %d:\n%s", step, evaluation.format_table(result.metrics))
  return result


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from the workdir's latest checkpoint), evaluates; returns the results."""
  config_lib.validate_config(config)
  mesh = classifier.create_mesh()
  config_lib.validate_for_mesh(config, mesh.size, jax.process_count())
  logging.info("Mesh: %d devices on %d processes (%s), axis %r.", mesh.size, jax.process_count(),
               jax.devices()[0].platform, MESH_AXIS)

  info = input_pipeline.dataset_info(config.dataset)
  num_classes, num_examples = info["num_classes"], info["num_examples"]
  verification_sets = {
      name: input_pipeline.load_verification_set(
          name, data_dir=config.verification.data_dir or None,
          image_size=config.dataset.image_size)
      for name in config.verification.sets}
  total_steps = total_train_steps(config, num_examples)
  logging.info("%d classes, %d examples; %d steps of %d images.", num_classes, num_examples,
               total_steps, config.global_batch_size)

  model = models.create_model(config.model.name, embedding_dim=config.model.embedding_dim,
                              dtype=jnp.dtype(config.compute_dtype),
                              dropout_rate=config.model.dropout_rate)
  learning_rate_fn = create_learning_rate_fn(config, total_steps)
  tx = create_optimizer(config, learning_rate_fn)
  state, state_shardings = create_train_state(config, model, mesh, num_classes, tx)

  checkpoints = ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                           enable_async_checkpointing=True))
  if checkpoints.latest_step() is not None:
    state = checkpoints.restore(checkpoints.latest_step(), args=ocp.args.StandardRestore(state))
    logging.info("Resumed from step %d of %s.", int(state.step), workdir)
  start_step = int(state.step)

  batch_sharding = NamedSharding(mesh, P(MESH_AXIS))
  step_fn = jax.jit(
      functools.partial(train_step, model=model, tx=tx, learning_rate_fn=learning_rate_fn,
                        mesh=mesh, num_classes=num_classes, config=config),
      in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, None),
      donate_argnums=0)
  batches = input_pipeline.create_train_iterator(
      config.dataset, global_batch_size=config.global_batch_size, seed=config.seed,
      start_step=start_step)
  evaluator = evaluation.Evaluator(verification_sets, batch_size=config.verification.batch_size,
                                   mesh=mesh, flip=config.verification.flip)

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if start_step == 0:
    writer.write_hparams(config_lib.flat_hparams(config))
  progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                             every_steps=config.log_every_steps)
  preemption = _PreemptionFlag()
  best: dict[str, float] = {}
  result = None
  window_metrics, window_start = [], time.perf_counter()
  step = start_step
  try:
    while step < total_steps and not preemption.raised:
      state, metrics = step_fn(state, _global_batch(next(batches), batch_sharding))
      step += 1
      progress(step)
      window_metrics.append(metrics)
      if step % config.log_every_steps == 0 or step == total_steps:
        summary = {k: float(np.mean([jax.device_get(m[k]) for m in window_metrics]))
                   for k in window_metrics[0]}
        elapsed = time.perf_counter() - window_start
        summary["images_per_second"] = len(window_metrics) * config.global_batch_size / elapsed
        writer.write_scalars(step, {f"train/{k}": v for k, v in summary.items()})
        window_metrics, window_start = [], time.perf_counter()
      if step % config.checkpoint_every_steps == 0:
        checkpoints.save(step, args=ocp.args.StandardSave(state))
      if step % config.verification.eval_every_steps == 0 and step < total_steps:
        result = _evaluate(evaluator, model, state, step, writer, workdir, best)
    checkpoints.save(step, args=ocp.args.StandardSave(state), force=True)
    checkpoints.wait_until_finished()
  finally:
    preemption.restore()
    checkpoints.close()
  if step < total_steps:
    logging.warning("Stopped at step %d of %d by SIGTERM; rerun the same command to resume.",
                    step, total_steps)
    writer.flush()
    return {"step": step, "preempted": True}

  if result is None or step % config.verification.eval_every_steps != 0:
    result = _evaluate(evaluator, model, state, step, writer, workdir, best)
  writer.flush()
  results = {"step": step, "metrics": result.metrics, "best": best,
             "table": evaluation.format_table(result.metrics)}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f, indent=2, default=float)
  print(results["table"])
  return results
