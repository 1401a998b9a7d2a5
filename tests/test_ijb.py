"""Tests of the IJB-B / IJB-C evaluation (datasets/ijb.py, adam_face/template_metrics.py,
adam_face/ijb.py) against brute-force computations written here: loops over templates, media,
thresholds and gallery entries, in float64, sharing no code with what they check.

The end-to-end tests score tests/ijb_fixture.py's IJB-C folder: templates of several media and
faces, exact score ties, a missing and an undecodable photo, a template with no usable face, 1:N
galleries G1 and G2 and mixed probes.
"""

import fractions
import math
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps

from adam_face import errors, ijb, report, template_metrics, verification_metrics
from datasets import alignment
from datasets import ijb as ijb_layout
import ijb_fixture
from multihost_launch import start_workers, worker_results

FARS = template_metrics.VERIFICATION_FARS


# ---- brute force references ------------------------------------------------------------------


def brute_pool(features, weights, templates, media):
  """{template: unit feature or None}: mean over media of the mean of each medium's faces."""
  pooled = {}
  for t in sorted(set(templates.tolist())):
    media_means = []
    for m in sorted(set(media[templates == t].tolist())):
      faces = [
          features[i].astype(np.float64) * weights[i]
          for i in range(len(features))
          if templates[i] == t and media[i] == m and weights[i] > 0
      ]
      if faces:
        media_means.append(np.mean(faces, axis=0))
    if media_means:
      mean = np.mean(media_means, axis=0)
      pooled[t] = mean / np.linalg.norm(mean)
    else:
      pooled[t] = None
  return pooled


def brute_tar_at_far(scores, is_same, far):
  """The lowest threshold among impostor scores (or -inf) letting at most floor(far * I)
  impostors score above it, and the TAR there."""
  impostors, genuine = scores[~is_same], scores[is_same]
  allowed = math.floor(fractions.Fraction(repr(far)) * len(impostors))
  for t in [-np.inf] + sorted(set(impostors.tolist())):
    if np.sum(impostors > t) <= allowed:
      return t, np.mean(genuine > t), np.mean(impostors > t)
  raise AssertionError("unreachable")


def brute_nearest_tar(scores, is_same, far):
  """sklearn's roc_curve (thresholds at each distinct score, collinear points dropped), then the
  highest TPR among the points of FPR nearest `far`, as insightface's eval_ijbc.py reads it."""
  points = [(0.0, 0.0)]
  for t in sorted(set(scores.tolist()), reverse=True):
    points.append((np.mean(scores[~is_same] >= t), np.mean(scores[is_same] >= t)))
  kept = [points[0]]
  for i in range(1, len(points) - 1):
    (f0, t0), (f1, t1), (f2, t2) = points[i - 1], points[i], points[i + 1]
    if (f2 - f1) != (f1 - f0) or (t2 - t1) != (t1 - t0):
      kept.append(points[i])
  kept.append(points[-1])
  nearest = min(abs(f - far) for f, _ in kept)
  return max(t for f, t in kept if abs(f - far) == nearest)


def brute_search(probes, probe_subjects, gallery, gallery_subjects, fpir):
  """Open-set 1:N by loops: (rank-1, rank-5, TPIR at fpir) over one gallery."""
  mated_ranks, mated_scores, non_mated_best = [], [], []
  for p, subject in zip(probes, probe_subjects):
    scores = [float(np.dot(p, g)) for g in gallery]
    if subject in gallery_subjects:
      mated = scores[gallery_subjects.index(subject)]
      others = [s for s, gs in zip(scores, gallery_subjects) if gs != subject]
      mated_ranks.append(1 + sum(s > mated for s in others))
      mated_scores.append(mated)
    else:
      non_mated_best.append(max(scores))
  threshold, _, _ = brute_tar_at_far(
      np.array(non_mated_best + [0.0]), np.array([False] * len(non_mated_best) + [True]), fpir
  )
  tpir = np.mean([r == 1 and s > threshold for r, s in zip(mated_ranks, mated_scores)])
  return np.mean(np.array(mated_ranks) <= 1), np.mean(np.array(mated_ranks) <= 5), tpir


