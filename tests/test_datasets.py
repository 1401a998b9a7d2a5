"""Every TFDS builder, prepared without network from tiny fixtures written here (and the ORL faces).

Each builder is prepared once per module (module-scoped fixtures) into this module's data_dir.
"""

import io
import pickle

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from datasets import alignment
from datasets import face_verification
from datasets import image_folder
from datasets import images
from datasets import pairs
from datasets import synthetic_faces
from datasets import vggface2
from fixtures_data import MAGIC_WORD
from fixtures_data import encode_record
from fixtures_data import encoded_image
from fixtures_data import image_payload
from fixtures_data import meta_payload
from fixtures_data import python2_pair_bin
from fixtures_data import write_recordio


def prepare(name, data_dir, manual_dir=None, **kwargs):
  builder = tfds.builder(name, data_dir=data_dir, try_gcs=False, **kwargs)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)
  )
  return builder


def examples(builder, split="train"):
  return list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


# ----------------------------------------------------------------------------------- RecordIO


@pytest.fixture(scope="module")
def recordio_manual_dir(tmp_path_factory):
  """3 classes, 6 image records: one undecodable, one a 100x100 PNG, one carrying the magic
  word at an aligned offset of its payload (so it is split on disk)."""
  root = tmp_path_factory.mktemp("recordio")
  labels = [0, 0, 1, 1, 2, 2]
  bodies = [encoded_image(i) for i in range(6)]
  bodies[2] = b"this is not an image"
  bodies[4] = encoded_image(4, size=(100, 100), fmt="PNG")
  records = {0: meta_payload(num_images=6, num_identities=3)}
  for key, (label, body) in enumerate(zip(labels, bodies), start=1):
    records[key] = image_payload(label if key != 6 else [label, 0.5], body, record_id=key)
  # Trailing bytes after a JPEG's end marker are ignored by decoders; put the magic word there.
  payload = records[1]
  records[1] = payload + b"\x00" * ((-len(payload)) % 4) + MAGIC_WORD + b"tail"
  assert encode_record(records[1]).count(MAGIC_WORD) == 2  # It is split in two parts.
  records.update(
      {7: image_payload([1, 3], b""), 8: image_payload([3, 5], b""), 9: image_payload([5, 7], b"")}
  )
  write_recordio(root / "train.rec", root / "train.idx", records)
  (root / "property").write_text("3,112,112")
  return root


@pytest.fixture(scope="module", params=["casia_webface/recordio", "vggface2/recordio"])
def recordio_builder(request, data_dir, recordio_manual_dir):
  return prepare(request.param, data_dir, recordio_manual_dir)


def test_recordio_builder(recordio_builder, recordio_manual_dir):
  info = recordio_builder.info
  assert info.features["label"].num_classes == 3
  assert info.splits["train"].num_examples == 5
  assert info.metadata["num_skipped_images"] == {"train": 1}
  assert info.metadata["skipped_images"] == {
      "train": [f"{recordio_manual_dir / 'train.rec'} record 3"]
  }
  rows = examples(recordio_builder)
  assert sorted(r["label"] for r in rows) == [0, 0, 1, 2, 2]
  assert all(r["image"].shape == (112, 112, 3) and r["image"].dtype == np.uint8 for r in rows)


def test_recordio_label_outside_num_classes_is_refused(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  write_recordio(
      manual / "train.rec",
      manual / "train.idx",
      {
          0: meta_payload(2, 2),
          1: image_payload(0, encoded_image(0)),
          2: image_payload(2, encoded_image(1)),
      },
  )
  (manual / "property").write_text("2,112,112")
  with pytest.raises(ValueError, match=r"record 2: label 2.0 is not a class in \[0, 2\)"):
    prepare("casia_webface/recordio", tmp_path / "tfds", manual)


def test_missing_manual_data_says_what_to_put_where(tmp_path):
  with pytest.raises(FileNotFoundError, match="train.rec"):
    prepare("casia_webface/recordio", tmp_path / "tfds", tmp_path / "nothing_here")
  manual = tmp_path / "partial"
  manual.mkdir()
  (manual / "train.rec").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match=r"missing .*train.idx, .*property\. .*faces_webf"):
    prepare("casia_webface/recordio", tmp_path / "tfds", manual)
  with pytest.raises(FileNotFoundError, match="bb_landmark/loose_landmark_train.csv"):
    prepare("vggface2/folder", tmp_path / "tfds", manual)


