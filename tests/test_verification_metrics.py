"""Tests of adam_face.verification_metrics: exact metrics on planted scores, against brute force
and a per-fold reference."""

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import numpy as np
import pytest

from adam_face import verification_metrics
import toy_embeddings


def _metrics(scores, is_same, folds=10, fars=verification_metrics.DEFAULT_FARS):
  return verification_metrics.verification_metrics_from_scores(
      np.asarray(scores, np.float64), np.asarray(is_same, bool), folds, fars
  )


def test_identical_score_clusters_are_separated_perfectly():
  # 10 folds of 6 pairs, genuine all at 0.8, impostors all at 0.1.
  is_same = np.tile([True, True, True, False, False, False], 10)
  scores = np.where(is_same, 0.8, 0.1)
  metrics = _metrics(scores, is_same)
  assert metrics["accuracy"] == 1.0 and metrics["accuracy_std"] == 0.0
  np.testing.assert_allclose(metrics["fold_threshold"], 0.45)
  assert metrics["best_threshold"] == pytest.approx(0.45)
  for far in ("1e-1", "1e-2", "3e-3", "1e-3"):
    assert metrics[f"tar@far={far}"] == 1.0
    assert metrics[f"far@far={far}"] == 0.0
    # No impostor may pass, so the threshold is the highest impostor score and ties reject.
    assert metrics[f"threshold@far={far}"] == 0.1
  assert metrics["auc"] == 1.0 and metrics["eer"] == 0.0


def test_separable_but_not_by_the_learnt_threshold():
  # Genuine and impostor scores never overlap, yet fold 0's genuine pair (0.3) lies below the
  # threshold learnt on the other folds (midpoint of 0.2 and 0.7 = 0.45): one error in fold 0.
  scores = np.array([0.3, 0.1] + [0.7, 0.2] * 4)
  is_same = np.array([True, False] * 5)
  metrics = _metrics(scores, is_same, folds=5)
  np.testing.assert_array_equal(metrics["fold_accuracy"], [0.5, 1, 1, 1, 1])
  np.testing.assert_allclose(metrics["fold_threshold"], [0.45, 0.25, 0.25, 0.25, 0.25])
  assert metrics["accuracy"] == pytest.approx(0.9)
  assert metrics["accuracy_std"] == pytest.approx(0.2)
  assert metrics["auc"] == 1.0 and metrics["eer"] == 0.0
  assert metrics["best_threshold"] == pytest.approx(0.25)


def test_a_cut_never_splits_equal_scores():
  # Every score equal: the only cuts are accept-all and reject-all. With 2 genuine and 2
  # impostor training pairs they tie, and the tie goes to the higher cut (reject all, +inf).
  scores = np.full(6, 0.5)
  is_same = np.array([True, False, True, False, True, True])
  metrics = _metrics(scores, is_same, folds=np.array([0, 0, 1, 1, 2, 2]))
  # Fold 0 trains on T F T T -> accept all (-inf); fold 1 likewise; fold 2 trains on T F T F.
  np.testing.assert_array_equal(metrics["fold_threshold"], [-np.inf, -np.inf, np.inf])
  np.testing.assert_array_equal(metrics["fold_accuracy"], [0.5, 0.5, 0.0])
  assert metrics["auc"] == 0.5
  assert metrics["eer"] == pytest.approx(0.5)
  # FAR 1e-1 of 2 impostors allows none above the threshold: the tie at 0.5 rejects everything.
  assert metrics["tar@far=1e-1"] == 0.0 and metrics["threshold@far=1e-1"] == 0.5


def test_folds_with_a_single_class():
  # Fold 0 all genuine, fold 1 all impostor, fold 2 mixed: the held-out accuracy is well defined
  # even when one class is missing from the held-out fold or from the training folds.
  scores = np.array([0.9, 0.8, 0.2, 0.1, 0.7, 0.15])
  is_same = np.array([True, True, False, False, True, False])
  metrics = _metrics(scores, is_same, folds=np.array([0, 0, 1, 1, 2, 2]))
  # fold 0: trains on 0.2F 0.1F 0.7T 0.15F -> cut between 0.2 and 0.7 = 0.45;
  # fold 1: trains on 0.9T 0.8T 0.7T 0.15F -> 0.425; fold 2: 0.9T 0.8T 0.2F 0.1F -> 0.5.
  np.testing.assert_allclose(metrics["fold_threshold"], [0.45, 0.425, 0.5])
  np.testing.assert_array_equal(metrics["fold_accuracy"], [1.0, 1.0, 1.0])

  all_genuine_training = _metrics(
      [0.9, 0.8, 0.2, 0.1], [True, True, False, False], folds=np.array([0, 0, 1, 1])
  )
  # Fold 1's training pairs are all genuine -> accept everything (-inf): both impostors wrong.
  np.testing.assert_array_equal(all_genuine_training["fold_threshold"], [np.inf, -np.inf])
  np.testing.assert_array_equal(all_genuine_training["fold_accuracy"], [0.0, 0.0])


