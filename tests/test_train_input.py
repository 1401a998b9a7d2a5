"""Training input (train_input): batches, resumption, process shares, augmentation, decoding
exactly as PIL decodes, the fused-batch layout, and identity-folder trees (a tiny one, ORL, LFW)."""

import hashlib
import io
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from adam_face import batch_layout
from adam_face import config_lib
from adam_face import data_builders
from adam_face import pixels
from adam_face import train_input
from datasets import image_folder
from fixtures_data import SMALL_SYNTHETIC, encoded_image


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_batches_shapes_and_normalisation(synthetic_config):
  batch = next(train_input.create_train_iterator(synthetic_config, global_batch_size=6, seed=0))
  assert batch["image"].shape == (6, 16, 16, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (6,) and batch["label"].dtype == np.int32
  assert -1.0 <= batch["image"].min() < -0.5 and 0.5 < batch["image"].max() <= 1.0
  assert set(batch["label"]) <= set(range(5))
  assert data_builders.dataset_info(synthetic_config) == {
      "num_classes": 5,
      "num_examples": 20,
      "num_skipped_images": 0,
      "full_name": "synthetic_faces/ids5x4_heldout4x3_20px_seed0/1.0.0",
  }


def test_resume_yields_the_same_batches(synthetic_config):
  # 20 records, batches of 6: epochs end inside batches 3, 6 and 9.
  fresh = take(train_input.create_train_iterator(synthetic_config, global_batch_size=6, seed=3), 12)
  for start in (1, 4, 10):
    resumed = take(
        train_input.create_train_iterator(
            synthetic_config, global_batch_size=6, seed=3, start_step=start
        ),
        12 - start,
    )
    for a, b in zip(fresh[start:], resumed):
      np.testing.assert_array_equal(a["image"], b["image"])
      np.testing.assert_array_equal(a["label"], b["label"])
  # Every epoch holds each record once, in a new order.
  labels = np.concatenate([b["label"] for b in fresh])[:60].reshape(3, 20)
  for epoch in labels:
    assert np.bincount(epoch).tolist() == [4] * 5
  assert not np.array_equal(labels[0], labels[1])
  other_seed = take(
      train_input.create_train_iterator(synthetic_config, global_batch_size=6, seed=4), 4
  )
  assert not all(np.array_equal(a["label"], b["label"]) for a, b in zip(fresh, other_seed))


def _epoch_digests(dataset, num_batches):
  """Digest of each image of the first num_batches batches (flip off, so images are records)."""
  images = np.concatenate([b["image"] for b in take(dataset.as_numpy_iterator(), num_batches)])
  return [hashlib.sha1(image.tobytes()).hexdigest() for image in images]


def test_processes_read_disjoint_shares(synthetic_config):
  builder = data_builders.prepared_builder(
      "synthetic_faces", data_dir=synthetic_config.data_dir, builder_kwargs=SMALL_SYNTHETIC
  )
  shares = [
      train_input.build_train_dataset(
          builder,
          split="train",
          per_process_batch_size=5,
          seed=0,
          image_size=16,
          augment={"flip": False},
          shuffle_buffer=8,
          process_index=i,
          process_count=2,
      )
      for i in range(2)
  ]
  first, second = (_epoch_digests(share, 2) for share in shares)  # 10 records each = one epoch.
  assert len(set(first)) == len(set(second)) == 10
  assert not set(first) & set(second)
  whole = train_input.build_train_dataset(
      builder,
      split="train",
      per_process_batch_size=20,
      seed=0,
      image_size=16,
      augment={"flip": False},
      shuffle_buffer=8,
      process_index=0,
      process_count=1,
  )
  assert set(_epoch_digests(whole, 1)) == set(first) | set(second)


def test_augmentations_are_keyed_by_position():
  image = tf.constant(np.random.default_rng(0).uniform(0, 255, (8, 8, 3)), tf.float32)
  flipped = [
      train_input.augment_image(image, tf.constant([7, i], tf.int64), {"flip": True})
      for i in range(32)
  ]
  mirrored = [np.array_equal(f.numpy(), image.numpy()[:, ::-1]) for f in flipped]
  same = [np.array_equal(f.numpy(), image.numpy()) for f in flipped]
  assert all(m != s for m, s in zip(mirrored, same)) and 8 < sum(mirrored) < 24
  repeat = train_input.augment_image(image, tf.constant([7, 0], tf.int64), {"flip": True})
  np.testing.assert_array_equal(repeat.numpy(), flipped[0].numpy())
  jitter = {"flip": False, "brightness": 0.2, "contrast": 0.3, "saturation": 0.3}
  jittered = train_input.augment_image(image, tf.constant([1, 2], tf.int64), jitter).numpy()
  assert jittered.min() >= 0 and jittered.max() <= 255 and not np.allclose(jittered, image)
  cropped = [
      train_input.augment_image(image, tf.constant([5, i], tf.int64), {"crop": 0.5}).numpy()
      for i in range(2)
  ]
  assert cropped[0].shape == (8, 8, 3) and not np.allclose(cropped[0], cropped[1])
  assert cropped[0].min() >= image.numpy().min() and cropped[0].max() <= image.numpy().max()
  np.testing.assert_array_equal(
      cropped[0],
      train_input.augment_image(image, tf.constant([5, 0], tf.int64), {"crop": 0.5}).numpy(),
  )
  whole = train_input.augment_image(image, tf.constant([5, 0], tf.int64), {"crop": 1e-9})
  np.testing.assert_allclose(whole.numpy(), image.numpy(), atol=1e-3)
  with pytest.raises(ValueError, match="unknown augmentations \\['blur'\\]"):
    train_input.augment_image(image, tf.constant([1, 2], tf.int64), {"blur": 1.0})


def test_greyscale_and_other_sizes_become_rgb_squares():
  grey = encoded_image(0, size=(30, 40), mode="L", fmt="PNG")
  image = train_input.decode_image(tf.constant(grey), 16).numpy()
  assert image.shape == (16, 16, 3)
  np.testing.assert_array_equal(image[..., 0], image[..., 2])
  same_size = encoded_image(1, size=(16, 16), fmt="PNG")
  np.testing.assert_array_equal(
      train_input.decode_image(tf.constant(same_size), 16).numpy(),
      tf.io.decode_png(same_size).numpy(),
  )


def test_orl_training_view(orl_dir, data_dir):
  config = config_lib.default_dataset_config(
      name="image_folder/orl_s1_s30", data_dir=data_dir, image_size=8
  )
  info = data_builders.dataset_info(config)
  assert (info["num_classes"], info["num_examples"]) == (30, 300)
  batch = next(train_input.create_train_iterator(config, global_batch_size=32, seed=0))
  assert batch["image"].shape == (32, 8, 8, 3) and batch["label"].max() < 30


def _pil_jpeg(array: np.ndarray, quality: int) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="JPEG", quality=quality, subsampling="4:2:0")
  return buffer.getvalue()


