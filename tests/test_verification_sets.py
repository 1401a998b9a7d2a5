"""Verification pair sets (verification_sets): the built-in sets on tiny data and ORL, and a
user's own set given by path (.bin, or pairs file and image folder), on tiny files and lfw_dev."""

import io

import numpy as np
import pytest
from PIL import Image

from adam_face import verification_sets
from datasets import face_verification
from datasets import image_folder
from fixtures_data import SMALL_SYNTHETIC, encoded_image
from fixtures_data import python2_pair_bin


def _pil_pixels(data: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_synthetic_verification_set(synthetic_config):
  pairs = verification_sets.load_verification_set(
      "synthetic", data_dir=synthetic_config.data_dir, image_size=12, builder_kwargs=SMALL_SYNTHETIC
  )
  # 4 held-out identities x 3 images: 12 genuine pairs and as many impostors.
  assert pairs["image_a"].shape == pairs["image_b"].shape == (24, 12, 12, 3)
  assert pairs["image_a"].dtype == np.uint8
  assert pairs["is_same"].dtype == bool and pairs["is_same"].sum() == 12
  assert pairs["fold"].dtype == np.int32 and set(pairs["fold"]) == set(range(10))


def test_bin_verification_set(tmp_path):
  bins = [encoded_image(i, size=(112, 112)) for i in range(8)]
  (tmp_path / "manual").mkdir()
  (tmp_path / "manual" / "agedb_30.bin").write_bytes(
      python2_pair_bin(bins, [True, False, True, False])
  )
  pairs = verification_sets.load_verification_set(
      "agedb_30",
      data_dir=str(tmp_path / "tfds"),
      image_size=112,
      manual_dir=str(tmp_path / "manual"),
  )
  assert pairs["is_same"].tolist() == [True, False, True, False]
  assert pairs["fold"].tolist() == [0, 1, 2, 3]
  np.testing.assert_array_equal(pairs["image_a"][1], _pil_pixels(bins[2]))  # Decoded as PIL does.
  with pytest.raises(ValueError, match="unknown verification set 'megaface'"):
    verification_sets.load_verification_set("megaface")


def test_orl_verification_set(orl_dir, data_dir):
  assert image_folder.orl_faces_dir().resolve() == orl_dir.resolve()
  pairs = verification_sets.load_verification_set("orl", data_dir=data_dir, image_size=8)
  assert pairs["image_a"].shape == (900, 8, 8, 3)
  assert pairs["is_same"].sum() == 450 and (~pairs["is_same"]).sum() == 450
  assert np.bincount(pairs["fold"]).tolist() == [90] * 10
  assert np.bincount(pairs["fold"][pairs["is_same"]]).tolist() == [45] * 10


# ------------------------------------------------------------------------- a user's set by path


def _write_pairs_tree(root, bins, issame, per_fold):
  """The pairs of a .bin written as LFW's layout: pairs file, header `folds<TAB>per_fold`, and
  one image file per slot (each person P<i> holding the two images of pair i)."""
  lines = [f"{len(issame) // (2 * per_fold)}\t{per_fold}"]
  for i, same in enumerate(issame):
    a, b = (f"P{i}", 1), (f"P{i}", 2) if same else (f"Q{i}", 1)
    for (name, number), data in zip((a, b), bins[2 * i : 2 * i + 2]):
      (root / name).mkdir(parents=True, exist_ok=True)
      (root / name / f"{name}_{number:04d}.jpg").write_bytes(data)
    lines.append(f"P{i}\t1\t2" if same else f"P{i}\t1\tQ{i}\t1")
  return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def own_set(tmp_path_factory):
  """20 pairs as mine.bin, as pairs_mine.txt + mine_images/, and as pairs.txt + lfw/ (10 folds of
  a genuine then an impostor pair: a .bin's folds are 10 blocks of consecutive pairs)."""
  root = tmp_path_factory.mktemp("own")
  bins = [encoded_image(i, size=(24, 24)) for i in range(40)]
  issame = [True, False] * 10
  (root / "mine.bin").write_bytes(python2_pair_bin(bins, issame))
  (root / "pairs_mine.txt").write_text(_write_pairs_tree(root / "mine_images", bins, issame, 1))
  (root / "pairs.txt").write_text(_write_pairs_tree(root / "lfw", bins, issame, 1))
  return root, bins, issame


def _assert_same_set(a, b):
  for key in ("image_a", "image_b", "is_same", "fold"):
    assert a[key].dtype == b[key].dtype
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_own_set_by_path(own_set, tmp_path):
  root, bins, issame = own_set
  data_dir = str(tmp_path / "tfds")
  entries = [
      str(root / "mine.bin"),
      f"{root / 'pairs_mine.txt'}@{root / 'mine_images'}",
      str(root / "pairs.txt"),
  ]
  assert [verification_sets.set_name(e) for e in entries] == ["mine", "mine", "lfw"]
  assert verification_sets.set_name("cfp_fp") == "cfp_fp"
  by_bin, by_pairs, by_lfw = (
      verification_sets.load_verification_set(e, data_dir=data_dir, image_size=24) for e in entries
  )
  assert by_bin["is_same"].tolist() == issame
  assert by_bin["fold"].tolist() == [f for f in range(10) for _ in range(2)]
  np.testing.assert_array_equal(by_bin["image_b"][5], _pil_pixels(bins[11]))
  _assert_same_set(by_bin, by_pairs)
  _assert_same_set(by_bin, by_lfw)
  # Prepared once each under the data dir, in a config named after the set.
  version = face_verification.FaceVerification.VERSION
  prepared = sorted(
      p.parent.name for p in (tmp_path / "tfds").glob(f"face_verification/*/{version}")
  )
  assert [name.rsplit("_", 1)[0] for name in prepared] == ["lfw", "mine", "mine"]


def test_changed_file_is_not_served_stale(own_set, tmp_path):
  root, bins, issame = own_set
  path = tmp_path / "mine.bin"
  path.write_bytes((root / "mine.bin").read_bytes())
  data_dir = str(tmp_path / "tfds")
  first = verification_sets.load_verification_set(str(path), data_dir=data_dir, image_size=24)
  flipped = [not s for s in issame]
  path.write_bytes(python2_pair_bin(bins, flipped))
  again = verification_sets.load_verification_set(str(path), data_dir=data_dir, image_size=24)
  assert first["is_same"].tolist() == issame and again["is_same"].tolist() == flipped


def test_own_set_errors_say_what_was_expected(own_set, tmp_path):
  root, _, _ = own_set
  with pytest.raises(FileNotFoundError, match=r"nowhere\.bin does not exist; expected an insig"):
    verification_sets.load_verification_set(str(tmp_path / "nowhere.bin"))
  with pytest.raises(FileNotFoundError, match=r"image folder .*/no_images does not exist"):
    verification_sets.load_verification_set(f"{root / 'pairs_mine.txt'}@{tmp_path / 'no_images'}")
  (tmp_path / "lonely").mkdir()
  (tmp_path / "lonely" / "pairs.txt").write_text("1\t1\nA\t1\t2\nA\t1\tB\t1\n")
  with pytest.raises(FileNotFoundError, match=r"lonely/lfw does not exist"):
    verification_sets.load_verification_set(str(tmp_path / "lonely" / "pairs.txt"))
  with pytest.raises(ValueError, match=r"known: lfw, cfp_fp.*synthetic, orl, or a path"):
    verification_sets.load_verification_set("lfw_dev")


def test_train_names_path_sets_by_stem(own_set, tmp_path):
  """Tables and metric names show 'mine', not the path."""
  from adam_face import train  # pylint: disable=g-import-not-at-top
  from tiny_config import tiny_demo_config  # pylint: disable=g-import-not-at-top

  root, _, _ = own_set
  config = tiny_demo_config()
  config.dataset.image_size = 24
  loaded = train.load_verification_sets(
      config, names=[str(root / "mine.bin")], data_dir=str(tmp_path / "tfds")
  )
  assert list(loaded) == ["mine"]


def test_lfw_dev_by_bin_and_by_pairs_file(lfw_dev_dir, data_dir):
  """dev.bin and pairs_dev.txt@dev_images are the same 600 pairs: the same pixels (PIL's) and
  labels, in 10 folds of 30 genuine then 30 impostor pairs."""
  by_bin = verification_sets.load_verification_set(str(lfw_dev_dir / "dev.bin"), data_dir=data_dir)
  by_pairs = verification_sets.load_verification_set(
      f"{lfw_dev_dir / 'pairs_dev.txt'}@{lfw_dev_dir / 'dev_images'}", data_dir=data_dir
  )
  _assert_same_set(by_bin, by_pairs)
  assert by_bin["image_a"].shape == (600, 112, 112, 3) and by_bin["image_a"].dtype == np.uint8
  assert np.bincount(by_bin["fold"]).tolist() == [60] * 10
  assert by_bin["is_same"].tolist() == ([True] * 30 + [False] * 30) * 10
  listed = face_verification.read_lfw_pairs(
      lfw_dev_dir / "pairs_dev.txt", lfw_dev_dir / "dev_images"
  )
  for i in (0, 299, 599):
    for key, path in (("image_a", listed[i][0]), ("image_b", listed[i][1])):
      np.testing.assert_array_equal(by_bin[key][i], np.asarray(Image.open(path).convert("RGB")))