def brute_insightface_search(probes, probe_subjects, gallery, gallery_subjects, far):
  """insightface's ijb_1n.py reading by loops: (rank-1, rank-5, TPR at far) over one gallery,
  every probe counted; a probe's threshold is the ceil(far x probes)-th largest non-mated pair
  score of all probes."""
  ranks, mated_scores, non_mated = [], [], []
  for p, subject in zip(probes, probe_subjects):
    scores = [float(np.dot(p, g)) for g in gallery]
    if subject in gallery_subjects:
      mated = gallery_subjects.index(subject)
      others = scores[:mated] + scores[mated + 1 :]
      ranks.append(1 + sum(s > scores[mated] for s in others))
      mated_scores.append(scores[mated])
      non_mated += others
    else:
      ranks.append(math.inf)
      mated_scores.append(-math.inf)
      non_mated += scores
  threshold = sorted(non_mated, reverse=True)[math.ceil(len(probes) * far) - 1]
  ranks = np.array(ranks)
  return np.mean(ranks <= 1), np.mean(ranks <= 5), np.mean(np.array(mated_scores) > threshold)


# ---- metrics on given features ---------------------------------------------------------------


def test_pool_templates_matches_the_brute_force():
  rng = np.random.default_rng(0)
  num_faces = 300
  templates = rng.integers(0, 40, num_faces) * 7  # Sparse, unordered ids.
  media = rng.integers(0, 5, num_faces) + 100 * (templates % 3)
  features = rng.normal(size=(num_faces, 6)).astype(np.float32)
  weights = rng.uniform(0.2, 2.0, num_faces)
  weights[rng.random(num_faces) < 0.1] = 0.0  # Unusable faces.
  weights[templates == templates[0]] = 0.0  # A template with no usable face.
  pooled = template_metrics.pool_templates(features, weights, templates, media)
  expected = brute_pool(features, weights, templates, media)
  assert pooled.ids.tolist() == sorted(expected)
  for row, t in enumerate(pooled.ids):
    if expected[t] is None:
      assert pooled.is_empty[row] and not pooled.features[row].any()
    else:
      np.testing.assert_allclose(pooled.features[row], expected[t], atol=2e-6)
      assert pooled.num_faces[row] == np.sum((templates == t) & (weights > 0))
  with pytest.raises(ValueError, match="no faces"):
    pooled.rows(np.array([5]))  # Not a multiple of 7: no such template.


def test_one_to_one_metrics_match_the_brute_force_with_ties():
  rng = np.random.default_rng(1)
  is_same = rng.random(3000) < 0.3
  # Scores on a grid of 50 values: many exact ties, also across genuine and impostor pairs.
  scores = (np.round(rng.normal(np.where(is_same, 0.5, 0.0), 0.25) * 25) / 25).astype(np.float32)
  fars = (1e-3, 1e-2, 0.05, 1e-1, 0.5)
  metrics, (far_curve, tar_curve) = template_metrics.one_to_one_metrics(scores, is_same, fars)
  for far in fars:
    label = verification_metrics.far_label(far)
    threshold, tar, achieved = brute_tar_at_far(scores, is_same, far)
    assert metrics[f"threshold@far={label}"] == threshold
    assert metrics[f"tar@far={label}"] == tar
    assert metrics[f"far@far={label}"] == achieved <= far
    assert metrics[f"tar_nearest@far={label}"] == brute_nearest_tar(scores, is_same, far)
  assert metrics["num_genuine"] == is_same.sum()
  assert far_curve[0] == 0 and tar_curve[-1] == 1


