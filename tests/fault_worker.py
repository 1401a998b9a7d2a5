"""One training run in a process of its own, for tests/test_faults.py (not a test module itself).

Usage: python tests/fault_worker.py WORKDIR SPEC_JSON, where SPEC_JSON holds
  devices                 host-CPU devices of this process (the device count of the run),
  config                  {dotted field: value} overrides of tests/tiny_config.tiny_demo_config,
  crash_after_batches     (optional) the data iterator raises after this many batches,
  kill_when_committing    (optional) SIGKILL this process at the moment orbax would commit
                          (rename into place) the checkpoint of this step: written, not committed.
  read_only               (optional) do not train: read the latest checkpoint's arrays
                          (checkpointing.restore_arrays: the whole state, where evaluate and
                          embed read its backbone alone).
Prints one line "RESULT <json>": the step reached, or the step read and its arrays' shapes.
"""

import json
import os
import signal
import sys

from host_devices import force_host_devices  # This script's folder, tests/, is on sys.path.

workdir, spec = sys.argv[1], json.loads(sys.argv[2])
force_host_devices(spec["devices"])
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO_ROOT, os.path.join(REPO_ROOT, "tests")]

import jax  # noqa: E402
from orbax.checkpoint._src.path import atomicity  # noqa: E402

from adam_face import checkpointing, train, train_input  # noqa: E402
from tiny_config import tiny_demo_config  # noqa: E402

if spec.get("crash_after_batches") is not None:
  real_iterator = train_input.create_train_iterator

  def crashing_iterator(*args, **kwargs):
    iterator = real_iterator(*args, **kwargs)
    for _ in range(spec["crash_after_batches"]):
      yield next(iterator)
    raise RuntimeError("simulated crash")

  train_input.create_train_iterator = crashing_iterator

if spec.get("kill_when_committing") is not None:
  real_commit = atomicity.on_commit_callback

  async def commit_or_die(tmp_dir, **kwargs):
    if tmp_dir.get_final().name == str(spec["kill_when_committing"]):
      os.kill(os.getpid(), signal.SIGKILL)
    return await real_commit(tmp_dir, **kwargs)

  atomicity.on_commit_callback = commit_or_die

if spec.get("read_only"):
  step, state = checkpointing.restore_arrays(workdir)
  shapes = {
      checkpointing.leaf_name(path): list(x.shape)
      for path, x in jax.tree_util.tree_leaves_with_path(state)
  }
  print("RESULT " + json.dumps({"step": step, "shapes": shapes}), flush=True)
  sys.exit(0)

results = train.train_and_evaluate(tiny_demo_config(**spec["config"]), workdir)
print("RESULT " + json.dumps({"step": results["step"]}), flush=True)
