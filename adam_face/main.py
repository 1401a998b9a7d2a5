"""Entry point: `python -m adam_face.main --config=configs/vggface2_adm.py --workdir=/tmp/run`.

Config fields can be overridden on the command line (`--config.loss.s=30`). Launched on several
hosts (one process per host, e.g. on a TPU pod or a Slurm/GPU cluster), it joins JAX's own
distributed runtime first; every process then feeds its share of the global batch.
"""

import ast
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from adam_face import host_memory

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard events, results.json and roc.png.")
flags.DEFINE_bool(
    "multihost",
    None,
    "Call jax.distributed.initialize() (auto-detects TPU pods, Slurm, Open MPI). "
    "Default: only when JAX_COORDINATOR_ADDRESS or a cluster environment is set.",
)
config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])

_CLUSTER_VARIABLES = (
    "JAX_COORDINATOR_ADDRESS",
    "SLURM_JOB_ID",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_WORKER_HOSTNAMES",
)


def parse_flags(argv):
  """absl's flag parsing, plus: a --config.<field> override that names no field of the config is
  a one-line error naming the valid ones, and overrides that add keys to an open dictionary
  (dataset.builder_kwargs) are applied as new keys (value as a Python literal, else a string)."""
  from adam_face import config_lib  # pylint: disable=g-import-not-at-top

  spec, overrides = config_lib.command_line_overrides(argv[1:])
  new_keys = []
  if spec:
    try:
      config = config_lib.load_config_file(spec)
      new_keys = [
          (path, value) for path, value in overrides if config_lib.check_override(config, path)
      ]
    except ValueError as e:
      sys.exit(f"FATAL Flags parsing error: {e}")
  new_flags = {f"--config.{path}" for path, _ in new_keys}
  kept, skip = [], False
  for arg in argv:  # The new keys' arguments, in either form, go past absl.
    name, equals, _ = arg.partition("=")
    if skip or name in new_flags:
      skip = name in new_flags and not equals
      continue
    kept.append(arg)
  sys.argv[:] = kept  # config_flags reads its overrides from sys.argv.
  remaining = app.parse_flags_with_usage(kept)
  with FLAGS.config.unlocked():
    for path, value in new_keys:
      try:
        value = ast.literal_eval(value)
      except (ValueError, SyntaxError):
        pass  # Not a Python literal: the string itself.
      config_lib.set_field(FLAGS.config, path, value)
  return remaining


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  import jax  # pylint: disable=g-import-not-at-top

  multihost = FLAGS.multihost
  if multihost is None:
    multihost = any(os.environ.get(v) for v in _CLUSTER_VARIABLES)
  if multihost:
    # Cross-process collectives of the CPU backend (GPU and TPU bring their own).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize()
  from adam_face import errors, train  # pylint: disable=g-import-not-at-top

  logging.info(
      "JAX process %d of %d, local devices: %s",
      jax.process_index(),
      jax.process_count(),
      jax.local_devices(),
  )
  logging.info("Config:\n%s", FLAGS.config)
  os.makedirs(FLAGS.workdir, exist_ok=True)
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except errors.RunError as e:  # Diverged, checkpoint unwritable or unusable: one line, status 1.
    logging.error("%s", e)
    sys.exit(f"FATAL: {e}")


if __name__ == "__main__":
  host_memory.restart_with_huge_pages()  # Before JAX allocates anything; see host_memory.
  app.run(main, flags_parser=parse_flags)
