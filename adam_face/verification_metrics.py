"""Exact pair-verification metrics from scores (numpy only): accuracy, TAR@FAR, ROC, HETD.

Conventions (exact; no threshold grid anywhere):

* Score: cosine similarity of the two L2-normalised embeddings of a pair. A pair is *accepted*
  (predicted "same person") when ``score > threshold``. Thresholds are only ever placed so that a
  cut never separates equal scores: all pairs with the same score land on the same side.
* Accuracy: the standard 10-fold protocol. Folds are consecutive blocks of pairs, as in the
  published LFW / CFP / AgeDB lists (sizes as ``np.array_split``: the first ``N % k`` folds hold one
  pair more), or an explicit per-pair fold array. For each fold, the threshold is learnt on the
  other folds: every distinct training score is a candidate cut (plus "accept all"), training
  accuracy comes from sorted cumulative counts, and among cuts of equal training accuracy the
  highest (strictest) wins. The threshold is the midpoint between the highest rejected and the
  lowest accepted training score (-inf when every training pair is accepted, +inf when none is).
  The reported accuracy is the mean over folds of the held-out accuracy, with the population
  standard deviation (ddof=0), as in insightface's verification.py.
* TAR@FAR: pooled over all pairs, not per fold. With I impostor pairs and k = floor(FAR * I)
  (FAR read as the decimal it is written as, so 1e-3 * 6000 is exactly 6), the threshold is the
  (k+1)-th highest impostor score: the smallest threshold with at most k impostors strictly above
  it. Ties at that score are rejected, so the achieved FAR may be below the target; it is
  reported. TAR is the fraction of genuine pairs scoring strictly above the threshold. If k >= I
  the threshold is -inf (everything accepted).
* ROC: one point per distinct score used as a cut, from (0, 0) to (1, 1). AUC is the area under
  that polygon, which equals the Mann-Whitney statistic with ties counted one half. EER is where
  the polygon crosses FAR = 1 - TAR (linear interpolation along the segment that crosses it).
* HETD (hard-examples test dataset): LFW, CFP-FP and AgeDB-30 (HETD_MEMBERS) pooled into one set
  of 9,500 genuine and 9,500 impostor pairs, fold k of the pool being fold k of every member,
  scored with FARs (1e-1, 1e-2, 1e-3, 3e-4) (HETD_FARS).

Everything after the scores costs one (unstable) sort of the scores, O(N) per fold (a segmented
maximum over that one sorted order; no per-fold re-sort or copy) and O(N) for the rest: about
0.2-0.3 s for 10^6 pairs and 10 folds on one CPU core, 30-50x less than the classic 400-point
grid scan (benchmarks/bench_eval.py).
"""

from __future__ import annotations

import dataclasses
import fractions
import math
from collections.abc import Mapping, Sequence

import numpy as np

DEFAULT_FARS = (1e-1, 1e-2, 3e-3, 1e-3)
HETD_FARS = (1e-1, 1e-2, 1e-3, 3e-4)
HETD_MEMBERS = ("lfw", "cfp_fp", "agedb_30")
HETD_NAME = "hetd"

# Bytes of each embedding block pair_scores reads at a time: a pair of blocks fits in L2 cache.
_SCORE_BLOCK_BYTES = 1 << 18