def test_tar_at_far_threshold_rule():
  impostor = np.arange(100) / 100  # 0.00 .. 0.99
  genuine = np.array([0.985, 0.97, 0.96, 0.5, 0.99, 0.995])
  scores = np.concatenate([impostor, genuine])
  is_same = np.r_[np.zeros(100, bool), np.ones(6, bool)]
  metrics = _metrics(scores, is_same, fars=(1e-1, 3e-2, 1e-2, 1e-3, 1.0))
  # FAR 1e-1 allows 10 impostors above: threshold = 11th highest = 0.89; 5 genuine above it.
  assert metrics["threshold@far=1e-1"] == 0.89
  assert metrics["tar@far=1e-1"] == 5 / 6 and metrics["far@far=1e-1"] == 0.1
  # FAR 3e-2 allows 3: threshold 0.96; genuine 0.96 ties and is rejected.
  assert metrics["threshold@far=3e-2"] == 0.96 and metrics["tar@far=3e-2"] == 4 / 6
  assert metrics["threshold@far=1e-2"] == 0.98 and metrics["tar@far=1e-2"] == 3 / 6
  # FAR 1e-3 of 100 impostors allows none: threshold = highest impostor score.
  assert metrics["threshold@far=1e-3"] == 0.99 and metrics["tar@far=1e-3"] == 1 / 6
  assert metrics["far@far=1e-3"] == 0.0
  assert metrics["threshold@far=1e0"] == -np.inf and metrics["tar@far=1e0"] == 1.0


def test_far_count_is_exact_for_decimal_fars():
  # 3e-3 * 1000 is 3.0000000000000004 in floating point; 7e-3 * 1000 is 7.000000000000001.
  # Neither may round to a different number of allowed impostors.
  impostor = np.arange(1000, dtype=np.float64)
  scores = np.r_[impostor, 2000.0]
  is_same = np.r_[np.zeros(1000, bool), True]
  metrics = _metrics(scores, is_same, fars=(3e-3, 7e-3, 0.29))
  assert metrics["threshold@far=3e-3"] == 996.0
  assert metrics["threshold@far=7e-3"] == 992.0
  assert metrics["threshold@far=2.9e-1"] == 709.0  # 0.29 * 1000 = 289.99999999999994


def test_roc_auc_and_eer_on_a_planted_overlap():
  scores = np.array([0.6, 0.7, 0.8, 0.9, 0.1, 0.2, 0.3, 0.65])
  is_same = np.array([True] * 4 + [False] * 4)
  far, tar, thresholds = verification_metrics.roc_curve(scores, is_same)
  np.testing.assert_array_equal(far, [0, 0, 0, 0, 0.25, 0.25, 0.5, 0.75, 1])
  np.testing.assert_array_equal(tar, [0, 0.25, 0.5, 0.75, 0.75, 1, 1, 1, 1])
  np.testing.assert_array_equal(thresholds, [0.9, 0.8, 0.7, 0.65, 0.6, 0.3, 0.2, 0.1, -np.inf])
  metrics = _metrics(scores, is_same, folds=2)
  assert metrics["auc"] == 15 / 16  # 15 of the 16 genuine-impostor pairs are ordered right.
  assert metrics["eer"] == 0.25

  # A tie (genuine and impostor at 0.5) is a diagonal ROC segment, (0, .5) -> (.5, 1), which
  # crosses FAR = FRR half-way: EER 0.25; the tie counts one half in the AUC.
  tied = _metrics([0.5, 0.9, 0.5, 0.1], [True, True, False, False], folds=2)
  assert tied["eer"] == 0.25 and tied["auc"] == 3.5 / 4


