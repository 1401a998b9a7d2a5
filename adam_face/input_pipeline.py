"""Input pipelines: training batches from a TFDS identity dataset, and verification pair sets.

Training (create_train_iterator) reads this process's share of the split, shuffles it afresh each
epoch, decodes, converts to 3-channel image_size x image_size, augments, normalises to
(x - 127.5) / 128 and batches to the per-process batch. Its order is a pure function of (seed,
process, step), so a run resumed at step k sees exactly the batches it would have seen:

  * epoch e is the process's records shuffled with a seed drawn from (seed, e), so skipping whole
    epochs costs nothing and only the records of the current epoch before step k are read again
    (still undecoded) to reach k;
  * every random augmentation is a stateless op keyed by (seed, process, position in the stream),
    never by a stateful generator whose state would be lost at a restart.
TF's shuffle mixes in TF's global seed, so a resumed run must set it (tf.random.set_seed) exactly
as the original did, or not at all.

dataset_config fields read (an ml_collections.ConfigDict; default_dataset_config() makes one):
  name            TFDS builder name, with config if any: 'synthetic_faces',
                  'image_folder/orl_s1_s30', 'casia_webface', 'vggface2/folder', ...
  data_dir        TFDS data directory; None or "" for TFDS's default ($TFDS_DATA_DIR or
                  ~/tensorflow_datasets).
  split           the split to train on, e.g. 'train' or 'train[:90%]'.
  image_size      side of the square images produced.
  augment         flip (bool): random horizontal flip; brightness (float, max change as a fraction
                  of full scale), contrast and saturation (float s: factor drawn from [1-s, 1+s]);
                  crop (float c: a random square window of side in [1-c, 1] of the image,
                  resized back); 0 turns one off.
  shuffle_buffer  records in the shuffle buffer (capped at the process's record count).
  builder_kwargs  dict passed to the builder, e.g. synthetic_faces sizes or image_folder root.
  manual_dir      (optional) where manually downloaded data lies; None or "" for TFDS's
                  default <data_dir>/downloads/manual.
A dataset that is not prepared yet is prepared on first use, without network access.
"""

from typing import Iterator

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from adam_face import config_lib
# Importing the datasets package registers all its builders with TFDS.
from datasets import face_verification
from datasets import image_folder
from datasets import pairs

PIXEL_MEAN = 127.5
PIXEL_SCALE = 128.0
AUGMENTATIONS = ("flip", "brightness", "contrast", "saturation", "crop")
VERIFICATION_SETS = face_verification.SETS + ("synthetic", "orl")


def default_dataset_config(**overrides) -> ml_collections.ConfigDict:
  """configs/default.py's dataset section (synthetic_faces at 112x112 with random flips), with
  `overrides` applied."""
  config = config_lib.default_config().dataset
  config.update(overrides)
  return config


def prepared_builder(
  name: str, *, data_dir: str | None = None, builder_kwargs=None, manual_dir: str | None = None
) -> tfds.core.DatasetBuilder:
  """The builder for `name`, prepared (built from its source data) if it is not yet.

  data_dir and manual_dir None or "" mean TFDS's defaults (configs write ""). A builder whose
  manual data is missing raises FileNotFoundError saying which files to put where.
  """

  def prepare():
    # TFDS would take "" as the current directory.
    builder = tfds.builder(
      name, data_dir=data_dir or None, try_gcs=False, **dict(builder_kwargs or {})
    )
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)
    )
    return builder

  if jax.process_count() == 1:
    return prepare()
  # Several processes: on a shared filesystem only one may write the dataset (concurrent builds
  # collide renaming their output). Process 0 builds; the others then find it ready, or build
  # their own copy where each host has its own disk.
  builder = prepare() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices(f"adam_face: {name} prepared")
  return builder or prepare()


def _builder(dataset_config) -> tfds.core.DatasetBuilder:
  return prepared_builder(
    dataset_config.name,
    data_dir=dataset_config.data_dir,
    builder_kwargs=dataset_config.builder_kwargs,
    manual_dir=dataset_config.get("manual_dir"),
  )


def _num_skipped_images(builder, split: str) -> int:
  """Images of the split left out at build time because they did not decode."""
  metadata = builder.info.metadata or {}
  whole_split = split.split("[")[0]  # They are counted per whole split.
  return int(metadata.get("num_skipped_images", {}).get(whole_split, 0))


def dataset_info(dataset_config) -> dict:
  """{'num_classes', 'num_examples' (whole split), 'num_skipped_images', 'full_name'}."""
  builder = _builder(dataset_config)
  return {
    "num_classes": int(builder.info.features["label"].num_classes),
    "num_examples": int(builder.info.splits[dataset_config.split].num_examples),
    "num_skipped_images": _num_skipped_images(builder, dataset_config.split),
    "full_name": builder.info.full_name,
  }


