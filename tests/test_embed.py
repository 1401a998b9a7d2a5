"""Tests of adam_face.embed and adam_face.verify on a tiny model directory (32x32 input).

Every embedding is checked against embedding.compute_embeddings of images decoded here as the
verification sets decode them (train_input.decode_image, rounded to uint8), so the commands must
read each file to the very pixels of training and evaluation. One batch size and one flip mode
throughout: one program, which every run after the first (the subprocesses too) finds in the
session's compilation cache.
"""

import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from adam_face import embed, embedding, errors, face_detector, model_dir, train_input
from adam_face import verify
from datasets import alignment
from fixtures_data import REPO_ROOT, encoded_image, save_tiny_model

IMAGE_SIZE = 32
BATCH_SIZE = 8  # One image a device of the 8-device mesh.


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
  return save_tiny_model(str(tmp_path_factory.mktemp("model")), IMAGE_SIZE)


@pytest.fixture(scope="module")
def reference(model_path, mesh8):
  """Embeddings of encoded images as compute_embeddings gives them (flip 'sum')."""
  embed_fn = model_dir.load(model_path).embed_fn

  def embeddings_of(encoded: list[bytes]) -> np.ndarray:
    decoded = np.stack(
        [
            tf.cast(
                tf.clip_by_value(tf.round(train_input.decode_image(data, IMAGE_SIZE)), 0, 255),
                tf.uint8,
            ).numpy()
            for data in encoded
        ]
    )
    return embedding.compute_embeddings(
        embed_fn, decoded, batch_size=BATCH_SIZE, mesh=mesh8, flip="sum"
    )

  return embeddings_of


def _write(path, data: bytes) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)
  return str(path)


