"""Evaluates a trained model on verification sets, without training.

  python -m adam_face.evaluate --model=/tmp/run --sets=lfw,cfp_fp,agedb_30
  python -m adam_face.evaluate --model=/tmp/r50 --sets=/data/lfw.bin
  python -m adam_face.evaluate --model=/tmp/r50 --sets=lfw,cfp_fp,agedb_30,ijbc --ijb_root=/data/IJB

--model is a training workdir (its latest checkpoint, or --step) or a model directory
(model_dir.py; e.g. converted from arcface_torch). A workdir's config gives the defaults of the
sets, data dir, batch size and flip mode; a model directory takes configs/default.py's and needs
--sets. Prints one row per set in the ADAM tables' format (acc / TAR@FAR=1e-1 / 1e-2 / 3e-3 /
1e-3, in %), plus HETD when lfw, cfp_fp and agedb_30 are all given, the IJB sets' rows (ijbb,
ijbc: TAR@FAR=1e-6 ... 1e-1 of the 1:1 protocol; ijbb_1n, ijbc_1n: rank-1/5/10 and TPIR@FPIR,
the mean of the two galleries; adam_face/ijb.py) under their own headers, and writes
`eval_<step>.json` and `roc_<step>.png` (a model directory: `eval.json`, `roc.png`) beside the
model.
"""

import json
import os

from absl import app, flags, logging

FLAGS = flags.FLAGS


def evaluate_model(
    path: str, sets=None, step=None, data_dir=None, batch_size=None, ijb_root=None, ijb_cache=None
):
  """Scores the model at `path` on `sets`; returns (what was scored, the evaluators' result)."""
  import ml_collections  # pylint: disable=g-import-not-at-top

  from adam_face import classifier, config_lib, ijb, model_dir  # pylint: disable=g-import-not-at-top
  from adam_face import report, train, verification  # pylint: disable=g-import-not-at-top
  from datasets import ijb as ijb_layout  # pylint: disable=g-import-not-at-top

  model = model_dir.load(path, step)
  if model.train_config is not None:
    config = ml_collections.ConfigDict(model.train_config)
  else:
    if not sets:
      raise ValueError(f"{path} is a model directory: name the sets to score with --sets.")
    config = config_lib.default_config()
    config.dataset.image_size = model.image_size
  sets = list(sets or config.verification.sets)
  ijb_sets = [name for name in sets if name in ijb_layout.IJB_SETS]
  pair_sets = [name for name in sets if name not in ijb_layout.IJB_SETS]
  batch_size = batch_size or config.verification.batch_size
  mesh = classifier.create_mesh()
  evaluators = []
  if pair_sets:
    evaluators.append(
        verification.Evaluator(
            train.load_verification_sets(config, pair_sets, data_dir),
            batch_size=batch_size,
            mesh=mesh,
            flip=config.verification.flip,
        )
    )
  if ijb_sets:
    defaults = config_lib.default_config().verification.ijb
    options = dict(defaults, **config.verification.get("ijb", {}))
    evaluators.append(
        ijb.IJBEvaluator(
            ijb_sets,
            ijb.IJBOptions(
                root=ijb_root or options["root"],
                cache_dir=ijb_cache or options["cache_dir"],
                detector_score=options["detector_score"],
                norm_score=options["norm_score"],
            ),
            image_size=model.image_size,
            batch_size=batch_size,
            mesh=mesh,
            flip=config.verification.flip,
        )
    )
  results = [evaluator(model.embed_fn) for evaluator in evaluators]
  result = verification.EvaluationResult(
      metrics={k: v for r in results for k, v in r.metrics.items()},
      curves={k: v for r in results for k, v in r.curves.items()},
  )
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
  flags.DEFINE_string("ijb_root", None, "Folder of IJBB/, IJBC/; default: verification.ijb.root.")
  flags.DEFINE_string(
      "ijb_cache", None, "Cache of the aligned IJB faces; default: verification.ijb.cache_dir."
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from adam_face import report  # pylint: disable=g-import-not-at-top

  source, result = evaluate_model(
      FLAGS.model,
      FLAGS.sets,
      FLAGS.step,
      FLAGS.data_dir,
      FLAGS.batch_size,
      FLAGS.ijb_root,
      FLAGS.ijb_cache,
  )
  print(source)
  print(report.format_table(result.metrics))


if __name__ == "__main__":
  from adam_face import model_dir  # pylint: disable=g-import-not-at-top

  model_dir.define_model_flags()
  _define_flags()
  app.run(main)