def decode_image(image_bytes: tf.Tensor, image_size: int) -> tf.Tensor:
  """float32 [image_size, image_size, 3] in [0, 255] from JPEG or PNG bytes.

  Greyscale becomes 3 equal channels; other sizes are resized (bilinear, antialiased; the aspect
  ratio is not kept, e.g. ORL's 92x112 is stretched to square).
  """
  image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
  image = tf.cond(
    tf.reduce_all(tf.shape(image)[:2] == image_size),
    lambda: tf.cast(image, tf.float32),
    lambda: tf.image.resize(image, [image_size, image_size], antialias=True),
  )
  return tf.ensure_shape(image, [image_size, image_size, 3])


def augment_image(image: tf.Tensor, key: tf.Tensor, augment) -> tf.Tensor:
  """Applies the configured random augmentations to float [H, W, 3] in [0, 255].

  Args:
    image: the image.
    key: int64 [2] stateless seed; the same key always gives the same result.
    augment: the dataset config's `augment` ConfigDict (see the module docstring).
  """
  unknown = sorted(set(augment.keys()) - set(AUGMENTATIONS))
  if unknown:
    raise ValueError(f"unknown augmentations {unknown}; known: {AUGMENTATIONS}")
  keys = tf.random.experimental.stateless_split(key, num=len(AUGMENTATIONS))
  if augment.get("flip", False):
    flip = tf.random.stateless_uniform([], seed=keys[0]) < 0.5
    image = tf.cond(flip, lambda: tf.image.flip_left_right(image), lambda: image)
  brightness = augment.get("brightness", 0.0)
  contrast = augment.get("contrast", 0.0)
  saturation = augment.get("saturation", 0.0)
  if brightness or contrast or saturation:
    image = image / 255.0
    if brightness:
      image = tf.image.stateless_random_brightness(image, brightness, seed=keys[1])
    if contrast:
      image = tf.image.stateless_random_contrast(image, 1 - contrast, 1 + contrast, seed=keys[2])
    if saturation:
      image = tf.image.stateless_random_saturation(
        image, 1 - saturation, 1 + saturation, seed=keys[3]
      )
    image = tf.clip_by_value(image, 0.0, 1.0) * 255.0
  crop = augment.get("crop", 0.0)
  if crop:
    # A square window of side f * S, f ~ U[1 - crop, 1], placed uniformly, resized back to S:
    # small shifts and zooms, as a detector's box jitters around an aligned face.
    side, y, x = tf.unstack(tf.random.stateless_uniform([3], seed=keys[4]))
    side = 1.0 - crop * side
    box = tf.stack([y * (1.0 - side), x * (1.0 - side)])
    box = tf.concat([box, box + side], axis=0)[None]
    size = tf.shape(image)[:2]
    image = tf.image.crop_and_resize(image[None], box, [0], size)[0]
  return image


def normalize(image: tf.Tensor) -> tf.Tensor:
  return (image - PIXEL_MEAN) / PIXEL_SCALE


def _seed_from(*values: int) -> int:
  """A 63-bit seed mixing the given integers (distinct tuples give unrelated seeds)."""
  return int(np.random.SeedSequence(list(values)).generate_state(1, np.uint64)[0] >> 1)