def _as_pil_decodes(data: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _tf_decoded(data: bytes) -> np.ndarray:
  """train_input's decode at the image's own size (so no resize): its exact uint8 pixels."""
  height, width = _as_pil_decodes(data).shape[:2]
  assert height == width, "decode_image makes squares; compare at the image's own size"
  decoded = train_input.decode_image(tf.constant(data), height).numpy()
  assert np.array_equal(decoded, np.round(decoded))  # Whole grey levels, not resampled.
  return decoded.astype(np.uint8)


@pytest.mark.parametrize("quality", [95, 75])
def test_jpegs_decode_exactly_as_pil_decodes(quality):
  """TF's default fast IDCT is off by several grey levels on such images; the accurate one that
  decode_image uses gives PIL's (and OpenCV's) pixels exactly, colour and greyscale, at 4:2:0."""
  rng = np.random.default_rng(quality)
  for seed in range(6):
    smooth = np.asarray(
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).resize(
            (112, 112), Image.Resampling.BILINEAR
        ),
        np.int16,
    )
    noisy = np.clip(smooth + rng.integers(-20, 21, smooth.shape), 0, 255).astype(np.uint8)
    for array in (noisy, noisy[:37, :37], noisy[..., 0]):  # Odd sizes, greyscale.
      data = _pil_jpeg(array, quality)
      np.testing.assert_array_equal(_tf_decoded(data), _as_pil_decodes(data))
  fast = tf.io.decode_jpeg(data, channels=3).numpy()  # What tf.io.decode_image gives.
  assert not np.array_equal(fast, _as_pil_decodes(data)), "the check could not tell them apart"


