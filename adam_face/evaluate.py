"""Evaluates a trained model on verification sets, without training.

  python -m adam_face.evaluate --model=/tmp/run --sets=lfw,cfp_fp,agedb_30
  python -m adam_face.evaluate --model=/tmp/r50 --sets=/data/lfw.bin

--model is a training workdir (its latest checkpoint, or --step) or a model directory
(model_dir.py; e.g. converted from arcface_torch). A workdir's config gives the defaults of the
sets, data dir, batch size and flip mode; a model directory takes configs/default.py's and needs
--sets. Prints one row per set in the ADAM tables' format (acc / TAR@FAR=1e-1 / 1e-2 / 3e-3 /
1e-3, in %), plus HETD when lfw, cfp_fp and agedb_30 are all given, and writes
`eval_<step>.json` and `roc_<step>.png` (a model directory: `eval.json`, `roc.png`) beside the
model.
"""

import json
import os

from absl import app, flags, logging

FLAGS = flags.FLAGS


def evaluate_model(path: str, sets=None, step=None, data_dir=None, batch_size=None):
  """Scores the model at `path` on `sets`; returns (what was scored, the Evaluator's result)."""
  import ml_collections  # pylint: disable=g-import-not-at-top

  from adam_face import classifier, config_lib, model_dir  # pylint: disable=g-import-not-at-top
  from adam_face import report, train, verification  # pylint: disable=g-import-not-at-top

  model = model_dir.load(path, step)
  if model.train_config is not None:
    config = ml_collections.ConfigDict(model.train_config)
  else:
    if not sets:
      raise ValueError(f"{path} is a model directory: name the sets to score with --sets.")
    config = config_lib.default_config()
    config.dataset.image_size = model.image_size
  evaluator = verification.Evaluator(
      train.load_verification_sets(config, sets, data_dir),
      batch_size=batch_size or config.verification.batch_size,
      mesh=classifier.create_mesh(),
      flip=config.verification.flip,
  )
  result = evaluator(model.embed_fn)
  suffix = "" if model.step is None else f"_{model.step}"
  with open(os.path.join(path, f"eval{suffix}.json"), "w") as f:
    json.dump(
        {"model": model.source, "metrics": result.metrics}, f, indent=2, default=train.json_default
    )
  report.plot_roc(result.curves, os.path.join(path, f"roc{suffix}.png"))
  logging.info("Evaluated %s.", model.source)
  return model.source, result


def _define_flags() -> None:
  flags.DEFINE_list("sets", None, "Verification sets; default: the workdir config's.")
  flags.DEFINE_string("data_dir", None, "TFDS data dir of the sets; default: the config's.")
  flags.DEFINE_integer("batch_size", None, "Embedding batch size; default: the config's.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from adam_face import report  # pylint: disable=g-import-not-at-top

  source, result = evaluate_model(
      FLAGS.model, FLAGS.sets, FLAGS.step, FLAGS.data_dir, FLAGS.batch_size
  )
  print(source)
  print(report.format_table(result.metrics))


if __name__ == "__main__":
  from adam_face import model_dir  # pylint: disable=g-import-not-at-top

  model_dir.define_model_flags()
  _define_flags()
  app.run(main)
