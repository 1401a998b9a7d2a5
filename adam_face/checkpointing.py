"""Checkpoints that survive what clusters do to them: other device counts, corruption, full disks.

Each checkpoint is an orbax step directory under <workdir>/checkpoints holding three items:

  state      the TrainState's arrays (class centres stored in their sharded layout),
  integrity  for every array, a fingerprint of its values and its count of real rows,
  config     the config of the run that wrote it (so a resume can say what changed).

Restoring (`Checkpoints.restore_latest`) is

  * elastic: a class-centre matrix is padded up to a multiple of the device count
    (classifier.padded_num_classes), so its stored row count depends on the device count of the
    run that wrote it. Only padding rows differ: they are cut or zero-filled to this run's layout
    (padding classes are masked out of every logit, so their values never matter), and every
    other array must match its stored shape exactly. Arrays are read straight into this run's
    sharding, so the process count may change too.
  * verified: every restored array's fingerprint, over its real rows, must equal the stored one.
    The fingerprint is a positional 32-bit hash of the bits summed with wrap-around on the
    devices: exact, and independent of the sharding, so it checks the same values whatever the
    device count. A checkpoint that cannot be read or does not verify is moved to
    <workdir>/corrupt_checkpoints/ (kept for inspection, never deleted), with a warning, and the
    one before it is tried.
  * never partial: orbax writes each step into a temporary directory and renames it (with a
    commit marker) only when complete, so a save cut short by SIGKILL is never listed as a step.

Saving refuses a state that holds a non-finite value, and a write that fails (full disk,
permissions) raises CheckpointWriteError naming the previous, intact, checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from adam_face import config_lib, errors

ITEMS = ("state", "integrity", "config")  # What each step directory holds (module docstring).


class CheckpointWriteError(errors.RunError):
  """A checkpoint could not be written (full disk, permissions)."""


class CheckpointMismatch(errors.RunError):
  """A checkpoint whose arrays do not fit this config (another model, dataset or loss)."""


class NoUsableCheckpoint(errors.RunError):
  """Every checkpoint in the workdir failed to restore or verify."""


# ------------------------------------------------------------------------------ fingerprints


def leaf_name(path) -> str:
  """A leaf's dotted name, as orbax names it in checkpoint metadata (params.head.0.centers)."""
  parts = []
  for key in path:
    for field in ("key", "name", "idx"):
      if hasattr(key, field):
        parts.append(str(getattr(key, field)))
        break
  return ".".join(parts)


def center_rows(tree, heads) -> dict[str, int]:
  """{leaf name: real rows} for the class-centre matrices of `heads` (and their optimiser state):
  a leaf under ...head.<k>.centers holds heads[k]'s classes x centres per class real rows."""
  rows = {}
  for path, _ in jax.tree_util.tree_leaves_with_path(tree):
    parts = leaf_name(path).split(".")
    if parts[-1] == "centers" and len(parts) >= 3 and parts[-3] == "head":
      head = heads[int(parts[-2])]
      rows[leaf_name(path)] = head.num_classes * head.margin.centers_per_class
  return rows


def _as_uint32(x: jax.Array) -> jax.Array:
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}.get(x.dtype.itemsize)
  if unsigned is None:
    raise TypeError(f"cannot fingerprint an array of dtype {x.dtype}")
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _fingerprint(x: jax.Array) -> jax.Array:
  """Sum over elements of a mix of (bits, position), mod 2**32. Integer wrap-around addition is
  associative, so the result does not depend on how the array is sharded or reduced."""
  bits = _as_uint32(jnp.asarray(x))
  position = jnp.arange(bits.size, dtype=jnp.uint32).reshape(bits.shape)
  mixed = (bits ^ (position * jnp.uint32(0x9E3779B9))) * jnp.uint32(0x85EBCA6B)
  mixed = (mixed ^ (mixed >> 13)) * jnp.uint32(0xC2B2AE35)
  return jnp.sum(mixed ^ (mixed >> 16), dtype=jnp.uint32)