# ------------------------------------------------------------------------------ Folder releases


def test_casia_folder_release(tmp_path_factory, data_dir):
  manual = tmp_path_factory.mktemp("casia")
  for identity, seeds in {"0000045": [0, 1], "0000099": [2]}.items():
    folder = manual / "CASIA-WebFace" / identity
    folder.mkdir(parents=True)
    for n, seed in enumerate(seeds, start=1):
      (folder / f"{n:03d}.jpg").write_bytes(encoded_image(seed, size=(250, 250)))
  (manual / "CASIA-WebFace" / "0000099" / "002.jpg").write_bytes(encoded_image(3)[:300])
  builder = prepare("casia_webface/folder", data_dir, manual)
  assert builder.info.features["label"].names == ["0000045", "0000099"]
  assert builder.info.splits["train"].num_examples == 3
  assert builder.info.metadata["num_skipped_images"] == {"train": 1}
  assert builder.info.metadata["skipped_images"]["train"][0].endswith("0000099/002.jpg")
  assert all(r["image"].shape == (112, 112, 3) for r in examples(builder))


def test_vggface2_folder_release_aligns_with_landmarks(tmp_path_factory, data_dir):
  manual = tmp_path_factory.mktemp("vgg")
  (manual / "bb_landmark").mkdir()
  rows = ["NAME_ID,P1X,P1Y,P2X,P2Y,P3X,P3Y,P4X,P4Y,P5X,P5Y"]
  for identity in ("n000002", "n000010"):
    (manual / "train" / identity).mkdir(parents=True)
    for n in (1, 2):
      (manual / "train" / identity / f"000{n}_01.jpg").write_bytes(
          encoded_image(n, size=(180, 220))
      )
      if (identity, n) != ("n000010", 2):
        points = alignment.ARCFACE_TEMPLATE_112 * 1.5 + [10, 20]
        rows.append(f"{identity}/000{n}_01," + ",".join(f"{v:.3f}" for v in points.ravel()))
  (manual / "bb_landmark" / "loose_landmark_train.csv").write_text("\n".join(rows) + "\n")
  builder = prepare("vggface2/folder", data_dir, manual)
  assert builder.info.features["label"].names == ["n000002", "n000010"]
  assert builder.info.splits["train"].num_examples == 4
  assert builder.info.metadata["num_unaligned_images"] == {"train": 1}
  assert all(r["image"].shape == (112, 112, 3) for r in examples(builder))


def test_landmark_table(tmp_path):
  path = tmp_path / "landmarks.csv"
  path.write_text(
      "NAME_ID,P1X,P1Y,P2X,P2Y,P3X,P3Y,P4X,P4Y,P5X,P5Y\n"
      "n2/0002_01,1,2,3,4,5,6,7,8,9,10\nn1/0001_01,0,0,0,0,0,0,0,0,0,1\n"
  )
  table = vggface2.LandmarkTable(path)
  np.testing.assert_array_equal(table.get("n2/0002_01"), np.arange(1, 11).reshape(5, 2))
  assert table.get("n1/0001_01")[4, 1] == 1
  assert table.get("n3/0001_01") is None
  path.write_text("name,x\n")
  with pytest.raises(ValueError, match="NAME_ID"):
    vggface2.LandmarkTable(path)


