"""Compares two face photos with a trained model: their cosine score and a same / different call.

  python -m adam_face.verify --model=/tmp/run --threshold_from=/tmp/run/results.json a.jpg b.jpg
  python -m adam_face.verify --model=/tmp/run --threshold_from=... --set=lfw --far=1e-2 a.jpg b.jpg
  python -m adam_face.verify --model=/tmp/r50 --threshold=0.3 a.jpg b.jpg

The two images are read and embedded exactly as adam_face.embed reads and embeds them, with the
same --model, --step, --landmarks, --resize, --faces and --flip flags (its docstring says which
images are usable: aligned crops, and photos aligned by their landmarks or by the face detector's).
The score is the cosine similarity of the two embeddings (verification_metrics.pair_scores) and
the pair is "same" when score > threshold, the convention of verification_metrics.

The threshold is --threshold, or is read --threshold_from a verification run's results: training's
results.json or `python -m adam_face.evaluate`'s eval*.json, whose metrics hold for each set the
'threshold@far=<FAR>' at which at most that fraction of the set's impostor pairs is accepted.
--set picks the set (default: the only one there) and --far the rate (default 1e-3). A threshold
holds only for the model and flip mode it was found with: the flip mode is then the one recorded
in the config.json beside the results file (a training workdir's verification.flip; --flip may
only repeat it); where none is (a model directory's eval.json), --flip, whose default, sum, is
the one `evaluate` scores a model directory with.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging

from adam_face import embed
from adam_face import errors
from adam_face import model_dir
from adam_face import verification_metrics

FLAGS = flags.FLAGS


def threshold_from_results(path: str, set_name: str | None, far: float) -> tuple[float, str]:
  """(the threshold at `far` of `set_name` in a results file, the set's name)."""
  if not os.path.isfile(path):
    raise errors.RunError(f"--threshold_from={path}: no such file.")
  with open(path) as f:
    metrics = json.load(f).get("metrics")
  if not isinstance(metrics, dict) or not metrics:
    raise errors.RunError(
        f"{path} holds no verification metrics; pass training's results.json or the eval*.json "
        "of python -m adam_face.evaluate."
    )
  if set_name is None:
    if len(metrics) > 1:
      raise errors.RunError(f"{path} holds the sets {', '.join(metrics)}: pick one with --set.")
    (set_name,) = metrics
  if set_name not in metrics:
    raise errors.RunError(f"{path} has no set {set_name!r}; it holds {', '.join(metrics)}.")
  key = f"threshold@far={verification_metrics.far_label(far)}"
  if key not in metrics[set_name]:
    known = [k.removeprefix("threshold@far=") for k in metrics[set_name] if "threshold@far=" in k]
    raise errors.RunError(
        f"{path}: set {set_name} has no threshold at FAR={verification_metrics.far_label(far)}; "
        f"pass one of {', '.join(known)} with --far."
    )
  return float(metrics[set_name][key]), set_name


def verify_pair(
    model_path: str,
    image_a: str,
    image_b: str,
    *,
    step: int | None = None,
    threshold: float | None = None,
    threshold_from: str | None = None,
    set_name: str | None = None,
    far: float = 1e-3,
    flip: str | None = None,
    landmarks_path: str | None = None,
    resize: bool = False,
    faces: str = "largest",
) -> dict:
  """What `python -m adam_face.verify` does (see the module docstring).

  Returns:
    {'score': the cosine score, 'threshold', 'same': score > threshold, 'flip': the flip mode
    used, 'threshold_source': where the threshold came from, in words}.
  """
  if (threshold is None) == (threshold_from is None):
    raise errors.RunError("give either --threshold or --threshold_from (with --set and --far).")
  if threshold is None:
    threshold, set_name = threshold_from_results(threshold_from, set_name, far)
    source = f"{set_name} at FAR={verification_metrics.far_label(far)} in {threshold_from}"
    results_dir = os.path.dirname(os.path.abspath(threshold_from))
    recorded = embed.recorded_flip(results_dir)
    if recorded and flip and flip != recorded:
      raise errors.RunError(
          f"--flip={flip}, but the threshold in {threshold_from} was found with flip {recorded} "
          f"(its config.json); drop --flip or pass --flip={recorded}."
      )
    flip = recorded or flip
    if results_dir != os.path.abspath(model_path):
      logging.warning(
          "The threshold comes from %s, not from beside the model %s: it holds only for the "
          "model it was found with.",
          threshold_from,
          model_path,
      )
  else:
    source = "--threshold"
  model = embed.load_model(model_path, step)
  flip = flip or embed.recorded_flip(model_path) or "sum"
  embeddings, _, _ = embed.embed_images(
      model,
      [image_a, image_b],
      flip=flip,
      landmarks=embed.read_landmarks(landmarks_path) if landmarks_path else None,
      resize=resize,
      faces=faces,
  )
  score = float(verification_metrics.pair_scores(embeddings[:1], embeddings[1:])[0])
  return {
      "score": score,
      "threshold": threshold,
      "same": score > threshold,
      "flip": flip,
      "threshold_source": source,
  }


def define_verify_flags() -> None:
  flags.DEFINE_float("threshold", None, "Accept the pair as the same person above this score.")
  flags.DEFINE_string(
      "threshold_from", None, "A verification run's results.json or eval*.json to read it from."
  )
  flags.DEFINE_string("set", None, "The set of --threshold_from; default: its only one.")
  flags.DEFINE_float("far", 1e-3, "The false accept rate of the --threshold_from threshold.")


def main(argv):
  if len(argv) != 3:
    raise app.UsageError(f"Give the two images to compare; got {argv[1:]}.")
  try:
    result = verify_pair(
        FLAGS.model,
        argv[1],
        argv[2],
        step=FLAGS.step,
        threshold=FLAGS.threshold,
        threshold_from=FLAGS.threshold_from,
        set_name=FLAGS.set,
        far=FLAGS.far,
        flip=FLAGS.flip,
        landmarks_path=FLAGS.landmarks,
        resize=FLAGS.resize,
        faces=FLAGS.faces,
    )
  except errors.RunError as e:
    sys.exit(f"FATAL: {e}")
  print(f"score {result['score']:.4f}")
  print(
      f"{'same' if result['same'] else 'different'} (threshold {result['threshold']:.4f}: "
      f"{result['threshold_source']}; flip {result['flip']})"
  )


if __name__ == "__main__":
  model_dir.define_model_flags()
  embed.define_image_flags()  # Images are read as embed reads them.
  define_verify_flags()
  app.run(main)