def _summary(tree, rows: tuple[tuple[str, int], ...]):
  """({leaf name: fingerprint}, all floating values finite), over each leaf's real rows."""
  rows = dict(rows)
  fingerprints, finite = {}, jnp.bool_(True)
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    name = leaf_name(path)
    real = leaf[: rows[name]] if name in rows else leaf
    fingerprints[name] = _fingerprint(real)
    if jnp.issubdtype(real.dtype, jnp.floating):
      finite &= jnp.all(jnp.isfinite(real))
  return fingerprints, finite


def summarize(tree, rows: dict[str, int]) -> tuple[dict[str, int], bool]:
  """Fingerprints of every leaf (as Python ints) and whether every value is finite."""
  # rows as sorted pairs: hashable, so a static argument of jit.
  fingerprints, finite = jax.jit(_summary, static_argnums=1)(tree, tuple(sorted(rows.items())))
  fingerprints, finite = jax.device_get((fingerprints, finite))
  return {k: int(v) for k, v in fingerprints.items()}, bool(finite)


# ------------------------------------------------------------------------------ the manager


def _first_line(error: Exception) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def _all_agree(ok: bool) -> bool:
  """True when `ok` holds on every process (a process may fail to read only its own shards)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def checkpoint_directory(workdir: str) -> str:
  """Where a workdir's checkpoints are (the orbax step directories)."""
  return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpoints:
  """Saves and restores the TrainState of one workdir (see the module docstring)."""

  def __init__(self, workdir: str, *, keep: int, read_only: bool = False):
    self.workdir = os.path.abspath(workdir)
    self.directory = checkpoint_directory(self.workdir)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=not read_only,
            read_only=read_only,
            enable_async_checkpointing=not read_only,
        ),
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "integrity": ocp.JsonCheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
        },
    )
    self._pending: int | None = None  # The step of an asynchronous save not yet known complete.

  # -------------------------------------------------------------------------- saving

  def save(self, step: int, state, config: ml_collections.ConfigDict) -> bool:
    """Starts an asynchronous save of `state`; False (and a warning) if it holds a non-finite
    value. Raises CheckpointWriteError when this or the previous save fails to write."""
    rows = center_rows(state, state.heads)
    fingerprints, finite = summarize(state, rows)
    if not finite:
      logging.warning(
          "Not saving step %d: the train state holds non-finite values; the last good "
          "checkpoint stays %s.",
          step,
          self.describe_latest(),
      )
      return False
    self.wait()  # A failure of the previous save surfaces here, named by its own step.
    integrity = {
        name: {"fingerprint": fp, "rows": rows.get(name)} for name, fp in fingerprints.items()
    }
    try:
      self._manager.save(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardSave(state),
              integrity=ocp.args.JsonSave(integrity),
              config=ocp.args.JsonSave(json.loads(config.to_json())),
          ),
          force=True,
      )
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(step, e) from e
    self._pending = step
    return True

  def wait(self) -> None:
    """Waits for the pending save; raises CheckpointWriteError if it failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      step, self._pending = self._pending, None
      raise self._write_error(step, e) from e
    self._pending = None

  def _write_error(self, step, cause: Exception) -> CheckpointWriteError:
    self._manager.reload()
    return CheckpointWriteError(
        f"Could not write the checkpoint of step {step} to {self.directory} "
        f"({_first_line(cause)}). "
        f"The last good checkpoint is {self.describe_latest()}: free disk space (or fix the "
        "directory's permissions), then rerun the same command to resume from it."
    )

  def describe_latest(self) -> str:
    """'step N in <dir>' for the latest complete checkpoint, or says there is none."""
    step = self._manager.latest_step()
    if step is None:
      return f"none (no checkpoint in {self.directory} yet: a rerun starts from step 0)"
    return f"step {step} in {self.directory}"

  def close(self) -> None:
    self._manager.close()

  # -------------------------------------------------------------------------- restoring

  def restore_latest(self, state, config: ml_collections.ConfigDict):
    """The newest checkpoint that restores and verifies, laid out like `state` (a freshly built
    TrainState of this run); `state` itself when the workdir has no checkpoint."""
    corrupt = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      self._check_layout(step)
      try:
        restored, saved_config = self._restore_verified(step, state)
        reason = None
      except CheckpointMismatch:
        raise
      except Exception as e:  # pylint: disable=broad-except
        restored, reason = None, _first_line(e)
      if not _all_agree(reason is None):
        corrupt.append(self._set_aside(step, reason or "unreadable on another process"))
        continue
      if corrupt:
        logging.warning("Resuming from step %d instead: %s.", step, "; ".join(corrupt))
      self._warn_about_changes(step, saved_config, config, restored)
      return restored
    if corrupt:
      raise NoUsableCheckpoint(
          f"No checkpoint in {self.directory} could be restored: {'; '.join(corrupt)}. "
          "Rerun to train from step 0, or put an intact checkpoint back."
      )
    return state

  def _check_layout(self, step: int) -> None:
    """Orbax commits a step's items together, so a step without them is of another layout."""
    step_dir = os.path.join(self.directory, str(step))
    missing = [item for item in ITEMS if not os.path.isdir(os.path.join(step_dir, item))]
    if missing:
      raise CheckpointMismatch(
          f"The checkpoint of step {step} in {self.directory} has no {', '.join(missing)} "
          f"(expected items: {', '.join(ITEMS)}): it was written by an older adam_face or "
          "another program. Train in a new --workdir, or resume it with the version that wrote it."
      )

  def _check_shapes(self, step: int, state, rows: dict[str, int]) -> bool:
    """Raises CheckpointMismatch unless every stored array fits `state`; True when only the
    padding of class centres differs (the device count changed)."""
    stored = {
        m.name: tuple(m.shape)
        for m in jax.tree_util.tree_leaves(self._manager.item_metadata(step)["state"].tree)
    }
    wanted = {leaf_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(state)}
    repadded = False
    problems = [f"{name} is not in the checkpoint" for name in wanted if name not in stored]
    problems += [
        f"{name} is in the checkpoint but not in this model"
        for name in stored
        if name not in wanted
    ]
    for name, shape in wanted.items():
      old = stored.get(name)
      if old is None or old == shape:
        continue
      if name in rows and old[1:] == shape[1:] and old[0] >= rows[name]:
        repadded = True
        continue
      problems.append(f"{name} is stored as {old}, this config builds {shape}")
    if problems:
      raise CheckpointMismatch(
          f"The checkpoint of step {step} in {self.directory} does not fit this config: "
          f"{problems[0]}{f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''}. "
          "Resume with the config the run was started with (saved in the checkpoint's "
          "'config' item), or train the new config in a new --workdir."
      )
    return repadded

  def _restore_verified(self, step: int, state):
    rows = center_rows(state, state.heads)
    repadded = self._check_shapes(step, state, rows)
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(state, strict=not repadded),
            integrity=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(),
        ),
    )
    verify(restored["state"], restored["integrity"], where=f"step {step}")
    if repadded:
      logging.warning(
          "Step %d was saved on another device count: class centres re-padded to %d devices "
          "(training goes on as it would have, up to float rounding, not bit for bit).",
          step,
          state.mesh.size,
      )
    return restored["state"], restored["config"]

  def _set_aside(self, step: int, reason: str) -> str:
    """Moves a bad step out of the manager's sight (kept, never deleted); says where."""
    destination = os.path.join(self.workdir, "corrupt_checkpoints", str(step))
    if jax.process_index() == 0:
      suffix = 0
      while os.path.exists(destination + (f".{suffix}" if suffix else "")):
        suffix += 1
      destination += f".{suffix}" if suffix else ""
      os.makedirs(os.path.dirname(destination), exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), destination)
    multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
    self._manager.reload()
    message = f"the checkpoint of step {step} is corrupt ({reason}) and was moved to {destination}"
    logging.warning("%s.", message[0].upper() + message[1:])
    return message

  def _warn_about_changes(self, step: int, saved_config: dict, config, state) -> None:
    changes = config_lib.config_changes(saved_config, json.loads(config.to_json()))
    if not changes:
      return
    logging.warning(
        "Resuming step %d with a config that differs from the checkpoint's: %s. The new values "
        "apply from now on.",
        step,
        "; ".join(changes),
    )
    margin = saved_config.get("loss", {})
    auto_margin = config.loss.get("auto_margin") or {}
    if auto_margin.get("enabled") and margin.get("m") != config.loss.get("m"):
      held = [float(s["m"]) for s in state.margin_states if "m" in s]
      logging.warning(
          "loss.m changed from %s to %s, but the auto-margin keeps its own margin, restored from "
          "step %d (m = %s): loss.m is only its starting value, used by a fresh run (a new "
          "--workdir).",
          margin.get("m"),
          config.loss.m,
          step,
          ", ".join(f"{m:.4f}" for m in held),
      )