@pytest.mark.slow  # Took about a minute in the full suite on 2 cores (globs the 8k-file tree).
def test_lfw_dev_jpegs_decode_exactly_as_pil_decodes(lfw_dev_dir):
  files = (
      sorted((lfw_dev_dir / "train").glob("*/*.jpg"))[::400]
      + sorted((lfw_dev_dir / "dev_images").glob("*/*.jpg"))[::100]
  )
  assert len(files) >= 20
  for path in files:
    data = path.read_bytes()
    np.testing.assert_array_equal(_tf_decoded(data), _as_pil_decodes(data), err_msg=str(path))


def test_fused_layout_splits_back_into_each_dataset():
  """fuse_datasets puts each device's share of every dataset side by side; split_by_dataset is
  its inverse, for numpy here (tests/test_fusion.py runs it on an 8-device mesh)."""
  parts = [np.arange(16 * 3).reshape(16, 3), 100 + np.arange(8 * 3).reshape(8, 3)]
  fused = batch_layout.fuse_datasets(parts, num_devices=4)
  # Device 0 holds rows 0-3 of dataset 0, then rows 0-1 of dataset 1; device 1 the next ones.
  np.testing.assert_array_equal(fused[:6, 0], [0, 3, 6, 9, 100, 103])
  np.testing.assert_array_equal(fused[6:12, 0], [12, 15, 18, 21, 106, 109])
  for part, split in zip(parts, batch_layout.split_by_dataset(fused, [16, 8], num_devices=4)):
    np.testing.assert_array_equal(split, part)
  assert batch_layout.split_by_dataset(parts[0], [16], num_devices=4)[0] is parts[0]


def test_the_training_step_imports_without_tensorflow():
  """The step and its benchmarks run where TensorFlow is not installed (the GPU machines the
  benchmarks are measured on): train_step reads the batch layout from batch_layout, not from
  train_input, and config_lib imports the verification sets only where it reads them."""
  blocker = (
      "import sys\n"
      "class Block:\n"
      "  def find_spec(self, name, path=None, target=None):\n"
      "    if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets', 'clu'):\n"
      "      raise ImportError('blocked: ' + name)\n"
      "sys.meta_path.insert(0, Block())\n"
      "import adam_face.train_step, benchmarks.bench_partial_fc, benchmarks.bench_train_step\n"
  )
  root = pathlib.Path(__file__).resolve().parents[1]
  result = subprocess.run(
      [sys.executable, "-c", blocker], cwd=root, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0, result.stderr[-2000:]


def test_lfw_dev_train_tree_through_image_folder(lfw_dev_dir, data_dir):
  """lfw_dev/train reads as an identity-folder tree through config alone (dataset.name =
  'image_folder', builder_kwargs root=...): the whole scan, and a build of 25 identities whose
  training images are the files' own pixels."""
  root = lfw_dev_dir / "train"
  scanned = image_folder.scan_identity_folders(root)
  assert (len(scanned), sum(len(files) for _, files in scanned)) == (3973, 7977)
  chosen = scanned[:24] + [next(s for s in scanned if s[0] == "Colin_Powell")]
  config = config_lib.default_dataset_config(
      name="image_folder",
      data_dir=data_dir,
      image_size=112,
      augment={"flip": False},
      builder_kwargs={"root": str(root), "identities": [name for name, _ in chosen]},
  )
  info = data_builders.dataset_info(config)
  num_images = sum(len(files) for _, files in chosen)
  assert (info["num_classes"], info["num_examples"], info["num_skipped_images"]) == (
      25,
      num_images,
      0,
  )
  expected = {
      (label, _as_pil_decodes(path.read_bytes()).tobytes())
      for label, (_, files) in enumerate(chosen)
      for path in files
  }
  batch = next(train_input.create_train_iterator(config, global_batch_size=64, seed=0))
  # Rounded: dividing by 127.5 and multiplying back is exact only to float32 rounding.
  values = np.round(batch["image"] * pixels.PIXEL_SCALE + pixels.PIXEL_MEAN)
  for image, label in zip(values, batch["label"]):
    assert (int(label), image.astype(np.uint8).tobytes()) in expected