def _png(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


def _embed(model_path, entries, out, **kwargs):
  return embed.embed_to_file(model_path, entries, str(out), batch_size=BATCH_SIZE, **kwargs)


def test_a_folder_is_embedded_in_natural_order_as_compute_embeddings_embeds_it(
    model_path, reference, tmp_path
):
  folder = tmp_path / "faces"
  files = {  # Aligned crops: 112x112 (resized to the input as training does) or the input size.
      "p2/1.jpg": encoded_image(1, (112, 112)),
      "p2/2.png": encoded_image(2, (112, 112), mode="L", fmt="PNG"),
      "p10/1.png": encoded_image(3, (IMAGE_SIZE, IMAGE_SIZE), fmt="PNG"),
      "p10/3.bmp": encoded_image(4, (112, 112), fmt="BMP"),  # Read by pillow, stored as PNG.
  }
  for name, data in files.items():
    _write(folder / name, data)
  _write(folder / "p2" / "notes.txt", b"not an image")

  written = _embed(model_path, [str(folder)], tmp_path / "out.npz")

  loaded = np.load(tmp_path / "out.npz")
  assert sorted(loaded.files) == ["embeddings", "paths", "skipped"]
  order = ["p2/1.jpg", "p2/2.png", "p10/1.png", "p10/3.bmp"]
  assert list(loaded["paths"]) == [os.path.join(folder, name) for name in order]
  assert loaded["skipped"].shape == (0,)
  assert loaded["embeddings"].dtype == np.float32 and loaded["embeddings"].shape == (4, 32)
  np.testing.assert_allclose(np.linalg.norm(loaded["embeddings"], axis=1), 1.0, atol=1e-6)
  bmp_as_png = _png(np.asarray(Image.open(io.BytesIO(files["p10/3.bmp"])).convert("RGB")))
  expected = reference([files[name] for name in order[:3]] + [bmp_as_png])
  np.testing.assert_allclose(loaded["embeddings"], expected, atol=1e-5)
  np.testing.assert_array_equal(written["embeddings"], loaded["embeddings"])


def test_list_files_and_single_files_keep_their_order(model_path, reference, tmp_path):
  images = [encoded_image(seed, (112, 112)) for seed in range(3)]
  _write(tmp_path / "lists" / "photos" / "a.jpg", images[0])
  _write(tmp_path / "lists" / "photos" / "b.jpg", images[1])
  single = _write(tmp_path / "c.jpg", images[2])
  _write(tmp_path / "lists" / "faces.txt", b"photos/b.jpg\n\nphotos/a.jpg\n")

  written = _embed(
      model_path, [single, str(tmp_path / "lists" / "faces.txt")], tmp_path / "out.npz"
  )

  assert list(written["paths"]) == [
      single,
      str(tmp_path / "lists" / "photos" / "b.jpg"),
      str(tmp_path / "lists" / "photos" / "a.jpg"),
  ]
  np.testing.assert_allclose(
      written["embeddings"], reference([images[2], images[1], images[0]]), atol=1e-5
  )


def test_an_unusable_image_is_named_and_fatal_or_skipped_and_listed(
    model_path, reference, tmp_path
):
  good = _write(tmp_path / "good.jpg", encoded_image(5, (112, 112)))
  corrupt = _write(tmp_path / "corrupt.jpg", encoded_image(6, (112, 112))[:300])
  unaligned = _write(tmp_path / "photo.png", encoded_image(7, (100, 130), fmt="PNG"))

  with pytest.raises(embed.UnusableImageError, match=f"^{re.escape(corrupt)}: cannot decode image"):
    _embed(model_path, [good, corrupt], tmp_path / "fail.npz")
  with pytest.raises(
      embed.UnusableImageError, match=f"^{re.escape(unaligned)}: 100x130 is not an aligned"
  ):
    _embed(model_path, [unaligned], tmp_path / "fail.npz")
  assert not os.path.exists(tmp_path / "fail.npz")

  written = _embed(model_path, [corrupt, good, unaligned], tmp_path / "out.npz", on_error="skip")
  assert list(written["paths"]) == [good]
  assert list(np.load(tmp_path / "out.npz")["skipped"]) == [corrupt, unaligned]
  np.testing.assert_allclose(
      written["embeddings"], reference([encoded_image(5, (112, 112))]), atol=1e-5
  )

  with pytest.raises(errors.RunError, match="none of the 2 images could be used"):
    _embed(model_path, [corrupt, unaligned], tmp_path / "none.npz", on_error="skip")


def test_a_long_run_reads_ahead_in_chunks_and_keeps_every_image_in_order(
    model_path, reference, tmp_path
):
  # 70 images: two chunks of 8 batches of 8, the second partial, a corrupt file in the first.
  encoded = [encoded_image(seed, (IMAGE_SIZE, IMAGE_SIZE), fmt="PNG") for seed in range(70)]
  paths = [_write(tmp_path / f"{i}.png", data) for i, data in enumerate(encoded)]
  _write(tmp_path / "30.png", b"broken")

  written = _embed(model_path, [str(tmp_path)], tmp_path / "out.npz", on_error="skip")

  assert list(written["paths"]) == paths[:30] + paths[31:]
  assert list(written["skipped"]) == [paths[30]]
  np.testing.assert_allclose(
      written["embeddings"], reference(encoded[:30] + encoded[31:]), atol=1e-5
  )


def test_orl_faces_are_aligned_by_the_face_detector_or_resized_whole(
    model_path, reference, orl_dir, tmp_path
):
  """ORL's 92x112 greyscale faces are centred but not aligned to the ArcFace template: without
  landmarks the face detector finds them and they are aligned by its landmarks, unless --resize
  stretches them whole to the input, as training on ORL does."""
  folder = str(orl_dir / "s1")
  names = [f"{i}.pgm" for i in range(1, 11)]
  written = _embed(model_path, [folder], tmp_path / "detected.npz")
  assert list(written["paths"]) == [os.path.join(folder, name) for name in names]
  photos = [Image.open(orl_dir / "s1" / name) for name in names]
  aligned = [
      _png(alignment.align_face(photo, face_detector.detect(photo).landmarks[0], 112))
      for photo in photos
  ]
  np.testing.assert_allclose(written["embeddings"], reference(aligned), atol=1e-5)

  written = _embed(model_path, [folder], tmp_path / "resized.npz", resize=True)
  assert list(written["paths"]) == [os.path.join(folder, name) for name in names]
  # The image_folder builder stores ORL's PGM files as greyscale PNG.
  as_png = [_png(np.asarray(Image.open(orl_dir / "s1" / name))) for name in names]
  np.testing.assert_allclose(written["embeddings"], reference(as_png), atol=1e-5)


def test_landmarks_align_the_image_with_the_arcface_template(model_path, reference, tmp_path):
  photo = encoded_image(9, (160, 140))
  points = np.array([[60.0, 55.0], [98.0, 58.0], [80.0, 78.0], [63.0, 100.0], [95.0, 102.0]])
  aligned = _png(alignment.align_face(Image.open(io.BytesIO(photo)), points, 112))
  expected = reference([aligned])

  # insightface's format, the path relative to the landmarks file (which may hold spaces).
  path = _write(tmp_path / "raw photos" / "n000002" / "0001_01.jpg", photo)
  coordinates = " ".join(f"{v:g}" for v in points.ravel())
  landmarks = tmp_path / "landmarks.txt"
  landmarks.write_text(f"raw photos/n000002/0001_01.jpg {coordinates}\n")
  written = _embed(model_path, [path], tmp_path / "out.npz", landmarks_path=str(landmarks))
  np.testing.assert_allclose(written["embeddings"], expected, atol=1e-5)

  # VGGFace2's loose_landmark csv, rows named <folder>/<stem>.
  csv = tmp_path / "loose_landmark_test.csv"
  header = ",".join(["NAME_ID"] + [f"P{i}{axis}" for i in range(1, 6) for axis in "XY"])
  csv.write_text(f'{header}\n"n000002/0001_01",{coordinates.replace(" ", ",")}\n')
  written = _embed(model_path, [path], tmp_path / "out.npz", landmarks_path=str(csv))
  np.testing.assert_allclose(written["embeddings"], expected, atol=1e-5)

  landmarks.write_text("raw photos/n000002/0001_01.jpg 1 2 3\n")
  with pytest.raises(errors.RunError, match=r"landmarks.txt:1: expected `path x1 y1 \.\.\. x5 y5`"):
    _embed(model_path, [path], tmp_path / "out.npz", landmarks_path=str(landmarks))


@pytest.fixture
def results_json(model_path):
  """A results.json beside the model, as training writes it (json_default turns arrays to lists)."""
  path = os.path.join(model_path, "results.json")
  metrics = {
      "synthetic": {"accuracy": 0.9, "tar@far=1e-3": 0.5, "threshold@far=1e-3": 0.25},
      "orl": {"accuracy": 0.8, "threshold@far=1e-1": 0.5, "fold_threshold": [0.1, 0.2]},
  }
  with open(path, "w") as f:
    json.dump({"step": 10, "metrics": metrics, "best": {}, "table": ""}, f)
  yield path
  os.remove(path)


def test_verify_scores_two_copies_as_the_same(model_path, results_json, tmp_path):
  a = _write(tmp_path / "a.jpg", encoded_image(10, (112, 112)))
  b = _write(tmp_path / "copy" / "a.jpg", encoded_image(10, (112, 112)))

  result = verify.verify_pair(model_path, a, b, threshold_from=results_json, set_name="synthetic")
  assert result["score"] == pytest.approx(1.0, abs=1e-5)
  assert result["same"] and result["threshold"] == 0.25 and result["flip"] == "sum"
  assert result["threshold_source"] == f"synthetic at FAR=1e-3 in {results_json}"
  assert not verify.verify_pair(model_path, a, b, threshold=1.5)["same"]


def test_verify_reads_the_threshold_or_says_what_the_results_hold(model_path, results_json):
  assert verify.threshold_from_results(results_json, "orl", 0.1) == (0.5, "orl")
  with pytest.raises(errors.RunError, match="holds the sets synthetic, orl: pick one with --set"):
    verify.threshold_from_results(results_json, None, 1e-3)
  with pytest.raises(errors.RunError, match="no set 'lfw'; it holds synthetic, orl"):
    verify.threshold_from_results(results_json, "lfw", 1e-3)
  with pytest.raises(errors.RunError, match="no threshold at FAR=1e-2; pass one of 1e-3 with"):
    verify.threshold_from_results(results_json, "synthetic", 1e-2)
  with pytest.raises(errors.RunError, match="either --threshold or --threshold_from"):
    verify.verify_pair(model_path, "a.jpg", "b.jpg")


def test_verify_takes_the_flip_mode_the_threshold_was_found_with(tmp_path, model_path):
  # A training workdir records its verification flip mode in config.json beside results.json.
  (tmp_path / "config.json").write_text(json.dumps({"verification": {"flip": "none"}}))
  (tmp_path / "results.json").write_text(
      json.dumps({"metrics": {"lfw": {"threshold@far=1e-3": 0}}})
  )
  assert embed.recorded_flip(str(tmp_path)) == "none"
  with pytest.raises(errors.RunError, match="--flip=sum, but the threshold .* flip none"):
    verify.verify_pair(
        model_path, "a.jpg", "b.jpg", threshold_from=str(tmp_path / "results.json"), flip="sum"
    )


@pytest.mark.slow  # Two fresh processes importing TensorFlow and jax.
def test_the_commands_run_as_modules(model_path, reference, results_json, tmp_path):
  image = encoded_image(11, (112, 112))
  a = _write(tmp_path / "a.png", image)
  b = _write(tmp_path / "b.jpg", image[:200])
  out = tmp_path / "out.npz"
  commands = {
      "embed": [f"--images={a}", f"--images={b}", f"--out={out}", "--on_error=skip"],
      "verify": [a, a, f"--threshold_from={results_json}", "--set=synthetic", "--far=0.001"],
  }
  # Both at once: most of each run is importing TensorFlow and jax, on one core.
  runs = {
      name: subprocess.Popen(
          [sys.executable, "-m", f"adam_face.{name}", f"--model={model_path}", *args],
          cwd=REPO_ROOT,
          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True,
      )
      for name, args in commands.items()
  }
  (stdout, stderr), (verify_stdout, verify_stderr) = (
      p.communicate(timeout=120) for p in runs.values()
  )

  assert runs["embed"].returncode == 0, stderr
  assert stdout.strip() == f"{out}: 1 embeddings, 1 skipped"
  assert f"Skipping an unusable image: {b}: cannot decode image" in stderr
  loaded = np.load(out)
  assert list(loaded["paths"]) == [a] and list(loaded["skipped"]) == [b]
  np.testing.assert_allclose(loaded["embeddings"], reference([image]), atol=1e-5)

  assert runs["verify"].returncode == 0, verify_stderr
  score_line, decision_line = verify_stdout.strip().splitlines()
  assert score_line == "score 1.0000"
  assert decision_line == (
      f"same (threshold 0.2500: synthetic at FAR=1e-3 in {results_json}; flip sum)"
  )
