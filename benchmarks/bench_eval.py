"""Benchmark: exact verification metrics against the classic grid-scan protocol.

The classic protocol (as in insightface's verification.py, re-implemented here from its
description) scores pairs by squared L2 distance of normalised embeddings, scans thresholds
0, 0.01, ..., 3.99 in Python, picks the accuracy threshold per fold of 10 (KFold over consecutive
pairs, first best grid point), and sets TAR@FAR per fold by interpolating the training folds' FAR
curve on the same grid and averaging the held-out TARs. adam_face.verification_metrics instead
cuts at exact scores after a single sort (accuracy per fold; TAR@FAR pooled over all pairs).

Both run on the same synthetic 512-d embeddings: genuine pairs are two noisy views of one random
centre with a per-pair noise level, so the genuine and impostor scores overlap; impostor pairs
are independent. The embeddings are generated and scored in chunks so 10^6 pairs fit in memory.

  python -m benchmarks.bench_eval [--pairs 6000,1000000] [--out /tmp]   # from the repo root
"""

import argparse
import json
import os
import platform
import time

import numpy as np

from adam_face import verification_metrics

FARS = verification_metrics.DEFAULT_FARS
_CHUNK = 50_000


def synthetic_pairs(num_pairs, dim, seed):
  """Yields (emb_a, emb_b, is_same) chunks of float32 embeddings, deterministic given seed."""
  rng = np.random.default_rng(seed)
  for start in range(0, num_pairs, _CHUNK):
    size = min(_CHUNK, num_pairs - start)
    is_same = rng.random(size) < 0.5
    emb_a = rng.standard_normal((size, dim), dtype=np.float32)
    emb_b = rng.standard_normal((size, dim), dtype=np.float32)
    # Genuine pairs: a shared centre plus noise of scale 0.5 .. 4 (cosine about 0.8 .. 0.06).
    noise = rng.uniform(0.5, 4.0, size).astype(np.float32)[:, None]
    centre = rng.standard_normal((size, dim), dtype=np.float32)
    emb_a = np.where(is_same[:, None], centre + noise * emb_a, emb_a)
    emb_b = np.where(is_same[:, None], centre + noise * emb_b, emb_b)
    yield emb_a, emb_b, is_same


def squared_distances(emb_a, emb_b):
  """The classic score: squared L2 distance of L2-normalised embeddings, in [0, 4]."""
  emb_a = emb_a / np.linalg.norm(emb_a, axis=1, keepdims=True)
  emb_b = emb_b / np.linalg.norm(emb_b, axis=1, keepdims=True)
  return np.sum(np.square(emb_a - emb_b), axis=1)


def grid_scan_protocol(distances, is_same, num_folds=10, fars=FARS):
  """The classic protocol: pairs accepted when distance < t, t on a 0.01 grid over [0, 4)."""
  thresholds = np.arange(0, 4, 0.01)
  fold = verification_metrics.consecutive_folds(len(distances), num_folds)
  accuracies, tars = [], {far: [] for far in fars}
  for k in range(num_folds):
    train, test = fold != k, fold == k
    train_dist, train_same = distances[train], is_same[train]
    test_dist, test_same = distances[test], is_same[test]
    train_accuracy = np.empty(len(thresholds))
    train_far = np.empty(len(thresholds))
    num_train_impostors = max(np.count_nonzero(~train_same), 1)
    for i, threshold in enumerate(thresholds):
      accepted = train_dist < threshold
      train_accuracy[i] = np.mean(accepted == train_same)
      train_far[i] = np.count_nonzero(accepted & ~train_same) / num_train_impostors
    best = thresholds[np.argmax(train_accuracy)]
    accuracies.append(np.mean((test_dist < best) == test_same))
    num_test_genuine = max(np.count_nonzero(test_same), 1)
    for far in fars:
      # Threshold where the training FAR reaches the target, interpolated between grid points.
      threshold = np.interp(far, train_far, thresholds) if train_far.max() >= far else 0.0
      tars[far].append(np.count_nonzero((test_dist < threshold) & test_same) / num_test_genuine)
  metrics = {"accuracy": float(np.mean(accuracies)), "accuracy_std": float(np.std(accuracies))}
  for far in fars:
    metrics[f"tar@far={verification_metrics.far_label(far)}"] = float(np.mean(tars[far]))
  return metrics


