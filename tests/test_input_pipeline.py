"""The training and verification input pipelines on tiny synthetic data, a tiny tree and ORL."""

import hashlib

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from adam_face import input_pipeline
from datasets import image_folder
from test_datasets import encoded_image
from test_datasets import python2_pair_bin

SMALL_SYNTHETIC = dict(
  num_identities=5,
  images_per_identity=4,
  num_heldout_identities=4,
  heldout_images_per_identity=3,
  image_size=20,
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def synthetic_config(data_dir):
  """20 training images of 5 identities at 20x20, read at 16x16 (so resizing is exercised)."""
  config = input_pipeline.default_dataset_config(
    data_dir=data_dir, image_size=16, shuffle_buffer=8, builder_kwargs=SMALL_SYNTHETIC
  )
  input_pipeline.dataset_info(config)  # Prepares it once for the module.
  return config


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_batches_shapes_and_normalisation(synthetic_config):
  batch = next(input_pipeline.create_train_iterator(synthetic_config, global_batch_size=6, seed=0))
  assert batch["image"].shape == (6, 16, 16, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (6,) and batch["label"].dtype == np.int32
  assert -127.5 / 128 <= batch["image"].min() < -0.5 and 0.5 < batch["image"].max() <= 1.0
  assert set(batch["label"]) <= set(range(5))
  assert input_pipeline.dataset_info(synthetic_config) == {
    "num_classes": 5,
    "num_examples": 20,
    "num_skipped_images": 0,
    "full_name": "synthetic_faces/ids5x4_heldout4x3_20px_seed0/1.0.0",
  }


def test_resume_yields_the_same_batches(synthetic_config):
  # 20 records, batches of 6: epochs end inside batches 3, 6 and 9.
  fresh = take(
    input_pipeline.create_train_iterator(synthetic_config, global_batch_size=6, seed=3), 12
  )
  for start in (1, 4, 10):
    resumed = take(
      input_pipeline.create_train_iterator(
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
    input_pipeline.create_train_iterator(synthetic_config, global_batch_size=6, seed=4), 4
  )
  assert not all(np.array_equal(a["label"], b["label"]) for a, b in zip(fresh, other_seed))


def _epoch_digests(dataset, num_batches):
  """Digest of each image of the first num_batches batches (flip off, so images are records)."""
  images = np.concatenate([b["image"] for b in take(dataset.as_numpy_iterator(), num_batches)])
  return [hashlib.sha1(image.tobytes()).hexdigest() for image in images]


def test_processes_read_disjoint_shares(synthetic_config):
  builder = input_pipeline.prepared_builder(
    "synthetic_faces", data_dir=synthetic_config.data_dir, builder_kwargs=SMALL_SYNTHETIC
  )
  shares = [
    input_pipeline.build_train_dataset(
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
  whole = input_pipeline.build_train_dataset(
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
    input_pipeline.augment_image(image, tf.constant([7, i], tf.int64), {"flip": True})
    for i in range(32)
  ]
  mirrored = [np.array_equal(f.numpy(), image.numpy()[:, ::-1]) for f in flipped]
  same = [np.array_equal(f.numpy(), image.numpy()) for f in flipped]
  assert all(m != s for m, s in zip(mirrored, same)) and 8 < sum(mirrored) < 24
  repeat = input_pipeline.augment_image(image, tf.constant([7, 0], tf.int64), {"flip": True})
  np.testing.assert_array_equal(repeat.numpy(), flipped[0].numpy())
  jitter = {"flip": False, "brightness": 0.2, "contrast": 0.3, "saturation": 0.3}
  jittered = input_pipeline.augment_image(image, tf.constant([1, 2], tf.int64), jitter).numpy()
  assert jittered.min() >= 0 and jittered.max() <= 255 and not np.allclose(jittered, image)
  cropped = [
    input_pipeline.augment_image(image, tf.constant([5, i], tf.int64), {"crop": 0.5}).numpy()
    for i in range(2)
  ]
  assert cropped[0].shape == (8, 8, 3) and not np.allclose(cropped[0], cropped[1])
  assert cropped[0].min() >= image.numpy().min() and cropped[0].max() <= image.numpy().max()
  np.testing.assert_array_equal(
    cropped[0],
    input_pipeline.augment_image(image, tf.constant([5, 0], tf.int64), {"crop": 0.5}).numpy(),
  )
  whole = input_pipeline.augment_image(image, tf.constant([5, 0], tf.int64), {"crop": 1e-9})
  np.testing.assert_allclose(whole.numpy(), image.numpy(), atol=1e-3)
  with pytest.raises(ValueError, match="unknown augmentations \\['blur'\\]"):
    input_pipeline.augment_image(image, tf.constant([1, 2], tf.int64), {"blur": 1.0})


def test_greyscale_and_other_sizes_become_rgb_squares():
  grey = encoded_image(0, size=(30, 40), mode="L", fmt="PNG")
  image = input_pipeline.decode_image(tf.constant(grey), 16).numpy()
  assert image.shape == (16, 16, 3)
  np.testing.assert_array_equal(image[..., 0], image[..., 2])
  same_size = encoded_image(1, size=(16, 16), fmt="PNG")
  np.testing.assert_array_equal(
    input_pipeline.decode_image(tf.constant(same_size), 16).numpy(),
    tf.io.decode_png(same_size).numpy(),
  )


def test_missing_dataset_says_what_to_put_where(tmp_path):
  config = input_pipeline.default_dataset_config(
    name="vggface2", data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "empty")
  )
  expected = r"(?s)/empty does not exist or is empty.*faces_vgg2_112x112 .*train\.rec"
  with pytest.raises(FileNotFoundError, match=expected):
    input_pipeline.create_train_iterator(config, global_batch_size=4, seed=0)


def test_empty_dirs_mean_tfds_defaults(tmp_path, monkeypatch):
  # TFDS reads its default data dir when called, so the test can point it at tmp_path.
  monkeypatch.setattr(tfds.core.constants, "DATA_DIR", str(tmp_path / "default"))
  monkeypatch.chdir(tmp_path)
  expected = f"{tmp_path / 'default' / 'downloads' / 'manual'} does not exist"
  with pytest.raises(FileNotFoundError, match=expected):
    input_pipeline.prepared_builder("vggface2", data_dir="", manual_dir="")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["default"]


def test_skipped_images_are_counted(tmp_path):
  for name, data in {
    "a/1.jpg": encoded_image(0),
    "a/2.jpg": encoded_image(1),
    "b/1.jpg": encoded_image(2),
    "b/2.jpg": b"garbage",
  }.items():
    (tmp_path / "tree" / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "tree" / name).write_bytes(data)
  config = input_pipeline.default_dataset_config(
    name="image_folder",
    data_dir=str(tmp_path / "tfds"),
    image_size=8,
    builder_kwargs={"root": str(tmp_path / "tree")},
  )
  info = input_pipeline.dataset_info(config)
  assert (info["num_classes"], info["num_examples"], info["num_skipped_images"]) == (2, 3, 1)


def test_synthetic_verification_set(synthetic_config):
  pairs = input_pipeline.load_verification_set(
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
  pairs = input_pipeline.load_verification_set(
    "agedb_30", data_dir=str(tmp_path / "tfds"), image_size=112, manual_dir=str(tmp_path / "manual")
  )
  assert pairs["is_same"].tolist() == [True, False, True, False]
  assert pairs["fold"].tolist() == [0, 1, 2, 3]
  expected = tf.io.decode_jpeg(bins[2]).numpy()
  np.testing.assert_array_equal(pairs["image_a"][1], expected)
  with pytest.raises(ValueError, match="unknown verification set 'megaface'"):
    input_pipeline.load_verification_set("megaface")


def test_orl_verification_set(orl_dir, data_dir):
  assert image_folder.orl_faces_dir().resolve() == orl_dir.resolve()
  pairs = input_pipeline.load_verification_set("orl", data_dir=data_dir, image_size=8)
  assert pairs["image_a"].shape == (900, 8, 8, 3)
  assert pairs["is_same"].sum() == 450 and (~pairs["is_same"]).sum() == 450
  assert np.bincount(pairs["fold"]).tolist() == [90] * 10
  assert np.bincount(pairs["fold"][pairs["is_same"]]).tolist() == [45] * 10


def test_orl_training_view(orl_dir, data_dir):
  config = input_pipeline.default_dataset_config(
    name="image_folder/orl_s1_s30", data_dir=data_dir, image_size=8
  )
  info = input_pipeline.dataset_info(config)
  assert (info["num_classes"], info["num_examples"]) == (30, 300)
  batch = next(input_pipeline.create_train_iterator(config, global_batch_size=32, seed=0))
  assert batch["image"].shape == (32, 8, 8, 3) and batch["label"].max() < 30