def test_alignment_maps_landmarks_onto_the_template():
  # A similarity transform is recovered exactly from exact correspondences.
  angle, scale, shift = 0.3, 1.7, np.array([5.0, -3.0])
  rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  src = alignment.ARCFACE_TEMPLATE_112
  dst = src @ (scale * rotation).T + shift
  np.testing.assert_allclose(
      alignment.similarity_transform(src, dst), np.c_[scale * rotation, shift], atol=1e-9
  )
  # Bright dots drawn at landmarks in a big rotated face land on the template after alignment.
  landmarks = (src - 56) @ (2.0 * rotation).T + [150, 160]
  canvas = np.zeros((320, 300), np.uint8)
  for x, y in landmarks:
    canvas[int(round(y)) - 2 : int(round(y)) + 3, int(round(x)) - 2 : int(round(x)) + 3] = 255
  aligned = alignment.align_face(Image.fromarray(canvas), landmarks)
  assert aligned.shape == (112, 112, 3)
  for x, y in alignment.ARCFACE_TEMPLATE_112:
    assert aligned[int(round(y)), int(round(x)), 0] > 128
  assert aligned[..., 0].mean() < 30  # Only the dots are bright.


# --------------------------------------------------------------------------------- image_folder


@pytest.fixture(scope="module")
def mixed_tree(tmp_path_factory):
  """Identities s2, s10 and bob (natural order: bob, s2, s10) in several formats, one corrupt
  file, a text file, an empty identity folder."""
  root = tmp_path_factory.mktemp("tree")
  files = {
      "s10/a.jpg": encoded_image(0, (64, 48)),
      "s10/b.png": encoded_image(1, (30, 40), mode="L", fmt="PNG"),
      "s2/1.pgm": encoded_image(2, (92, 112), mode="L", fmt="PPM"),
      "s2/2.jpg": encoded_image(3, (16, 16)),
      "s2/notes.txt": b"not an image",
      "bob/x.jpg": b"\xff\xd8 truncated",
      "bob/y.bmp": encoded_image(4, (20, 20), fmt="BMP"),
  }
  for name, data in files.items():
    (root / name).parent.mkdir(exist_ok=True)
    (root / name).write_bytes(data)
  (root / "empty").mkdir()
  (root / "README").write_text("a file at the top is not an identity")
  return root


def test_image_folder_any_tree(mixed_tree, data_dir):
  builder = prepare("image_folder", data_dir, root=mixed_tree)
  assert builder.info.features["label"].names == ["bob", "s2", "s10"]
  assert builder.info.splits["train"].num_examples == 5
  assert builder.info.metadata["num_skipped_images"] == {"train": 1}
  rows = examples(builder)
  assert sorted(r["label"] for r in rows) == [0, 1, 1, 2, 2]
  shapes = sorted(r["image"].shape for r in rows)
  assert shapes == [(16, 16, 3), (20, 20, 3), (40, 30, 3), (48, 64, 3), (112, 92, 3)]
  # Another selection of the same root is another config, prepared separately.
  subset = prepare("image_folder", data_dir, root=mixed_tree, identities=["s10"])
  assert subset.info.config_name != builder.info.config_name
  assert subset.info.splits["train"].num_examples == 2
  with pytest.raises(FileNotFoundError, match="no identity folder carol"):
    prepare("image_folder", data_dir, root=mixed_tree, identities=["carol"])


def test_storable_bytes_keeps_tf_formats_and_converts_others():
  jpeg = encoded_image(0, (8, 8))
  assert images.storable_bytes(jpeg, images.decode(jpeg, "a")) is jpeg
  pgm = encoded_image(0, (8, 8), mode="L", fmt="PPM")
  png = images.storable_bytes(pgm, images.decode(pgm, "b"))
  assert Image.open(io.BytesIO(png)).format == "PNG"
  with pytest.raises(images.UndecodableImageError, match="^c: cannot decode"):
    images.decode(jpeg[:40], "c")
  buffer = io.BytesIO()
  Image.fromarray(np.full((4, 4), 40000, np.uint16)).save(buffer, format="PNG")
  with pytest.raises(images.UndecodableImageError, match="unsupported pixel mode I;16"):
    images.decode(buffer.getvalue(), "d")