def test_gallery_search_matches_the_brute_force_with_ties(mesh8):
  rng = np.random.default_rng(2)
  gallery = rng.normal(size=(12, 5))
  gallery[7] = gallery[3]  # Two gallery entries score alike against every probe.
  gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
  gallery_subjects = list(range(100, 112))
  probe_subjects = rng.choice(list(range(100, 125)), 90)  # About half not in the gallery.
  mated_of = {s: i for i, s in enumerate(gallery_subjects)}
  probes = np.where(
      np.isin(probe_subjects, gallery_subjects)[:, None],
      gallery[[mated_of.get(s, 0) for s in probe_subjects]] + rng.normal(0, 0.6, (90, 5)),
      rng.normal(size=(90, 5)),
  )
  probes[:4] = gallery[3]  # Probes tied between entries 3 and 7; rank 1 for subject 103 or 107.
  probe_subjects[:4] = [103, 107, 103, 124]
  probes /= np.linalg.norm(probes, axis=1, keepdims=True)
  probes, gallery = probes.astype(np.float32), gallery.astype(np.float32)
  mated_row = np.array([mated_of.get(s, -1) for s in probe_subjects])
  result = template_metrics.search_gallery(probes, gallery, mated_row, mesh8)
  assert result.rank[:3].tolist() == [1, 1, 1]  # Ties go to the mated template.
  metrics = template_metrics.one_to_n_metrics(result, fpirs=(0.05, 0.3), ranks=(1, 5))
  for fpir in (0.05, 0.3):
    rank1, rank5, tpir = brute_search(
        probes.astype(np.float64), probe_subjects, gallery, gallery_subjects, fpir
    )
    assert metrics["rank-1"] == pytest.approx(rank1)
    assert metrics["rank-5"] == pytest.approx(rank5)
    label = verification_metrics.far_label(fpir)
    assert metrics[f"tpir@fpir={label}"] == pytest.approx(tpir)
    assert metrics[f"fpir@fpir={label}"] <= fpir
  assert metrics["num_mated"] + metrics["num_non_mated"] == 90


def test_insightface_joined_gallery_figures_match_the_brute_force(mesh8, monkeypatch):
  monkeypatch.setattr(template_metrics, "_PROBES_PER_DEVICE", 4)  # 3 blocks of 32 probes.
  rng = np.random.default_rng(3)
  gallery = rng.normal(size=(12, 5))
  gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
  gallery_subjects = list(range(100, 112))
  probe_subjects = rng.choice(list(range(100, 115)), 90)  # A few without a gallery template.
  mated_of = {s: i for i, s in enumerate(gallery_subjects)}
  probes = gallery[[mated_of.get(s, 0) for s in probe_subjects]] + rng.normal(0, 0.8, (90, 5))
  probes /= np.linalg.norm(probes, axis=1, keepdims=True)
  probes, gallery = probes.astype(np.float32), gallery.astype(np.float32)
  mated_row = np.array([mated_of.get(s, -1) for s in probe_subjects])
  fars = (0.05, 0.3)  # Thresholds: the 5th and the 27th largest non-mated score of all probes.
  result = template_metrics.search_gallery(
      probes, gallery, mated_row, mesh8, num_largest_non_mated=27
  )
  assert len(result.largest_non_mated) == 27  # More than one probe's 11 or 12.
  assert np.all(np.diff(result.largest_non_mated) <= 0)
  metrics = template_metrics.insightface_one_to_n_metrics(result, fars=fars, ranks=(1, 5))
  for far in fars:
    rank1, rank5, tpr = brute_insightface_search(
        probes.astype(np.float64), probe_subjects, gallery, gallery_subjects, far
    )
    assert metrics["rank-1"] == pytest.approx(rank1)
    assert metrics["rank-5"] == pytest.approx(rank5)
    assert metrics[f"tpr@far={verification_metrics.far_label(far)}"] == pytest.approx(tpr)
  with pytest.raises(ValueError, match="needs the 45 largest non-mated scores; the search kept 27"):
    template_metrics.insightface_one_to_n_metrics(result, fars=(0.5,))