def pair_scores(emb_a: np.ndarray, emb_b: np.ndarray) -> np.ndarray:
  """Cosine similarity of each pair of rows, float32 [N]; the embeddings need not be normalised.

  Dot products are taken in float64 for float64 embeddings (so the scores are the exact cosines
  rounded once) and in float32 otherwise.
  """
  emb_a, emb_b = np.asarray(emb_a), np.asarray(emb_b)
  if emb_a.ndim != 2 or emb_a.shape != emb_b.shape:
    raise ValueError(
        f"emb_a and emb_b must both be [N, D] with the same shape; got "
        f"{emb_a.shape} and {emb_b.shape}."
    )
  dtype = np.float64 if np.result_type(emb_a, emb_b) == np.float64 else np.float32
  num_pairs, dim = emb_a.shape
  dots, squares_a, squares_b = (np.empty(num_pairs, dtype) for _ in range(3))
  # Blocks small enough to stay in cache while the three row-wise dot products (BLAS, through
  # np.vecdot) read them, so the embeddings stream from memory once.
  rows = max(1, _SCORE_BLOCK_BYTES // (np.dtype(dtype).itemsize * max(dim, 1)))
  for start in range(0, num_pairs, rows):
    block = slice(start, start + rows)
    a = emb_a[block].astype(dtype, copy=False)
    b = emb_b[block].astype(dtype, copy=False)
    np.vecdot(a, b, out=dots[block])
    np.vecdot(a, a, out=squares_a[block])
    np.vecdot(b, b, out=squares_b[block])
  norms = np.sqrt(squares_a) * np.sqrt(squares_b)
  bad = np.flatnonzero(~(np.isfinite(norms) & (norms > 0)))
  if bad.size:
    raise ValueError(
        f"pair {bad[0]} has an embedding of zero or non-finite norm, so its cosine "
        "score is undefined."
    )
  return (dots / norms).astype(np.float32, copy=False)


def consecutive_folds(num_pairs: int, num_folds: int = 10) -> np.ndarray:
  """Fold id of each pair for folds of consecutive pairs, int32 [num_pairs].

  Sizes as np.array_split: the first num_pairs % num_folds folds hold one pair more. With fewer
  pairs than folds the last folds are empty; datasets/face_verification.py numbers even a tiny
  .bin so, and the metrics themselves require 2 <= num_folds <= num_pairs.
  """
  if num_folds < 1 or num_pairs < 0:
    raise ValueError(
        f"num_folds={num_folds} must be positive and num_pairs={num_pairs} non-negative."
    )
  sizes = np.full(num_folds, num_pairs // num_folds)
  sizes[: num_pairs % num_folds] += 1
  return np.repeat(np.arange(num_folds, dtype=np.int32), sizes)


def best_accuracy_threshold(scores: np.ndarray, is_same: np.ndarray) -> tuple[float, float]:
  """Threshold maximising accuracy on these pairs (exact; module conventions) and that accuracy."""
  return _best_cut(_RankedPairs.of(*_checked_scores(scores, is_same)))


def roc_curve(scores: np.ndarray, is_same: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(far, tar, thresholds): one point per distinct score as a cut, FAR ascending.

  Point i accepts pairs with score > thresholds[i]; the first point is (0, 0) at the highest
  score, the last is (1, 1) at -inf.
  """
  ranked = _RankedPairs.of(*_checked_scores(scores, is_same, need_both_classes=True))
  far, tar = _roc(ranked)
  thresholds = np.append(ranked.scores[ranked.cuts[:0:-1] - 1].astype(np.float64), -np.inf)
  return far, tar, thresholds


def verification_metrics_from_scores(
    scores: np.ndarray,
    is_same: np.ndarray,
    folds: int | np.ndarray = 10,
    fars: Sequence[float] = DEFAULT_FARS,
) -> dict:
  """Verification metrics of pair scores under the module's conventions.

  Args:
    scores: float [N], higher meaning more alike (cosine similarity for embeddings).
    is_same: bool [N] (or 0/1), True for genuine pairs.
    folds: number of folds of consecutive pairs, or an int fold id per pair.
    fars: false-accept rates at which to report the TAR (pooled over all pairs).

  Returns:
    dict with float entries 'accuracy' (mean held-out accuracy over folds), 'accuracy_std',
    'tar@far=<far>', 'threshold@far=<far>', 'far@far=<far>' (achieved FAR) for each far, 'auc',
    'eer', 'best_threshold' (the accuracy-maximising threshold over all pairs) and 'num_genuine',
    'num_impostor' (ints), and arrays 'fold_accuracy', 'fold_threshold'. Rates are fractions.
  """
  scores, is_same = _checked_scores(scores, is_same, need_both_classes=True)
  fold_codes = _checked_folds(folds, len(scores))
  fars = checked_fars(fars)
  ranked = _RankedPairs.of(scores, is_same)
  fold_threshold, fold_accuracy = _cross_validated_cuts(ranked, fold_codes[ranked.order])

  metrics = {
      "accuracy": float(np.mean(fold_accuracy)),
      "accuracy_std": float(np.std(fold_accuracy)),
  }
  num_genuine, num_impostor = ranked.num_genuine, ranked.num_pairs - ranked.num_genuine
  impostor_scores = ranked.scores[~ranked.is_same]
  for far in fars:
    label = far_label(far)
    threshold, achieved_far = far_threshold(impostor_scores, far)
    cut = np.searchsorted(ranked.scores, threshold, side="right")  # Ties at it are rejected.
    metrics[f"tar@far={label}"] = float((num_genuine - ranked.rejected_genuine[cut]) / num_genuine)
    metrics[f"far@far={label}"] = achieved_far
    metrics[f"threshold@far={label}"] = threshold
  roc_far, roc_tar = _roc(ranked)
  metrics["auc"] = area_under_roc(roc_far, roc_tar)
  metrics["eer"] = equal_error_rate(roc_far, roc_tar)
  metrics["best_threshold"] = _best_cut(ranked)[0]
  metrics["num_genuine"] = num_genuine
  metrics["num_impostor"] = num_impostor
  metrics["fold_accuracy"] = fold_accuracy
  metrics["fold_threshold"] = fold_threshold
  return metrics


def verification_metrics(
    emb_a: np.ndarray,
    emb_b: np.ndarray,
    is_same: np.ndarray,
    folds: int | np.ndarray = 10,
    fars: Sequence[float] = DEFAULT_FARS,
) -> dict:
  """verification_metrics_from_scores of the cosine scores of embedding pairs [N, D] x [N, D]."""
  return verification_metrics_from_scores(pair_scores(emb_a, emb_b), is_same, folds, fars)


def pool_scores(parts: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Concatenates several sets' {'scores', 'is_same', 'fold'} into one; fold k stays fold k."""
  if not parts:
    raise ValueError("pool_scores needs at least one set of scores.")
  pooled = {}
  for key in ("scores", "is_same", "fold"):
    missing = [name for name, part in parts.items() if key not in part]
    if missing:
      raise ValueError(f"sets {missing} lack {key!r}; each needs 'scores', 'is_same' and 'fold'.")
    pooled[key] = np.concatenate([np.asarray(part[key]) for part in parts.values()])
  return pooled


def hetd_metrics(
    parts: Mapping[str, Mapping[str, np.ndarray]], fars: Sequence[float] = HETD_FARS
) -> dict:
  """Metrics of the hard-examples test dataset: the given sets' pairs pooled (see pool_scores).

  HETD pools LFW, CFP-FP and AgeDB-30 (HETD_MEMBERS), the sets verification.Evaluator passes.
  """
  pooled = pool_scores(parts)
  return verification_metrics_from_scores(pooled["scores"], pooled["is_same"], pooled["fold"], fars)


def far_label(far: float) -> str:
  """Compact label of a FAR: 0.1 -> '1e-1', 0.003 -> '3e-3', 0.00025 -> '2.5e-4'."""
  mantissa, exponent = f"{far:e}".split("e")
  mantissa = mantissa.rstrip("0").rstrip(".")
  return f"{mantissa}e{int(exponent)}"


def far_threshold(impostor_scores: np.ndarray, far: float) -> tuple[float, float]:
  """(threshold, achieved FAR): the module's TAR@FAR threshold for these impostor scores.

  With I impostors and k = floor(far * I) (far read as the decimal it is written as), the
  threshold is the (k+1)-th highest impostor score, so at most k impostors score strictly above
  it; -inf when k >= I. A score is accepted when it is above the threshold. The achieved FAR is
  the fraction of impostors accepted (at most `far`: ties at the threshold are rejected). O(I):
  one partition, no sort. Also the threshold of TPIR@FPIR, with the non-mated probes' best scores
  as the impostors (template_metrics).
  """
  impostor_scores = np.asarray(impostor_scores)
  num_impostor = impostor_scores.size
  if num_impostor == 0:
    raise ValueError("far_threshold needs at least one impostor score.")
  allowed = math.floor(fractions.Fraction(repr(float(far))) * num_impostor)
  if allowed >= num_impostor:
    return -np.inf, 1.0
  position = num_impostor - 1 - allowed  # The (allowed + 1)-th highest, counted from the lowest.
  threshold = float(np.partition(impostor_scores, position)[position])
  return threshold, float(np.count_nonzero(impostor_scores > threshold) / num_impostor)


def checked_fars(fars: Sequence[float]) -> tuple[float, ...]:
  """The FARs as a tuple of floats; ValueError unless they are a non-empty sequence in (0, 1]."""
  fars = tuple(float(far) for far in fars)
  if not fars or not all(0 < far <= 1 for far in fars):
    raise ValueError(f"fars must be a non-empty sequence of rates in (0, 1]; got {fars}.")
  return fars


def _checked_scores(scores, is_same, need_both_classes=False):
  scores = np.asarray(scores)
  is_same = np.asarray(is_same)
  if scores.ndim != 1 or is_same.shape != scores.shape:
    raise ValueError(
        f"scores and is_same must both be 1-D of the same length; got "
        f"{scores.shape} and {is_same.shape}."
    )
  if not np.issubdtype(scores.dtype, np.floating):
    raise ValueError(f"scores must be floating point; got {scores.dtype}.")
  bad = np.flatnonzero(~np.isfinite(scores))
  if bad.size:
    raise ValueError(
        f"{bad.size} scores are not finite (first at pair {bad[0]}: "
        f"{scores[bad[0]]}); fix the embeddings that produced them."
    )
  if is_same.dtype != np.bool_:
    if not np.isin(is_same, (0, 1)).all():
      raise ValueError("is_same must be boolean (or 0/1); it holds other values.")
    is_same = is_same.astype(bool)
  if len(scores) == 0:
    raise ValueError("no pairs to score.")
  if need_both_classes and (is_same.all() or not is_same.any()):
    raise ValueError(
        f"the pairs must include both genuine and impostor pairs; all "
        f"{len(is_same)} are {'genuine' if is_same.all() else 'impostor'}."
    )
  # float32 and float64 are ranked as given (float32 sorts faster); thresholds are computed in
  # float64, which holds every float32 score and every midpoint of two of them exactly.
  if scores.dtype not in (np.float32, np.float64):
    scores = scores.astype(np.float64)
  return scores, is_same


def _checked_folds(folds, num_pairs):
  """Fold codes 0..F-1 per pair, numbered in ascending order of the fold ids, as small ints."""
  if isinstance(folds, (int, np.integer)):
    if not 2 <= folds <= num_pairs:
      raise ValueError(f"num_folds={folds} must lie in [2, num_pairs={num_pairs}].")
    codes = consecutive_folds(num_pairs, int(folds))
  else:
    fold = np.asarray(folds)
    if fold.shape != (num_pairs,) or not np.issubdtype(fold.dtype, np.integer):
      raise ValueError(
          f"folds must be an int or an integer fold id per pair, shape "
          f"({num_pairs},); got {fold.dtype} {fold.shape}."
      )
    if fold.min() >= 0 and fold.max() < num_pairs:  # Small ids: a count beats a sort.
      present = np.bincount(fold.astype(np.intp), minlength=1) > 0
      codes = (np.cumsum(present) - 1)[fold]
    else:
      codes = np.unique(fold, return_inverse=True)[1]
    if codes.max() < 1:
      raise ValueError("folds holds a single fold id; cross-validation needs at least two folds.")
  return codes.astype(np.min_scalar_type(codes.max()), copy=False)


@dataclasses.dataclass(frozen=True)
class _RankedPairs:
  """Pairs in ascending score order with the cumulative counts that every metric is read from.

  A cut c in [0, N] rejects the c lowest-scoring pairs. It is valid when it does not split a run
  of equal scores (c = 0, c = N, or scores[c - 1] < scores[c]). Counts are only ever read at
  valid cuts, so the order of pairs inside a run of ties is irrelevant and the sort need not be
  stable.
  """

  order: np.ndarray  # [N] the permutation that sorts the scores.
  scores: np.ndarray  # [N] ascending, float32 or float64 as given.
  is_same: np.ndarray  # [N] bool, in score order.
  cuts: np.ndarray  # The valid cuts, ascending; 0 and N included.
  rejected_genuine: np.ndarray  # [N + 1] genuine pairs among the c lowest.
  rejected_impostors: np.ndarray  # [N + 1] impostor pairs among the c lowest.
  # [N + 1] rejected impostors - rejected genuine pairs: the number of correct decisions at a
  # valid cut, less the number of genuine pairs. Cuts inside a run of ties hold -3(N + 1), below
  # anything this count can reach, even less the count of a held-out fold.
  cut_margin: np.ndarray

  @classmethod
  def of(cls, scores, is_same):
    order = np.argsort(scores)
    sorted_scores, sorted_same = scores[order], is_same[order]
    num_pairs = len(scores)
    count_dtype = np.int32 if 4 * (num_pairs + 1) < 2**31 else np.int64
    rejected_genuine = np.zeros(num_pairs + 1, count_dtype)
    np.cumsum(sorted_same, dtype=count_dtype, out=rejected_genuine[1:])
    rejected_impostors = np.arange(num_pairs + 1, dtype=count_dtype) - rejected_genuine
    is_cut = np.ones(num_pairs + 1, bool)
    np.not_equal(sorted_scores[1:], sorted_scores[:-1], out=is_cut[1:-1])
    cuts = np.flatnonzero(is_cut)
    cut_margin = rejected_impostors - rejected_genuine
    if len(cuts) <= num_pairs:
      np.putmask(cut_margin, ~is_cut, -3 * (num_pairs + 1))
    return cls(
        order, sorted_scores, sorted_same, cuts, rejected_genuine, rejected_impostors, cut_margin
    )

  @property
  def num_pairs(self) -> int:
    return len(self.scores)

  @property
  def num_genuine(self) -> int:
    return int(self.rejected_genuine[-1])

  def threshold_at(self, cut: int) -> float:
    """The midpoint between the scores either side of a valid cut (-inf or inf at the ends)."""
    if cut == 0:
      return -np.inf
    if cut == self.num_pairs:
      return np.inf
    return (float(self.scores[cut - 1]) + float(self.scores[cut])) / 2


def _best_cut(ranked):
  """(threshold, accuracy) of the best valid cut; ties go to the highest cut."""
  cut = ranked.num_pairs - int(np.argmax(ranked.cut_margin[::-1]))
  correct = int(ranked.cut_margin[cut]) + ranked.num_genuine
  return float(ranked.threshold_at(cut)), float(correct / ranked.num_pairs)


def _cross_validated_cuts(ranked, sorted_fold):
  """Per fold: the best cut learnt on the other folds and its held-out accuracy.

  With fold f held out, a valid cut c of all the pairs scores on the training pairs
  margin(c) - margin_f(c) + const, where margin counts rejected impostors minus rejected genuine
  pairs below c, over all pairs and over fold f alone. margin_f is constant between consecutive
  pairs of fold f, so the best training cut is found from the maxima of margin over those
  segments: one np.maximum.reduceat per fold over the one global sort. Valid global cuts are
  exactly the training cuts (a cut with no training pair at its side repeats its neighbour's
  training partition), and the highest maximising one gives the highest training cut.

  Args:
    ranked: _RankedPairs of all pairs.
    sorted_fold: fold code (0..F-1) of each pair, in score order.

  Returns:
    (fold_threshold, fold_accuracy), float64 [F] each.
  """
  num_pairs = ranked.num_pairs
  margin = ranked.cut_margin
  fold_sizes = np.bincount(sorted_fold)
  fold_ends = np.cumsum(fold_sizes)
  by_fold = np.argsort(sorted_fold, kind="stable")  # Each fold's positions, ascending.
  fold_threshold = np.empty(len(fold_sizes))
  fold_accuracy = np.empty(len(fold_sizes))
  for f, (size, end) in enumerate(zip(fold_sizes, fold_ends)):
    positions = by_fold[end - size : end]
    # fold_margin[j]: margin_f of the first j pairs of fold f; fold_margin[-1] = I_f - G_f.
    fold_margin = np.concatenate(([0], np.cumsum(np.where(ranked.is_same[positions], -1, 1))))
    # Segment j: the cuts with exactly j pairs of fold f below them.
    starts = np.concatenate(([0], positions + 1))
    segment_best = np.maximum.reduceat(margin, starts)
    train_margin = segment_best - fold_margin
    j = size - int(np.argmax(train_margin[::-1]))  # Ties go to the highest cut.
    in_segment = margin[starts[j] : positions[j] + 1 if j < size else num_pairs + 1]
    cut = starts[j] + len(in_segment) - 1 - int(np.argmax(in_segment[::-1] == segment_best[j]))
    num_train_rejected, num_train = cut - j, num_pairs - size
    if num_train_rejected == 0:
      threshold = -np.inf
    elif num_train_rejected == num_train:
      threshold = np.inf
    else:
      # The pairs of fold f in the run of consecutive positions around the cut separate it from
      # the nearest training pairs. positions[i] - i never decreases and equals cut - j exactly
      # on that run.
      offset = positions - np.arange(size)
      run_start = np.searchsorted(offset, cut - j, side="left")
      run_stop = np.searchsorted(offset, cut - j, side="right")
      highest_rejected = cut - 1 - (j - run_start)
      lowest_accepted = cut + (run_stop - j)
      threshold = (
          float(ranked.scores[highest_rejected]) + float(ranked.scores[lowest_accepted])
      ) / 2
    held_out_scores = ranked.scores[positions].astype(np.float64, copy=False)
    held_out_rejected = np.searchsorted(held_out_scores, threshold, side="right")
    genuine = (size - int(fold_margin[-1])) // 2
    fold_threshold[f] = threshold
    fold_accuracy[f] = (int(fold_margin[held_out_rejected]) + genuine) / size
  return fold_threshold, fold_accuracy


def _roc(ranked):
  """(far, tar) with one point per valid cut, FAR ascending (see roc_curve)."""
  # The cut after each run of equal scores, highest first: everything above it is accepted.
  ends = ranked.cuts[:0:-1]
  num_genuine = ranked.num_genuine
  num_impostor = ranked.num_pairs - num_genuine
  far = np.empty(len(ends) + 1)
  tar = np.empty(len(ends) + 1)
  np.subtract(num_impostor, ranked.rejected_impostors[ends], out=far[:-1])
  np.subtract(num_genuine, ranked.rejected_genuine[ends], out=tar[:-1])
  far[-1], tar[-1] = num_impostor, num_genuine
  far /= num_impostor
  tar /= num_genuine
  return far, tar


def area_under_roc(far: np.ndarray, tar: np.ndarray) -> float:
  """Area under the ROC polygon (far, tar), FAR ascending."""
  return float(np.sum(np.diff(far) * (tar[1:] + tar[:-1])) / 2)


def equal_error_rate(far: np.ndarray, tar: np.ndarray) -> float:
  """Where the ROC polygon (far, tar), FAR ascending, crosses FAR = 1 - TAR."""
  # Along the ROC, FAR - FRR rises from -1 at (0, 0) to +1 at (1, 1).
  gap = far - (1 - tar)
  j = int(np.argmax(gap >= 0))
  if gap[j] == 0:
    return float(far[j])
  fraction = -gap[j - 1] / (gap[j] - gap[j - 1])
  return float(far[j - 1] + fraction * (far[j] - far[j - 1]))