def test_orl_faces(orl_dir, data_dir):
  builder = prepare("image_folder", data_dir, root=orl_dir)
  assert builder.info.splits["train"].num_examples == 400
  assert builder.info.features["label"].num_classes == 40
  assert builder.info.features["label"].names == [f"s{i}" for i in range(1, 41)]
  assert np.bincount([r["label"] for r in examples(builder)]).tolist() == [10] * 40
  assert image_folder.orl_faces_dir().resolve() == orl_dir.resolve()
  train_view = prepare("image_folder/orl_s1_s30", data_dir)
  assert train_view.info.splits["train"].num_examples == 300
  assert train_view.info.features["label"].names == [f"s{i}" for i in range(1, 31)]


# ---------------------------------------------------------------------------- face_verification


@pytest.fixture(scope="module")
def verification_manual_dir(tmp_path_factory):
  """lfw.bin as Python 2 wrote it (20 pairs), cfp_fp.bin as a Python 3 pickle of numpy arrays
  (10 pairs). (A corrupt image is an error: tests/test_faults.py.)"""
  root = tmp_path_factory.mktemp("bins")
  bins = [encoded_image(i) for i in range(40)]
  issame = [i % 3 == 0 for i in range(20)]
  (root / "lfw.bin").write_bytes(python2_pair_bin(bins, issame))
  arrays = [np.frombuffer(encoded_image(100 + i), np.uint8) for i in range(20)]
  with open(root / "cfp_fp.bin", "wb") as f:
    pickle.dump((arrays, np.array([i < 5 for i in range(10)])), f)
  return root


def test_python2_pickle_needs_bytes_encoding(verification_manual_dir):
  data = (verification_manual_dir / "lfw.bin").read_bytes()
  with pytest.raises(UnicodeDecodeError):
    pickle.loads(data)  # What a naive reader does.
  bins, issame = face_verification.load_pair_bin(verification_manual_dir / "lfw.bin")
  assert bins[0] == encoded_image(0) and len(bins) == 40 and issame.sum() == 7


