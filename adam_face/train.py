"""The training loop: backbone data-parallel, margin head sharded by class, one jitted step.

Read `train_and_evaluate` top to bottom: it validates the config, builds the mesh, data and model,
restores the latest good checkpoint in the workdir if there is one (parameters, optimiser state,
step, auto-margin state and rng, onto this run's device count; see checkpointing.py; the data
iterator is re-positioned at that step), then loops over `train_step.train_step`, logging,
checkpointing and evaluating, and stops with one clear line if the loss diverges.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from adam_face import checkpointing, classifier, config_lib, errors, model_dir, models, report
from adam_face import train_step as ts
from adam_face import data_builders, pixels, train_input, verification_sets
from adam_face import verification
from datasets import ijb

MESH_AXIS = classifier.MESH_AXIS


class _Preemption:
  """Notices SIGTERM (a preemption notice) so the loop can save a checkpoint and stop cleanly.

  One process: a Python handler sets a flag, read after every step. Several processes: a signal
  may reach only some of them, and a process that stopped alone would leave the others blocked in
  the step's collectives. JAX's preemption service (started by jax.distributed.initialize, with
  its own SIGTERM handler) spreads the notice to every process and names one step at which all of
  them stop together; `reached` asks it after every step.
  """

  def __init__(self):
    self._multiprocess = jax.process_count() > 1
    self._raised = False
    self._previous = None if self._multiprocess else signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and stopping.")
    self._raised = True

  def reached(self, step: int) -> bool:
    if self._multiprocess and multihost_utils.reached_preemption_sync_point(step):
      logging.warning("Preemption notice on some process: all stop at step %d.", step)
      return True
    return self._raised

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class TrainingDiverged(errors.RunError):
  """The loss or gradient stayed non-finite for config.nonfinite_patience steps."""


class _NonFiniteGuard:
  """Follows metrics['finite'] of every step (train_step drops a non-finite step's update) and
  says when the run has diverged: after `patience` consecutive non-finite steps under the "stop"
  policy, never under "skip". It reads each step's flag one step late, so the host never waits
  for the step in flight.
  """

  def __init__(self, policy: str, patience: int):
    self._policy, self._patience = policy, patience
    self._pending = None
    self._bad_steps: list[int] = []  # The current run of consecutive non-finite steps.
    self._last_finite: tuple[int, float] | None = None

  def observe(self, step: int, metrics) -> bool:
    """Records this step; True when the run must stop (judged on the previous step)."""
    previous, self._pending = self._pending, (step, metrics["finite"], metrics["loss"])
    return previous is not None and self._check(*previous)

  def flush(self) -> bool:
    """Judges the last step observed; True when the run must stop."""
    previous, self._pending = self._pending, None
    return previous is not None and self._check(*previous)

  def _check(self, step, finite, loss) -> bool:
    finite, loss = jax.device_get((finite, loss))
    if finite:
      self._bad_steps, self._last_finite = [], (step, float(loss))
      return False
    self._bad_steps.append(step)
    logging.warning(
        "Step %d: the loss (%s) or gradient is not finite; its update was skipped (%d in a row).",
        step,
        loss,
        len(self._bad_steps),
    )
    return self._policy == "stop" and len(self._bad_steps) >= self._patience

  def message(self, last_checkpoint: str) -> str:
    last = (
        f"the last finite loss was {self._last_finite[1]:.4g} at step {self._last_finite[0]}"
        if self._last_finite
        else "no step of this run had a finite loss"
    )
    return (
        f"Training diverged: the loss or gradient was non-finite at steps "
        f"{self._bad_steps[0]}-{self._bad_steps[-1]} ({len(self._bad_steps)} in a row, updates "
        f"skipped); {last}. The last good checkpoint is {last_checkpoint}. Lower "
        "optimizer.learning_rate or set optimizer.grad_clip_norm, then rerun to resume from it "
        "(or set nonfinite_policy='skip' to train through isolated bad steps)."
    )


def load_verification_sets(
    config: ml_collections.ConfigDict, names=None, data_dir: str | None = None
) -> dict[str, dict[str, np.ndarray]]:
  """The config's verification sets (or `names`), at the training image size."""
  # The held-out synthetic identities come from the same build as the training split, wherever
  # synthetic_faces sits among the training datasets (its builder defaults otherwise).
  synthetic_kwargs = next(
      (
          d.builder_kwargs
          for d in config_lib.training_datasets(config)
          if d.name == "synthetic_faces"
      ),
      None,
  )
  names = list(names or config.verification.sets)
  ijb_names = [name for name in names if name in ijb.IJB_SETS]
  if ijb_names:
    raise errors.RunError(
        f"verification.sets holds {ijb_names}: IJB sets are scored after training by "
        f"`python -m adam_face.evaluate --model=<workdir> --sets={','.join(ijb_names)} "
        "--ijb_root=...` (adam_face/ijb.py), not at every evaluation of a training run."
    )
  return {
      verification_sets.set_name(name): verification_sets.load_verification_set(
          name,
          data_dir=data_dir or config.verification.data_dir or None,
          manual_dir=config.verification.manual_dir or None,
          image_size=config.dataset.image_size,
          builder_kwargs=synthetic_kwargs if name == "synthetic" else None,
      )
      for name in names
  }


def init_backbone_from(state: ts.TrainState, config: ml_collections.ConfigDict) -> ts.TrainState:
  """`state` with the backbone and BatchNorm statistics of the model at config.init_from (a
  model directory or a training workdir); its head and optimiser state stay fresh."""
  model = model_dir.load(config.init_from)
  wanted = {"name": config.model.name, "embedding_dim": config.model.embedding_dim}
  if any(model.model_config.get(k) != v for k, v in wanted.items()):
    raise ValueError(
        f"config.init_from={config.init_from!r} holds a {model.model_config} backbone, but "
        f"config.model asks for {wanted}: set config.model to match it."
    )
  if model.image_size != config.dataset.image_size:
    logging.warning(
        "config.init_from was trained at %dx%d, this run trains at %dx%d.",
        *(2 * [model.image_size]),
        *(2 * [config.dataset.image_size]),
    )
  if model.pixel_scale != pixels.PIXEL_SCALE:
    logging.warning(
        "config.init_from was made for inputs (x - 127.5) / %s; this run trains it on "
        "(x - 127.5) / %s (pixels.normalize).",
        model.pixel_scale,
        pixels.PIXEL_SCALE,
    )
  current = {"params": state.params["backbone"], "batch_stats": state.batch_stats}
  model_dir.check_same_tree(current, model.variables, f"config.init_from={config.init_from}")
  # Every process holds the same loaded values; each places its own devices' (replicated) copy.
  loaded = jax.tree.map(
      lambda value, like: jax.make_array_from_callback(
          like.shape, like.sharding, lambda index: np.asarray(value, like.dtype)[index]
      ),
      model.variables,
      current,
  )
  logging.info("Backbone initialised from %s.", model.source)
  return state.replace(
      params={**state.params, "backbone": loaded["params"]}, batch_stats=loaded["batch_stats"]
  )


def json_default(value):
  """json.dump's fallback for numpy/jax scalars and arrays in metric dicts."""
  return value.tolist() if hasattr(value, "tolist") else float(value)


def total_train_steps(config: ml_collections.ConfigDict, num_examples: int) -> int:
  if config.num_train_steps > 0:
    return config.num_train_steps
  return int(config.num_epochs * num_examples // config.global_batch_size)


def _global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding):
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def _write_train_metrics(writer, step, window, seconds, global_batch_size, train_log_path):
  """Means of the window's scalars and histograms of its per-sample values, over its finite steps
  only (a metric writer never sees a NaN), plus the count of skipped steps so far."""
  finite = [m for m in window if m["finite"]]
  summary = {
      k: float(np.mean([m[k] for m in finite]))
      for k in (finite[0] if finite else {})
      if np.ndim(finite[0][k]) == 0 and k not in ("finite", "skipped_steps")
  }
  summary["images_per_second"] = len(window) * global_batch_size / seconds
  summary["skipped_steps"] = int(window[-1]["skipped_steps"])
  writer.write_scalars(step, {f"train/{k}": v for k, v in summary.items()})
  if jax.process_index() == 0:  # For plots (margin.png) and benchmarks to read back.
    with open(train_log_path, "a") as f:
      f.write(json.dumps({"step": step, **summary}) + "\n")
  if finite:
    writer.write_histograms(
        step,
        {
            f"train/{k}": np.concatenate([m[k] for m in finite])
            for k in finite[0]
            if np.ndim(finite[0][k]) == 1
        },
    )


def _evaluate(evaluator, state, step, writer, workdir, best):
  result = evaluator(ts.embed_fn_for(state))
  scalars = result.scalars()
  writer.write_scalars(step, {f"eval/{k}": v for k, v in scalars.items()})
  for name, value in scalars.items():
    if name.endswith("/accuracy") and value > best.get(name, -1.0):
      best[name] = value
  writer.write_scalars(step, {f"best/{k}": v for k, v in best.items()})
  if jax.process_index() == 0:
    report.plot_roc(result.curves, os.path.join(workdir, "roc.png"))
    train_log = os.path.join(workdir, report.TRAIN_LOG)
    if os.path.exists(train_log):  # The auto-margin at work: margin and acc_margin by step.
      report.plot_margin_trajectory(
          report.read_train_log(train_log), os.path.join(workdir, "margin.png")
      )
    with open(os.path.join(workdir, "best.json"), "w") as f:  # Survives a restart.
      json.dump(best, f, indent=2)
  logging.info("Verification at step %d:\n%s", step, report.format_table(result.metrics))
  return result


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from the workdir's latest checkpoint), evaluates; returns the results."""
  config_lib.validate_config(config)
  mesh = classifier.create_mesh()
  config_lib.validate_for_mesh(config, mesh.size, jax.process_count())
  logging.info(
      "Mesh: %d devices on %d processes (%s), axis %r.",
      mesh.size,
      jax.process_count(),
      jax.devices()[0].platform,
      MESH_AXIS,
  )

  datasets = config_lib.training_datasets(config)
  batch_sizes = config_lib.dataset_batch_sizes(config)
  infos = [data_builders.dataset_info(d) for d in datasets]
  num_classes = tuple(info["num_classes"] for info in infos)
  for info, batch_size in zip(infos, batch_sizes):
    logging.info(
        "%s: %d classes, %d examples, %d of each batch.",
        info["full_name"],
        info["num_classes"],
        info["num_examples"],
        batch_size,
    )
  verification_sets = load_verification_sets(config)
  total_steps = total_train_steps(config, sum(info["num_examples"] for info in infos))
  logging.info("%d steps of %d images.", total_steps, config.global_batch_size)

  model = models.create_model(
      config.model.name,
      embedding_dim=config.model.embedding_dim,
      dtype=jnp.dtype(config.compute_dtype),
      dropout_rate=config.model.dropout_rate,
  )
  state, state_shardings = ts.create_train_state(config, model, mesh, num_classes, total_steps)

  checkpoints = checkpointing.Checkpoints(workdir, keep=config.keep_checkpoints)
  state = checkpoints.restore_latest(state, config)
  start_step = int(state.step)
  if start_step:
    logging.info("Resumed from step %d of %s.", start_step, workdir)
  elif config.init_from:
    state = init_backbone_from(state, config)

  batch_sharding = NamedSharding(mesh, P(MESH_AXIS))
  step_fn = jax.jit(
      ts.train_step,
      # Metrics replicated, so every process can read them (the per-sample angles included).
      in_shardings=(state_shardings, batch_sharding),
      out_shardings=(state_shardings, NamedSharding(mesh, P())),
      donate_argnums=0,
  )
  batches = train_input.create_fused_train_iterator(
      datasets, batch_sizes=batch_sizes, seed=config.seed, start_step=start_step
  )
  evaluator = verification.Evaluator(
      verification_sets,
      batch_size=config.verification.batch_size,
      mesh=mesh,
      flip=config.verification.flip,
  )

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if jax.process_index() == 0:
    # What `python -m adam_face.evaluate --model=<workdir>` needs to rebuild the model.
    with open(os.path.join(workdir, "config.json"), "w") as f:
      # With the input scale its checkpoints are made for (model_dir.load reads it).
      json.dump({**json.loads(config.to_json()), "pixel_scale": pixels.PIXEL_SCALE}, f, indent=2)
  if start_step == 0:
    writer.write_hparams(config_lib.flat_hparams(config))
  progress = periodic_actions.ReportProgress(
      num_train_steps=total_steps, writer=writer, every_steps=config.log_every_steps
  )
  preemption = _Preemption()
  guard = _NonFiniteGuard(config.nonfinite_policy, config.nonfinite_patience)
  best_path = os.path.join(workdir, "best.json")
  best: dict[str, float] = {}
  if start_step and os.path.exists(best_path):
    with open(best_path) as f:
      best = json.load(f)
  train_log_path = os.path.join(workdir, report.TRAIN_LOG)
  window_metrics, window_start = [], time.perf_counter()
  step = last_saved = start_step
  preempted = False
  try:
    while step < total_steps and not preempted:
      state, metrics = step_fn(state, _global_batch(next(batches), batch_sharding))
      step += 1
      if guard.observe(step, metrics) or (step == total_steps and guard.flush()):
        checkpoints.wait()
        raise TrainingDiverged(guard.message(checkpoints.describe_latest()))
      preempted = preemption.reached(step)
      progress(step)
      window_metrics.append(metrics)
      if step % config.log_every_steps == 0 or step == total_steps:
        _write_train_metrics(
            writer,
            step,
            jax.device_get(window_metrics),
            time.perf_counter() - window_start,
            config.global_batch_size,
            train_log_path,
        )
        window_metrics, window_start = [], time.perf_counter()
      if step % config.checkpoint_every_steps == 0 and checkpoints.save(step, state, config):
        last_saved = step
      if step % config.verification.eval_every_steps == 0 and step < total_steps:
        _evaluate(evaluator, state, step, writer, workdir, best)
    if step != last_saved:
      checkpoints.save(step, state, config)
    checkpoints.wait()
  except Exception:
    # A full disk often fails the pending asynchronous checkpoint first and a later write (the
    # metric writer's) before that failure is seen: report the checkpoint's, which names the
    # last good one to resume from; the later error stays chained to it.
    checkpoints.wait()
    raise
  finally:
    preemption.restore()
    checkpoints.close()
  if step < total_steps:
    logging.warning(
        "Stopped at step %d of %d by SIGTERM; rerun the same command to resume.", step, total_steps
    )
    writer.flush()
    return {"step": step, "preempted": True}

  result = _evaluate(evaluator, state, step, writer, workdir, best)
  writer.flush()
  results = {
      "step": step,
      "metrics": result.metrics,
      "best": best,
      "table": report.format_table(result.metrics),
  }
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f, indent=2, default=json_default)
  print(results["table"])
  return results