def build_train_dataset(
  builder: tfds.core.DatasetBuilder,
  *,
  split: str,
  per_process_batch_size: int,
  seed: int,
  start_step: int = 0,
  image_size: int = 112,
  augment=None,
  shuffle_buffer: int = 10_000,
  process_index: int | None = None,
  process_count: int | None = None,
) -> tf.data.Dataset:
  """The endless training tf.data pipeline of one process (see the module docstring).

  Args:
    builder: a prepared builder with 'image' and 'label' features.
    split: the split to read; each process reads an even, disjoint share of it.
    per_process_batch_size: batch size of this process.
    seed: the run's seed.
    start_step: first batch produced; batch k is the same whatever start_step <= k.
    image_size: side of the square output images.
    augment: mapping of augmentations (see augment_image); None: none.
    shuffle_buffer: shuffle buffer size in records.
    process_index, process_count: this process's share; default jax's.
  Returns:
    batches {'image': float32 [B, S, S, 3] normalised, 'label': int32 [B]}.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  subsplit = tfds.even_splits(split, n=process_count)[process_index]
  num_records = builder.info.splits[subsplit].num_examples
  if num_records == 0:
    raise ValueError(
      f"{builder.info.full_name} split {split!r} leaves no records for process "
      f"{process_index} of {process_count}"
    )
  augment = augment if augment is not None else {}
  records = builder.as_dataset(
    split=subsplit,
    shuffle_files=False,
    decoders={"image": tfds.decode.SkipDecoding()},
    read_config=tfds.ReadConfig(try_autocache=False),
  ).map(lambda example: (example["image"], example["label"]))

  buffer_size = min(shuffle_buffer, num_records)
  epoch_seed_base = _seed_from(seed, process_index, 0)

  def one_epoch(epoch):
    epoch_seed = tf.random.stateless_uniform(
      [],
      seed=tf.stack([tf.constant(epoch_seed_base, tf.int64), epoch]),
      minval=None,
      maxval=None,
      dtype=tf.int64,
    )
    return records.shuffle(buffer_size, seed=epoch_seed, reshuffle_each_iteration=False)

  first_record = start_step * per_process_batch_size
  start_epoch, offset = divmod(first_record, num_records)
  element_seed = tf.constant(_seed_from(seed, process_index, 1), tf.int64)

  def preprocess(position, record):
    image_bytes, label = record
    image = decode_image(image_bytes, image_size)
    image = augment_image(image, tf.stack([element_seed, position]), augment)
    return {"image": normalize(image), "label": tf.cast(label, tf.int32)}

  ds = tf.data.Dataset.counter(start_epoch).flat_map(one_epoch).skip(offset)
  ds = ds.enumerate(start=first_record)
  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(per_process_batch_size, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE)


def create_train_iterator(
  dataset_config, *, global_batch_size: int, seed: int, start_step: int = 0
) -> Iterator[dict[str, np.ndarray]]:
  """Endless {'image': float32 [B, S, S, 3], 'label': int32 [B]} batches for this process.

  B = global_batch_size / jax.process_count(). start_step=k yields exactly the batches k, k+1, ...
  that a fresh iterator yields at those positions.
  """
  if global_batch_size % jax.process_count():
    raise ValueError(
      f"global_batch_size {global_batch_size} is not divisible by the "
      f"{jax.process_count()} processes"
    )
  builder = _builder(dataset_config)
  num_skipped = _num_skipped_images(builder, dataset_config.split)
  if num_skipped:
    logging.warning(
      "%s: %d undecodable images were left out of split %s when it was built; "
      "they are listed in its metadata (%s/metadata.json)",
      builder.info.full_name,
      num_skipped,
      dataset_config.split,
      builder.data_dir,
    )
  ds = build_train_dataset(
    builder,
    split=dataset_config.split,
    per_process_batch_size=global_batch_size // jax.process_count(),
    seed=seed,
    start_step=start_step,
    image_size=dataset_config.image_size,
    augment=dataset_config.augment,
    shuffle_buffer=dataset_config.shuffle_buffer,
  )
  return ds.as_numpy_iterator()


def dataset_seed(seed: int, index: int) -> int:
  """The stream seed of training dataset `index`: the run's seed for the first (so one dataset
  trains exactly as without fusion), an unrelated one drawn from (seed, index) for the others."""
  return seed if index == 0 else _seed_from(seed, index)


def create_fused_train_iterator(
  dataset_configs, *, batch_sizes, seed: int, start_step: int = 0
) -> Iterator[dict[str, np.ndarray]]:
  """Batches holding batch_sizes[k] images of dataset_configs[k] each (dataset fusion).

  A global batch is split over the mesh's devices by rows. Here device d's rows are its share of
  dataset 0, then its share of dataset 1, ..., so every dataset is sharded evenly over the devices
  and `train_step.split_by_dataset` recovers each dataset's rows without moving data between
  devices. Labels stay each dataset's own class ids. Each dataset is its own deterministic stream
  (seeded by dataset_seed), so a run resumed at start_step sees exactly the batches it would have
  seen.
  """
  if len(dataset_configs) == 1:
    return create_train_iterator(
      dataset_configs[0], global_batch_size=batch_sizes[0], seed=seed, start_step=start_step
    )
  streams = [
    create_train_iterator(
      dataset_config,
      global_batch_size=batch_size,
      seed=dataset_seed(seed, k),
      start_step=start_step,
    )
    for k, (dataset_config, batch_size) in enumerate(zip(dataset_configs, batch_sizes))
  ]
  local_devices = jax.local_device_count()

  def device_major(parts):
    blocks = [part.reshape((local_devices, -1) + part.shape[1:]) for part in parts]
    return np.concatenate(blocks, axis=1).reshape((-1,) + parts[0].shape[1:])

  def fused():
    while True:
      batches = [next(stream) for stream in streams]
      yield {key: device_major([batch[key] for batch in batches]) for key in batches[0]}

  return fused()


def _decoded_uint8(
  ds: tf.data.Dataset, image_keys: tuple[str, ...], image_size: int, other_keys: tuple[str, ...]
) -> dict[str, np.ndarray]:
  """Reads all of ds (with undecoded images) into numpy, images as uint8 [N, S, S, 3]."""

  def decode(example):
    out = {k: example[k] for k in other_keys}
    for k in image_keys:
      image = decode_image(example[k], image_size)
      out[k] = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    return out

  batches = list(
    ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE).batch(256).prefetch(1).as_numpy_iterator()
  )
  return {k: np.concatenate([b[k] for b in batches]) for k in image_keys + other_keys}


def _images_of(builder, split: str, image_size: int) -> dict[str, np.ndarray]:
  ds = builder.as_dataset(
    split=split,
    shuffle_files=False,
    decoders={"image": tfds.decode.SkipDecoding()},
    read_config=tfds.ReadConfig(try_autocache=False),
  )
  keys = tuple(k for k in ("label", "identity") if k in builder.info.features)
  return _decoded_uint8(ds, ("image",), image_size, keys)


def _pairs_of(images: np.ndarray, identities: np.ndarray, **pair_kwargs) -> dict[str, np.ndarray]:
  chosen = pairs.make_pairs(identities, **pair_kwargs)
  return {
    "image_a": images[chosen["index_a"]],
    "image_b": images[chosen["index_b"]],
    "is_same": chosen["is_same"],
    "fold": chosen["fold"],
  }


def _balanced_pairs_of(images: np.ndarray, identities: np.ndarray) -> dict[str, np.ndarray]:
  """Every genuine pair and as many seeded impostor pairs, as LFW balances them: with every
  impostor pair (91 % of ORL's) accuracy would mostly score a threshold that rejects everything."""
  counts = np.unique(identities, return_counts=True)[1]
  num_genuine = int(sum(n * (n - 1) // 2 for n in counts))
  return _pairs_of(images, identities, num_impostor_pairs=num_genuine)


def load_verification_set(
  name: str,
  *,
  data_dir: str | None = None,
  image_size: int = 112,
  builder_kwargs=None,
  manual_dir: str | None = None,
) -> dict[str, np.ndarray]:
  """A verification pair set: {'image_a', 'image_b': uint8 [N, S, S, 3], 'is_same': bool [N],
  'fold': int32 [N]}.

  Args:
    name: one of VERIFICATION_SETS. 'lfw', 'cfp_fp', ... read face_verification/<name>;
      'synthetic' pairs the held-out identities of synthetic_faces (every genuine pair and as
      many impostor pairs, seeded), 'orl' ORL's s31..s40 (all 450 genuine pairs and 450 seeded
      impostor pairs), both in 10 folds.
    data_dir: TFDS data directory (None: TFDS's default).
    image_size: side of the square images returned.
    builder_kwargs: for 'synthetic', the synthetic_faces sizes used in training.
    manual_dir: for the face_verification sets, where the .bin files (or LFW's pairs.txt tree)
      lie.
  """
  if name in face_verification.SETS:
    builder = prepared_builder(
      f"face_verification/{name}", data_dir=data_dir, manual_dir=manual_dir
    )
    ds = builder.as_dataset(
      split="test",
      shuffle_files=False,
      decoders={"image_a": tfds.decode.SkipDecoding(), "image_b": tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(try_autocache=False),
    )
    out = _decoded_uint8(ds, ("image_a", "image_b"), image_size, ("is_same", "fold"))
    return {
      "image_a": out["image_a"],
      "image_b": out["image_b"],
      "is_same": out["is_same"].astype(bool),
      "fold": out["fold"].astype(np.int32),
    }
  if name == "synthetic":
    builder = prepared_builder("synthetic_faces", data_dir=data_dir, builder_kwargs=builder_kwargs)
    heldout = _images_of(builder, "heldout", image_size)
    return _balanced_pairs_of(heldout["image"], heldout["identity"])
  if name == "orl":
    builder = prepared_builder("image_folder/orl", data_dir=data_dir)
    orl = _images_of(builder, "train", image_size)
    names = np.array(builder.info.features["label"].names)[orl["label"]]
    keep = np.isin(names, image_folder.ORL_VERIFICATION_IDENTITIES)
    return _balanced_pairs_of(orl["image"][keep], names[keep])
  raise ValueError(f"unknown verification set {name!r}; known: {VERIFICATION_SETS}")