def test_verification_bin(verification_manual_dir, data_dir):
  builder = prepare("face_verification/lfw", data_dir, verification_manual_dir)
  rows = examples(builder, "test")
  # Source order is kept; 20 pairs made 10 folds of 2.
  assert [bool(r["is_same"]) for r in rows] == [i % 3 == 0 for i in range(20)]
  assert [int(r["fold"]) for r in rows] == [i // 2 for i in range(20)]
  assert rows[0]["image_a"].shape == (112, 112, 3)

  cfp = examples(prepare("face_verification/cfp_fp", data_dir, verification_manual_dir), "test")
  assert [bool(r["is_same"]) for r in cfp] == [True] * 5 + [False] * 5
  assert [int(r["fold"]) for r in cfp] == list(range(10))


def test_verification_bin_is_checked(tmp_path, verification_manual_dir, data_dir):
  with pytest.raises(FileNotFoundError, match="cfp_ff.bin"):
    prepare("face_verification/cfp_ff", data_dir, verification_manual_dir)
  evil = tmp_path / "evil.bin"
  evil.write_bytes(pickle.dumps((__import__("os").getcwd, [])))
  with pytest.raises(pickle.UnpicklingError, match="posix.getcwd is not allowed"):
    face_verification.load_pair_bin(evil)
  odd = tmp_path / "odd.bin"
  odd.write_bytes(python2_pair_bin([b"a", b"b", b"c"], [True, False]))
  with pytest.raises(ValueError, match="3 images for 2 pairs"):
    face_verification.load_pair_bin(odd)
  assert face_verification.consecutive_folds(23, 10).tolist() == (
      [0] * 3 + [1] * 3 + [2] * 3 + sum(([f] * 2 for f in range(3, 10)), [])
  )


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_verification_bin_of_every_python3_protocol(tmp_path, protocol):
  """Protocols 0-2 store bytes as _codecs.encode(str, 'latin1') (b'' as bytes()), 5 stores numpy
  arrays through _frombuffer: a .bin any Python 3 wrote loads."""
  bins = [encoded_image(0), b"", bytes(range(256)), encoded_image(1)]
  path = tmp_path / "any.bin"
  path.write_bytes(pickle.dumps((bins, [True, False]), protocol=protocol))
  loaded, issame = face_verification.load_pair_bin(path)
  assert loaded == bins and issame.tolist() == [True, False]
  arrays = [np.frombuffer(b, np.uint8) for b in bins]
  path.write_bytes(pickle.dumps((arrays, np.array([False, True])), protocol=protocol))
  loaded, issame = face_verification.load_pair_bin(path)
  assert loaded == bins and issame.tolist() == [False, True]


@pytest.mark.parametrize(
    "payload, message",
    [
        (
            b"c_codecs\nencode\n(Vabc\nVrot13\ntR.",
            r"encode\(str, 'latin1'\).* encode\(str, 'rot13'\)",
        ),
        (b"c_codecs\nencode\n(C\x03abcVzlib_codec\ntR.", r"got encode\(bytes, 'zlib_codec'\)"),
        (b"c__builtin__\nbytes\n(I1000000000\ntR.", r"only as bytes\(\)"),
        (b"c_codecs\ndecode\n(C\x03abcVlatin1\ntR.", r"_codecs.decode is not allowed"),
    ],
)
def test_verification_bin_allows_the_bytes_globals_only_as_pickle_calls_them(
    tmp_path, payload, message
):
  evil = tmp_path / "evil.bin"
  evil.write_bytes(payload)
  with pytest.raises(pickle.UnpicklingError, match=message):
    face_verification.load_pair_bin(evil)


def test_lfw_original_layout(tmp_path_factory):
  manual = tmp_path_factory.mktemp("lfw")
  counts = {"Alice_Smith": 3, "Bob": 2, "Carol": 2}
  for name, n in counts.items():
    (manual / "lfw" / name).mkdir(parents=True)
    for i in range(1, n + 1):
      (manual / "lfw" / name / f"{name}_{i:04d}.jpg").write_bytes(encoded_image(i, (250, 250)))
  (manual / "pairs.txt").write_text(
      "2\t2\nAlice_Smith\t1\t2\nBob\t1\t2\nAlice_Smith\t1\tBob\t1\nBob\t2\tCarol\t1\n"
      "Alice_Smith\t2\t3\nCarol\t1\t2\nCarol\t2\tAlice_Smith\t3\nBob\t1\tCarol\t2\n"
  )
  builder = prepare("face_verification/lfw", tmp_path_factory.mktemp("tfds"), manual)
  rows = examples(builder, "test")
  assert [bool(r["is_same"]) for r in rows] == [True, True, False, False] * 2
  assert [int(r["fold"]) for r in rows] == [0] * 4 + [1] * 4
  assert rows[0]["image_a"].shape == (250, 250, 3)
  (manual / "pairs.txt").write_text("1\t1\nAlice_Smith\t1\t9\nBob\t1\tCarol\t1\n")
  with pytest.raises(FileNotFoundError, match="Alice_Smith_0009.jpg"):
    face_verification.read_lfw_pairs(manual / "pairs.txt", manual / "lfw")


# ------------------------------------------------------------------------------ synthetic_faces

SMALL_SYNTHETIC = dict(
    num_identities=6,
    images_per_identity=3,
    num_heldout_identities=3,
    heldout_images_per_identity=2,
    image_size=24,
)


def test_synthetic_faces(data_dir):
  builder = prepare("synthetic_faces", data_dir, **SMALL_SYNTHETIC)
  assert builder.info.features["label"].num_classes == 6
  train, heldout = examples(builder, "train"), examples(builder, "heldout")
  assert np.bincount([r["label"] for r in train]).tolist() == [3] * 6
  assert {int(r["label"]) for r in heldout} == {-1}
  assert sorted(int(r["identity"]) for r in heldout) == [6, 6, 7, 7, 8, 8]
  assert train[0]["image"].shape == (24, 24, 3)
  with pytest.raises(ValueError, match="heldout_images_per_identity must be >= 2"):
    tfds.builder("synthetic_faces", heldout_images_per_identity=1)


def test_synthetic_images_are_deterministic_and_varied():
  first = synthetic_faces.identity_images(0, 3, 2, 32)
  again = synthetic_faces.identity_images(0, 3, 2, 32)
  other = synthetic_faces.identity_images(0, 4, 1, 32)
  reseeded = synthetic_faces.identity_images(1, 3, 1, 32)
  np.testing.assert_array_equal(first[0], again[0])
  for image in (first[1], other[0], reseeded[0]):
    assert np.abs(image.astype(int) - first[0]).mean() > 10


def test_synthetic_identity_is_learnable_but_not_from_raw_pixels():
  """Raw pixels barely tell held-out identities apart; a projection fitted on training
  identities (a linear stand-in for a trained network) does much better."""
  size, train_ids, heldout_ids = 16, 60, 12
  x_train = np.array(
      [im for i in range(train_ids) for im in synthetic_faces.identity_images(0, i, 8, size)],
      np.float64,
  )
  y_train = np.repeat(np.arange(train_ids), 8)
  x_test = np.array(
      [
          im
          for i in range(train_ids, train_ids + heldout_ids)
          for im in synthetic_faces.identity_images(0, i, 6, size)
      ],
      np.float64,
  )
  y_test = np.repeat(np.arange(heldout_ids), 6)
  x_train, x_test = x_train.reshape(len(x_train), -1), x_test.reshape(len(x_test), -1)
  mean = x_train.mean(0)
  # Fisher discriminant on a PCA basis: directions that separate training identities.
  basis = np.linalg.svd(x_train - mean, full_matrices=False)[2][:100].T
  z = (x_train - mean) @ basis
  centroids = np.array([z[y_train == c].mean(0) for c in range(train_ids)])
  within = np.cov((z - centroids[y_train]).T) + 1e-3 * np.eye(100)
  between = np.cov(centroids.T)
  whiten = np.linalg.inv(np.linalg.cholesky(within)).T
  directions = np.linalg.eigh(whiten.T @ between @ whiten)[1][:, -40:]
  projection = basis @ whiten @ directions

  chosen = pairs.make_pairs(y_test, num_impostor_pairs=heldout_ids * 15)

  def accuracy(embeddings):
    e = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    score = (e[chosen["index_a"]] * e[chosen["index_b"]]).sum(1)
    best = max(np.mean((score > t) == chosen["is_same"]) for t in score)
    return best

  raw = accuracy(x_test - mean)
  fitted = accuracy((x_test - mean) @ projection)
  assert raw < 0.7
  assert fitted > raw + 0.1


# ---------------------------------------------------------------------------------------- pairs


def test_make_pairs_all_and_sampled():
  identities = np.repeat(np.arange(10), 10)  # The ORL protocol: 10 people x 10 images.
  chosen = pairs.make_pairs(identities)
  assert chosen["is_same"].sum() == 450 and (~chosen["is_same"]).sum() == 4500
  np.testing.assert_array_equal(
      identities[chosen["index_a"]] == identities[chosen["index_b"]], chosen["is_same"]
  )
  assert len({(a, b) for a, b in zip(chosen["index_a"], chosen["index_b"])}) == 4950
  for fold in range(10):
    in_fold = chosen["fold"] == fold
    assert chosen["is_same"][in_fold].sum() == 45 and in_fold.sum() == 495
  assert np.all(np.diff(chosen["fold"]) >= 0)
  sampled = pairs.make_pairs(identities, num_impostor_pairs=450, seed=3)
  assert (~sampled["is_same"]).sum() == 450
  again = pairs.make_pairs(identities, num_impostor_pairs=450, seed=3)
  np.testing.assert_array_equal(sampled["index_a"], again["index_a"])
  with pytest.raises(ValueError, match="genuine and impostor"):
    pairs.make_pairs(np.arange(5))
