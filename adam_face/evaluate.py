"""Evaluates a saved checkpoint on verification sets, without training.

  python -m adam_face.evaluate --workdir=/tmp/run --sets=lfw,cfp_fp,agedb_30

Prints one row per set in the ADAM tables' format (acc / TAR@FAR=1e-1 / 1e-2 / 3e-3 / 1e-3, in %),
plus HETD when lfw, cfp_fp and agedb_30 are all given, and writes `eval_<step>.json` and
`roc_<step>.png` into the workdir. The model is rebuilt from the `config.json` training wrote there.
"""

import json
import os

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training workdir (holds config.json and checkpoints/).")
flags.DEFINE_list("sets", None, "Verification sets; default: the config's verification.sets.")
flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
flags.DEFINE_string("data_dir", None, "TFDS data dir of the sets; default: the config's.")
flags.DEFINE_integer("batch_size", None, "Embedding batch size; default: the config's.")
flags.mark_flags_as_required(["workdir"])


def evaluate_checkpoint(workdir: str, sets=None, step=None, data_dir=None, batch_size=None):
  """Restores the backbone at `step` (latest if None) and scores `sets`; returns the result."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top

  from adam_face import checkpointing, classifier, models, train  # pylint: disable=g-import-not-at-top
  from adam_face import report, verification  # pylint: disable=g-import-not-at-top

  config_path = os.path.join(workdir, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(
        f"{config_path} not found: --workdir must be a directory written by "
        "python -m adam_face.main."
    )
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  step, state = checkpointing.restore_arrays(workdir, step)

  model = models.create_model(
      config.model.name,
      embedding_dim=config.model.embedding_dim,
      dtype=jnp.dtype(config.compute_dtype),
      dropout_rate=config.model.dropout_rate,
  )
  variables = {"params": state["params"]["backbone"], "batch_stats": state["batch_stats"]}
  embed_fn = jax.tree_util.Partial(lambda v, x: model.apply(v, x, train=False), variables)
  loaded = train.load_verification_sets(config, sets, data_dir)
  mesh = classifier.create_mesh()
  evaluator = verification.Evaluator(
      loaded,
      batch_size=batch_size or config.verification.batch_size,
      mesh=mesh,
      flip=config.verification.flip,
  )
  result = evaluator(embed_fn)
  with open(os.path.join(workdir, f"eval_{step}.json"), "w") as f:
    json.dump({"step": step, "metrics": result.metrics}, f, indent=2, default=train.json_default)
  report.plot_roc(result.curves, os.path.join(workdir, f"roc_{step}.png"))
  logging.info("Evaluated step %d of %s.", step, workdir)
  return step, result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from adam_face import report  # pylint: disable=g-import-not-at-top

  step, result = evaluate_checkpoint(
      FLAGS.workdir, FLAGS.sets, FLAGS.step, FLAGS.data_dir, FLAGS.batch_size
  )
  print(f"step {step}")
  print(report.format_table(result.metrics))


if __name__ == "__main__":
  app.run(main)