def test_pair_scores_span_several_gram_blocks(mesh8, monkeypatch):
  monkeypatch.setattr(template_metrics, "_GRAM_BLOCK_ELEMENTS", 90)  # Blocks of 8 rows: 4 blocks.
  rng = np.random.default_rng(3)
  features = rng.normal(size=(30, 8))
  features /= np.linalg.norm(features, axis=1, keepdims=True)
  templates = template_metrics.Templates(
      np.arange(30) * 2, features.astype(np.float32), np.ones(30, int)
  )
  first, second = rng.integers(0, 30, 100) * 2, rng.integers(0, 30, 100) * 2
  scores = template_metrics.pair_scores(templates, first, second, mesh8)
  expected = np.sum(features[first // 2] * features[second // 2], axis=1)
  np.testing.assert_allclose(scores, expected, atol=1e-6)


def test_thinned_roc_keeps_the_ends_and_the_shape():
  far = np.concatenate([[0.0], np.sort(np.random.default_rng(4).random(100_000)), [1.0]])
  tar = np.sqrt(far)
  thin_far, thin_tar = report.thinned_roc(far, tar)
  assert len(thin_far) <= 4002 and thin_far[0] == 0 and thin_far[-1] == 1
  assert np.all(np.diff(thin_far) >= 0)
  np.testing.assert_array_equal(thin_tar, np.sqrt(thin_far))


# ---- the IJB layout and the whole evaluation -------------------------------------------------


@pytest.fixture(scope="module", params=["synthetic", "lfw_dev"])
def ijbc_root(request, tmp_path_factory):
  """ijb_fixture's IJB-C folder of synthetic faces, or half of them real LFW faces (skipped where
  ../shared/data/lfw_dev is absent)."""
  lfw_dev_dir = request.getfixturevalue("lfw_dev_dir") if request.param == "lfw_dev" else None
  return ijb_fixture.write_ijbc(tmp_path_factory.mktemp("ijb"), lfw_dev_dir)


def _reference_metrics(root, weights):
  """The whole evaluation by brute force: align, resize, embed and flip in numpy; pool by loops."""
  protocol = ijb_layout.read_protocol(str(root), "ijbc")
  features, face_weights = [], []
  for i, name in enumerate(protocol.face_names):
    path = os.path.join(protocol.image_dir, name)
    try:
      image = ImageOps.exif_transpose(Image.open(path))  # As shown (ijb_fixture's sideways ones).
    except OSError:
      features.append(np.zeros(8))
      face_weights.append(0.0)
      continue
    aligned = alignment.align_face(image, protocol.landmarks[i])
    resized = tf.image.resize(
        aligned[None], [ijb_fixture.EMBED_SIZE, ijb_fixture.EMBED_SIZE], antialias=True
    )
    x = (np.clip(np.round(resized.numpy()[0]), 0, 255) - 127.5) / 127.5
    emb = x.reshape(-1) @ weights + x[:, ::-1].reshape(-1) @ weights
    norm = np.linalg.norm(emb)
    features.append(emb / norm)
    face_weights.append(norm * protocol.detector_scores[i])
  pooled = brute_pool(
      np.array(features), np.array(face_weights), protocol.templates, protocol.media
  )
  first, second, is_same = protocol.pairs
  scored = [pooled[a] is not None and pooled[b] is not None for a, b in zip(first, second)]
  scores = np.array([np.dot(pooled[a], pooled[b]) for a, b, s in zip(first, second, scored) if s])
  return protocol, pooled, scores, is_same[np.array(scored)], sum(not s for s in scored)


def test_ijb_evaluation_matches_the_brute_force(ijbc_root, tmp_path, mesh8):
  embed_fn, weights = ijb_fixture.toy_embed_fn()
  options = ijb.IJBOptions(root=str(ijbc_root), cache_dir=str(tmp_path / "cache"))
  evaluator = ijb.IJBEvaluator(
      ["ijbc"], options, image_size=ijb_fixture.EMBED_SIZE, batch_size=16, mesh=mesh8, flip="sum"
  )
  result = evaluator(embed_fn)
  protocol, pooled, scores, is_same, unscored = _reference_metrics(ijbc_root, weights)
  one_to_one = result.metrics["ijbc"]
  assert one_to_one["num_unusable_faces"] == 3
  assert one_to_one["num_empty_templates"] == 1  # 992
  assert one_to_one["num_unscored_pairs"] == unscored == len(pooled) - 1
  assert (
      one_to_one["num_genuine"] == is_same.sum()
      and one_to_one["num_impostor"] == len(scores) - is_same.sum()
  )
  for far in FARS:
    label = verification_metrics.far_label(far)
    _, tar, _ = brute_tar_at_far(scores, is_same, far)
    assert one_to_one[f"tar@far={label}"] == pytest.approx(tar), label
  # 1:N: G1 holds subjects 0-4, G2 subjects 5-9; every probe is mated in exactly one of them.
  one_to_n = result.metrics["ijbc_1n"]
  probe_ids = [10 * s + 2 for s in range(ijb_fixture.SUBJECTS)]
  for gallery_name, subjects in (("G1", range(0, 5)), ("G2", range(5, 10))):
    gallery_ids = [10 * s + 1 for s in subjects]
    for fpir in template_metrics.IDENTIFICATION_FPIRS:
      rank1, rank5, tpir = brute_search(
          [pooled[t] for t in probe_ids],
          list(range(ijb_fixture.SUBJECTS)),
          [pooled[t] for t in gallery_ids],
          list(subjects),
          fpir,
      )
      label = verification_metrics.far_label(fpir)
      assert one_to_n[f"{gallery_name}/tpir@fpir={label}"] == pytest.approx(tpir)
    assert one_to_n[f"{gallery_name}/rank-1"] == pytest.approx(rank1)
    assert one_to_n[f"{gallery_name}/rank-5"] == pytest.approx(rank5)
    assert one_to_n[f"{gallery_name}/num_mated"] == 5
  assert one_to_n["rank-1"] == pytest.approx((one_to_n["G1/rank-1"] + one_to_n["G2/rank-1"]) / 2)
  # insightface's reading: G1 and G2 joined, every probe mated.
  for far in template_metrics.INSIGHTFACE_FARS:
    rank1, rank5, tpr = brute_insightface_search(
        [pooled[t] for t in probe_ids],
        list(range(ijb_fixture.SUBJECTS)),
        [pooled[10 * s + 1] for s in range(ijb_fixture.SUBJECTS)],
        list(range(ijb_fixture.SUBJECTS)),
        far,
    )
    assert one_to_n[f"insightface/tpr@far={verification_metrics.far_label(far)}"] == pytest.approx(
        tpr
    )
  assert one_to_n["insightface/rank-1"] == pytest.approx(rank1)
  assert one_to_n["insightface/rank-5"] == pytest.approx(rank5)
  table = report.format_table(result.metrics).splitlines()
  assert (
      table[0].split() == ["set", "TAR@FAR=1e-6", "/"] + "1e-5 / 1e-4 / 1e-3 / 1e-2 / 1e-1".split()
  )
  assert table[2].split()[:12] == "set rank-1 / rank-5 / rank-10 / TPIR@FPIR=1e-2 / 1e-1".split()
  assert "ijbc" in result.curves

  # A second run reads the cached faces: photos changed since are not read again.
  assert evaluator.faces_per_second["ijbc"] > 0
  cache = ijb.AlignedFaces(protocol, str(tmp_path / "cache"))
  assert cache.faces_per_second is None and len(cache.unusable) == 3
  reasons = sorted(cache.unusable.values())
  assert sorted(r.split(": ", 1)[1].split(" (")[0] for r in reasons) == [
      "cannot decode image",
      "cannot read it",
      "cannot read it",
  ]
  again = ijb.IJBEvaluator(
      ["ijbc"], options, image_size=ijb_fixture.EMBED_SIZE, batch_size=16, mesh=mesh8, flip="sum"
  )(embed_fn)
  assert again.metrics["ijbc"]["tar@far=1e-1"] == one_to_one["tar@far=1e-1"]


def test_ijb_layout_errors_name_the_file_and_the_fix(ijbc_root, tmp_path):
  with pytest.raises(errors.RunError, match="--ijb_root"):
    ijb.IJBEvaluator(["ijbc"], ijb.IJBOptions("", ""), image_size=16, batch_size=8, mesh=None)
  with pytest.raises(
      ijb_layout.IJBLayoutError, match=r"IJBB/loose_crop is missing; adam_face reads"
  ):
    ijb_layout.read_protocol(str(ijbc_root), "ijbb")
  broken = tmp_path / "IJBC"
  (broken / "meta").mkdir(parents=True)
  (broken / "loose_crop").mkdir()
  meta = broken / "meta"
  (meta / "ijbc_face_tid_mid.txt").write_text("a.jpg 1 1\nb.jpg 1 2\n")
  (meta / "ijbc_name_5pts_score.txt").write_text("a.jpg" + " 1" * 11 + "\nc.jpg" + " 1" * 11 + "\n")
  (meta / "ijbc_template_pair_label.txt").write_text("1 1 1\n")
  with pytest.raises(ijb_layout.IJBLayoutError, match="line 2 of .*'c.jpg' but line 2"):
    ijb_layout.read_protocol(str(tmp_path), "ijbc")
  (meta / "ijbc_name_5pts_score.txt").write_text("a.jpg 1 2\n")
  with pytest.raises(ijb_layout.IJBLayoutError, match="entry 1 is 'a.jpg 1 2'; expected"):
    ijb_layout.read_protocol(str(tmp_path), "ijbc")
  (meta / "ijbc_name_5pts_score.txt").write_text("a.jpg" + " 1" * 11 + "\nb.jpg" + " 1" * 11 + "\n")
  (meta / "ijbc_template_pair_label.txt").write_text("1 1 1\n1 x 0\n")
  with pytest.raises(ijb_layout.IJBLayoutError, match="template_pair_label.txt: expected lines"):
    ijb_layout.read_protocol(str(tmp_path), "ijbc")
  (meta / "ijbc_template_pair_label.txt").write_text("1 1 1\n1 1 0\n")
  (meta / "ijbc_1N_gallery_G1.csv").write_text("TEMPLATE_ID,SUBJECT_ID\n1,1\n")
  with pytest.raises(ijb_layout.IJBLayoutError, match="ijbc_1N_gallery_G2.csv is missing"):
    ijb_layout.read_protocol(str(broken), "ijbc")  # The set's own folder works as the root too.


@pytest.mark.multihost
@pytest.mark.slow
def test_two_processes_split_the_faces_and_agree_with_one(ijbc_root, tmp_path, mesh8):
  """Each of two processes (4 devices each) aligns its share of the faces into one cache and
  embeds over the 8-device mesh; both report what one process does."""
  procs, cache = start_workers(tmp_path, f"ijb={ijbc_root}")
  results = worker_results(procs)
  options = ijb.IJBOptions(root=str(ijbc_root), cache_dir=str(tmp_path / "one"))
  alone = ijb.IJBEvaluator(
      ["ijbc"], options, image_size=ijb_fixture.EMBED_SIZE, batch_size=16, mesh=mesh8
  )(ijb_fixture.toy_embed_fn()[0])
  for result in results:
    assert result["devices"] == 8
    for name in ("ijbc", "ijbc_1n"):
      for key, value in alone.metrics[name].items():
        assert result["metrics"][name][key] == pytest.approx(value, abs=1e-6), (name, key)
  (two_process_cache,) = cache.glob("ijbc_aligned112_*.npy")
  (one_process_cache,) = (tmp_path / "one").glob("ijbc_aligned112_*.npy")
  np.testing.assert_array_equal(np.load(two_process_cache), np.load(one_process_cache))


def test_an_unwritable_cache_says_which_flag_to_set(ijbc_root, tmp_path, mesh8):
  blocked = tmp_path / "file"
  blocked.write_text("a file where the cache folder would be")
  options = ijb.IJBOptions(root=str(ijbc_root), cache_dir=str(blocked / "cache"))
  evaluator = ijb.IJBEvaluator(["ijbc"], options, image_size=16, batch_size=8, mesh=mesh8)
  with pytest.raises(errors.RunError, match="give --ijb_cache a writable folder with"):
    evaluator(ijb_fixture.toy_embed_fn()[0])


def test_ijbb_reads_its_own_files_and_galleries_s1_s2(tmp_path, mesh8):
  root = ijb_fixture.write_ijbc(tmp_path / "root", name="ijbb")
  options = ijb.IJBOptions(root=str(root), cache_dir=str(tmp_path / "cache"))
  result = ijb.IJBEvaluator(
      ["ijbb"], options, image_size=ijb_fixture.EMBED_SIZE, batch_size=16, mesh=mesh8
  )(ijb_fixture.toy_embed_fn()[0])
  assert set(result.metrics) == {"ijbb", "ijbb_1n"}
  assert result.metrics["ijbb"]["num_unusable_faces"] == 3
  assert result.metrics["ijbb_1n"]["S1/num_mated"] == result.metrics["ijbb_1n"]["S2/num_mated"] == 5