def verify(tree, integrity: dict[str, Any], *, where: str) -> None:
  """Raises ValueError unless every leaf of `tree` matches its stored fingerprint."""
  rows = {name: entry["rows"] for name, entry in integrity.items() if entry["rows"] is not None}
  fingerprints, _ = summarize(tree, rows)
  missing = sorted(set(integrity) - set(fingerprints))
  if missing:
    raise ValueError(f"{where}: {missing[0]} is missing from the restored arrays")
  bad = [
      name for name, fp in fingerprints.items() if integrity.get(name, {}).get("fingerprint") != fp
  ]
  if bad:
    raise ValueError(
        f"{where}: {len(bad)} of {len(fingerprints)} arrays do not match their fingerprints "
        f"(first: {bad[0]})"
    )


def restore_arrays(
    workdir: str, step: int | None = None, subtrees: Sequence[str] | None = None
) -> tuple[int, dict[str, Any]]:
  """(step, the state's arrays as nested dicts of numpy arrays), verified: for reading a
  checkpoint without building the TrainState (evaluation, embedding, init_from, tests), on any
  device count. Latest step by default.

  `subtrees`: the dotted names of the parts to read (("params.backbone", "batch_stats") for a
  backbone); only they are read from disk and verified, so reading a backbone never loads a
  WebFace42M-sized class-centre matrix and its optimiser state. Default: the whole state.
  """
  directory = checkpoint_directory(workdir)
  # The state as the tree orbax saved (PyTreeCheckpointHandler reads what StandardSave wrote),
  # so that a part of it can be read alone.
  manager = ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(read_only=True, create=False),
      item_handlers={
          "state": ocp.PyTreeCheckpointHandler(),
          "integrity": ocp.JsonCheckpointHandler(),
      },
  )
  try:
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
      raise FileNotFoundError(
          f"No checkpoint {f'at step {step} ' if step is not None else ''}in "
          f"{directory} (available: {list(manager.all_steps())})."
      )
    saved = manager.item_metadata(step)["state"].tree
    wanted = saved if subtrees is None else _subtrees(saved, subtrees, f"{directory} step {step}")
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item=wanted,
                restore_args=jax.tree.map(
                    lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted
                ),
                partial_restore=subtrees is not None,
            ),
            integrity=ocp.args.JsonRestore(),
        ),
    )
  finally:
    manager.close()
  integrity = restored["integrity"]
  if subtrees is not None:
    prefixes = tuple(f"{name}." for name in subtrees)
    integrity = {k: v for k, v in integrity.items() if k.startswith(prefixes)}
  verify(restored["state"], integrity, where=f"{directory} step {step}")
  return step, restored["state"]


def _subtrees(tree: dict[str, Any], names: Sequence[str], where: str) -> dict[str, Any]:
  """The parts of nested dict `tree` at the dotted `names`, in a tree of the same nesting."""
  selected: dict[str, Any] = {}
  for name in names:
    node, target = tree, selected
    keys = name.split(".")
    for key in keys:
      if not isinstance(node, dict) or key not in node:
        have = ", ".join(sorted(node)) if isinstance(node, dict) else "no parts"
        raise ValueError(f"{where}: the state has no {name!r} ({key!r} not among: {have}).")
      node = node[key]
    for key in keys[:-1]:
      target = target.setdefault(key, {})
    target[keys[-1]] = node
  return selected