def _brute_force_best_training_accuracy(scores, is_same):
  cuts = np.r_[-np.inf, np.unique(scores)]
  return max(np.mean((scores > cut) == is_same) for cut in cuts)


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
    data=st.data(),
    num_pairs=st.integers(4, 40),
)
def test_metrics_agree_with_brute_force(data, num_pairs):
  # Scores drawn from a handful of values, so ties are everywhere.
  scores = data.draw(
      hnp.arrays(
          np.float64, num_pairs, elements=st.sampled_from([-0.5, 0.0, 0.125, 0.25, 0.5, 0.75, 1.0])
      )
  )
  is_same = data.draw(hnp.arrays(bool, num_pairs))
  hypothesis.assume(is_same.any() and not is_same.all())
  num_folds = data.draw(st.integers(2, num_pairs // 2))
  far = data.draw(st.sampled_from([0.05, 0.1, 0.25, 0.5]))
  metrics = _metrics(scores, is_same, folds=num_folds, fars=(far,))

  fold = verification_metrics.consecutive_folds(num_pairs, num_folds)
  for k in range(num_folds):
    train, test = fold != k, fold == k
    threshold = metrics["fold_threshold"][k]
    # The learnt cut reaches the best training accuracy and never falls on a training score.
    assert np.mean((scores[train] > threshold) == is_same[train]) == pytest.approx(
        _brute_force_best_training_accuracy(scores[train], is_same[train])
    )
    assert threshold not in scores[train]
    assert metrics["fold_accuracy"][k] == np.mean((scores[test] > threshold) == is_same[test])

  genuine, impostor = scores[is_same], scores[~is_same]
  # Smallest candidate threshold with at most floor(far * I) impostors strictly above it.
  allowed = np.floor(far * len(impostor) + 1e-9)
  candidates = np.r_[-np.inf, np.unique(scores)]
  threshold = min(c for c in candidates if np.sum(impostor > c) <= allowed)
  label = verification_metrics.far_label(far)
  assert metrics[f"threshold@far={label}"] == threshold
  assert metrics[f"tar@far={label}"] == np.mean(genuine > threshold)

  # AUC is the Mann-Whitney statistic with ties counted one half.
  wins = (genuine[:, None] > impostor[None, :]) + 0.5 * (genuine[:, None] == impostor[None, :])
  assert metrics["auc"] == pytest.approx(wins.mean())
  # EER lies between FAR and FRR at every ROC point where they cross.
  far_points, tar_points, _ = verification_metrics.roc_curve(scores, is_same)
  assert 0 <= metrics["eer"] <= 1
  crossing = np.argmax(far_points >= 1 - tar_points)
  low = min(far_points[crossing - 1], 1 - tar_points[crossing - 1]) if crossing else 0
  assert low - 1e-12 <= metrics["eer"] <= far_points[crossing] + 1e-12


@pytest.mark.parametrize("fold_ids", [(0, 1, 2, 3), (9, 2, 30, 5), (-7, 2**40, 3, 11)])
def test_fold_cuts_match_a_per_fold_reference(fold_ids):
  # One global sort serves every fold; the reference re-ranks each fold's training pairs. Scores
  # are float32 on a coarse grid (runs of ties everywhere, some spanning folds), fold ids are
  # unordered, sparse or negative (both ways of numbering them), and fold sizes differ.
  rng = np.random.default_rng(len(fold_ids) + sum(fold_ids) % 97)
  num_pairs = 3001
  is_same = rng.random(num_pairs) < 0.4
  scores = (np.round((rng.normal(size=num_pairs) + 1.2 * is_same) * 16) / 16).astype(np.float32)
  fold = np.asarray(fold_ids)[rng.choice(len(fold_ids), num_pairs, p=[0.1, 0.2, 0.3, 0.4])]
  metrics = verification_metrics.verification_metrics_from_scores(
      scores, is_same, fold, fars=(1e-2,)
  )

  for k, fold_id in enumerate(sorted(fold_ids)):
    train, test = fold != fold_id, fold == fold_id
    threshold, _ = verification_metrics.best_accuracy_threshold(
        scores[train].astype(np.float64), is_same[train]
    )
    assert metrics["fold_threshold"][k] == threshold
    assert metrics["fold_accuracy"][k] == np.mean((scores[test] > threshold) == is_same[test])
  impostor = np.sort(scores[~is_same])
  threshold = impostor[-1 - int(0.01 * len(impostor))]
  assert metrics["threshold@far=1e-2"] == threshold
  assert metrics["tar@far=1e-2"] == np.mean(scores[is_same] > threshold)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pair_scores_across_blocks(dtype):
  # 300 pairs of 512-d rows span several cache blocks, the last one partial.
  rng = np.random.default_rng(3)
  emb_a, emb_b = (rng.normal(size=(300, 512)).astype(dtype) for _ in range(2))
  exact = np.einsum("ij,ij->i", emb_a.astype(np.float64), emb_b.astype(np.float64)) / (
      np.linalg.norm(emb_a.astype(np.float64), axis=1)
      * np.linalg.norm(emb_b.astype(np.float64), axis=1)
  )
  scores = verification_metrics.pair_scores(emb_a, emb_b)
  assert scores.dtype == np.float32 and scores.shape == (300,)
  if dtype == np.float64:  # float64 embeddings: the exact cosines, rounded once.
    np.testing.assert_array_equal(scores, exact.astype(np.float32))
  else:
    np.testing.assert_allclose(scores, exact, atol=1e-6)


def test_consecutive_folds_match_the_published_blocks():
  np.testing.assert_array_equal(verification_metrics.consecutive_folds(6000)[::600], np.arange(10))
  np.testing.assert_array_equal(
      np.bincount(verification_metrics.consecutive_folds(23, 4)), [6, 6, 6, 5]
  )
  # A .bin of fewer pairs than folds still gets fold ids (datasets/face_verification.py uses this
  # function); the last folds are empty, and the metrics refuse to cross-validate over them.
  np.testing.assert_array_equal(verification_metrics.consecutive_folds(4), [0, 1, 2, 3])
  with pytest.raises(ValueError, match="num_folds=0 must be positive"):
    verification_metrics.consecutive_folds(4, 0)


def test_far_labels():
  assert [verification_metrics.far_label(f) for f in (0.1, 1e-2, 3e-3, 3e-4, 2.5e-4, 1.0)] == [
      "1e-1",
      "1e-2",
      "3e-3",
      "3e-4",
      "2.5e-4",
      "1e0",
  ]


def test_verification_metrics_scores_cosines_of_unnormalised_embeddings():
  rng = np.random.default_rng(0)
  emb_a = rng.normal(size=(40, 16)).astype(np.float32)
  emb_b = rng.normal(size=(40, 16)).astype(np.float32)
  is_same = np.arange(40) % 2 == 0
  emb_b[is_same] = emb_a[is_same] * 3 + 0.1 * emb_b[is_same]
  cosines = np.sum(emb_a * emb_b, 1) / np.linalg.norm(emb_a, axis=1) / np.linalg.norm(emb_b, axis=1)
  np.testing.assert_allclose(verification_metrics.pair_scores(emb_a, emb_b), cosines, rtol=1e-5)
  from_embeddings = verification_metrics.verification_metrics(emb_a, emb_b, is_same)
  from_scores = _metrics(verification_metrics.pair_scores(emb_a, emb_b), is_same)
  assert from_embeddings["accuracy"] == from_scores["accuracy"] == 1.0


@pytest.mark.parametrize(
    "scores, is_same, folds, fars, message",
    [
        ([0.1, np.nan, 0.3, 0.4], [1, 0, 1, 0], 2, (0.1,), "not finite"),
        ([0.1, 0.2, 0.3, 0.4], [1, 1, 1, 1], 2, (0.1,), "both genuine and impostor"),
        ([0.1, 0.2, 0.3, 0.4], [1, 2, 1, 0], 2, (0.1,), "boolean"),
        ([0.1, 0.2, 0.3, 0.4], [1, 0, 1, 0], 1, (0.1,), "num_folds"),
        ([0.1, 0.2, 0.3, 0.4], [1, 0, 1, 0], np.zeros(4, int), (0.1,), "single fold"),
        ([0.1, 0.2, 0.3, 0.4], [1, 0, 1, 0], np.zeros(3, int), (0.1,), "fold id per pair"),
        ([0.1, 0.2, 0.3, 0.4], [1, 0, 1, 0], 2, (0.0,), "fars"),
        ([0.1, 0.2, 0.3], [1, 0, 1, 0], 2, (0.1,), "same length"),
    ],
)
def test_bad_input_is_named(scores, is_same, folds, fars, message):
  with pytest.raises(ValueError, match=message):
    verification_metrics.verification_metrics_from_scores(
        np.asarray(scores, np.float64), np.asarray(is_same), folds, fars
    )


def test_zero_embedding_is_rejected():
  with pytest.raises(ValueError, match="pair 1 has an embedding of zero"):
    verification_metrics.pair_scores(np.array([[1.0, 0], [0, 0]]), np.ones((2, 2)))


def test_hetd_pools_fold_by_fold():
  parts = toy_embeddings.planted_hetd_scores()
  metrics = verification_metrics.hetd_metrics(parts)
  assert metrics["num_genuine"] == metrics["num_impostor"] == 95
  assert [key for key in metrics if key.startswith("tar@")] == [
      "tar@far=1e-1",
      "tar@far=1e-2",
      "tar@far=1e-3",
      "tar@far=3e-4",
  ]
  pooled = verification_metrics.pool_scores(parts)
  expected = _metrics(
      pooled["scores"], pooled["is_same"], pooled["fold"], verification_metrics.HETD_FARS
  )
  assert metrics["accuracy"] == expected["accuracy"]
  assert len(metrics["fold_accuracy"]) == 10