def run(num_pairs, dim, grid_max_pairs, seed):
  scores, distances, labels = [], [], []
  exact_score_s = grid_score_s = 0.0
  for emb_a, emb_b, is_same in synthetic_pairs(num_pairs, dim, seed):
    start = time.perf_counter()
    scores.append(verification_metrics.pair_scores(emb_a, emb_b))
    exact_score_s += time.perf_counter() - start
    start = time.perf_counter()
    distances.append(squared_distances(emb_a, emb_b))
    grid_score_s += time.perf_counter() - start
    labels.append(is_same)
  scores, distances, is_same = map(np.concatenate, (scores, distances, labels))

  start = time.perf_counter()
  exact = verification_metrics.verification_metrics_from_scores(
      scores, is_same, folds=10, fars=FARS
  )
  exact_metrics_s = time.perf_counter() - start

  grid_pairs = min(num_pairs, grid_max_pairs)
  start = time.perf_counter()
  grid = grid_scan_protocol(distances[:grid_pairs], is_same[:grid_pairs])
  grid_metrics_s = time.perf_counter() - start
  if grid_pairs < num_pairs:
    # Compare numbers on the same pairs; time the exact path on all of them.
    exact_on_grid_pairs = verification_metrics.verification_metrics_from_scores(
        scores[:grid_pairs], is_same[:grid_pairs], folds=10, fars=FARS
    )
  else:
    exact_on_grid_pairs = exact
  keys = ["accuracy", "accuracy_std"] + [
      f"tar@far={verification_metrics.far_label(f)}" for f in FARS
  ]
  return {
      "pairs": num_pairs,
      "dim": dim,
      "grid_pairs": grid_pairs,
      "exact": {
          "score_s": exact_score_s,
          "metrics_s": exact_metrics_s,
          **{key: exact_on_grid_pairs[key] for key in keys},
      },
      "grid": {
          "score_s": grid_score_s,
          "metrics_s": grid_metrics_s,
          **{key: grid[key] for key in keys},
      },
      # Per pair, so the ratios stay meaningful when the grid scan ran on a subset.
      "metrics_time_ratio_grid_over_exact": (grid_metrics_s / grid_pairs)
      / (exact_metrics_s / num_pairs),
      "total_time_ratio_grid_over_exact": (grid_score_s / num_pairs + grid_metrics_s / grid_pairs)
      / ((exact_score_s + exact_metrics_s) / num_pairs),
  }


def print_table(results):
  labels = [verification_metrics.far_label(far) for far in FARS]
  print(
      f"{'pairs':>8} {'method':<10} {'scores s':>9} {'metrics s':>10}  "
      f"acc% (std) / TAR%@FAR=" + " / ".join(labels)
  )
  for result in results:
    for method in ("exact", "grid"):
      row = result[method]
      numbers = f"{100 * row['accuracy']:.2f} ({100 * row['accuracy_std']:.2f}) / " + " / ".join(
          f"{100 * row[f'tar@far={label}']:.2f}" for label in labels
      )
      note = ""
      if result["grid_pairs"] < result["pairs"]:
        note = (
            f"   (metrics of both on the first {result['grid_pairs']} pairs; "
            + ("exact timed on all" if method == "exact" else "grid timed on those")
            + ")"
        )
      print(
          f"{result['pairs']:>8} {method:<10} {row['score_s']:>9.3f} {row['metrics_s']:>10.3f}"
          f"  {numbers}{note}"
      )
    print(
        f"{'':>8} grid/exact time per pair: metrics "
        f"{result['metrics_time_ratio_grid_over_exact']:.1f}x, scores+metrics "
        f"{result['total_time_ratio_grid_over_exact']:.1f}x"
    )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
      "--pairs", default="6000,1000000", help="comma-separated numbers of pairs to benchmark"
  )
  parser.add_argument("--dim", type=int, default=512, help="embedding size")
  parser.add_argument(
      "--grid-max-pairs",
      type=int,
      default=1_000_000,
      help="run the (slow) grid scan on at most this many leading pairs",
  )
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="/tmp", help="folder for bench_eval.json")
  args = parser.parse_args()

  results = [run(int(n), args.dim, args.grid_max_pairs, args.seed) for n in args.pairs.split(",")]
  print_table(results)
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "bench_eval.json")
  with open(path, "w") as f:
    json.dump(
        {
            "machine": {
                "cpu_count": os.cpu_count(),
                "python": platform.python_version(),
                "numpy": np.__version__,
            },
            "results": results,
        },
        f,
        indent=2,
    )
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
