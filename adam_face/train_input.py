"""Training input: endless batches from TFDS identity datasets, and the fused-batch layout.

Training (create_train_iterator) reads this process's share of the split, shuffles it afresh each
epoch, decodes (decode_image: as PIL and OpenCV decode), converts to 3-channel
image_size x image_size, augments (augment_image), normalises (pixels.normalize) and batches to the
per-process batch. Its order is a pure function of (seed, process, step), so a run resumed at step
k sees exactly the batches it would have seen:

  * epoch e is the process's records shuffled with a seed drawn from (seed, e), so skipping whole
    epochs costs nothing and only the records of the current epoch before step k are read again
    (still undecoded) to reach k;
  * every random augmentation is a stateless op keyed by (seed, process, position in the stream),
    never by a stateful generator whose state would be lost at a restart.
TF's shuffle mixes in TF's global seed, so a resumed run must set it (tf.random.set_seed) exactly
as the original did, or not at all.

Several datasets train together (create_fused_train_iterator) in fused batches whose rows are laid
out device-major (adam_face.batch_layout, which the training step reads without TensorFlow).

The dataset config fields are described in data_builders, which prepares the builders.
"""

from typing import Iterator

from absl import logging
import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from adam_face import batch_layout, data_builders, pixels

AUGMENTATIONS = ("flip", "brightness", "contrast", "saturation", "crop")


def decode_image(image_bytes: tf.Tensor, image_size: int) -> tf.Tensor:
  """float32 [image_size, image_size, 3] in [0, 255] from JPEG or PNG bytes.

  JPEGs are decoded with libjpeg's accurate integer IDCT, the default of PIL and OpenCV (so of
  insightface's pipelines and of the checks made on the data with PIL): the same pixels exactly.
  TF's default fast IDCT differs from them by up to 20 grey levels on aligned 112x112 faces.
  Greyscale becomes 3 equal channels; other sizes are resized (bilinear, antialiased; the aspect
  ratio is not kept, e.g. ORL's 92x112 is stretched to square).
  """
  image = tf.cond(
      tf.io.is_jpeg(image_bytes),
      lambda: tf.io.decode_jpeg(image_bytes, channels=3, dct_method="INTEGER_ACCURATE"),
      lambda: tf.io.decode_image(image_bytes, channels=3, expand_animations=False),
  )
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
    augment: mapping (the dataset config's `augment`) of flip (bool): random horizontal flip;
      brightness (float, max change as a fraction of full scale), contrast and saturation
      (float s: factor drawn from [1-s, 1+s]); crop (float c: a random square window of side in
      [1-c, 1] of the image, resized back); 0 turns one off.
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
    return {"image": pixels.normalize(image), "label": tf.cast(label, tf.int32)}

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
  that a fresh iterator yields at those positions. A dataset that is not prepared yet is prepared
  on first use, without network access (data_builders).
  """
  if global_batch_size % jax.process_count():
    raise ValueError(
        f"global_batch_size {global_batch_size} is not divisible by the "
        f"{jax.process_count()} processes"
    )
  builder = data_builders.dataset_builder(dataset_config)
  num_skipped = data_builders.num_skipped_images(builder, dataset_config.split)
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

  Rows are laid out by batch_layout.fuse_datasets over this process's devices, so
  batch_layout.split_by_dataset recovers each dataset's rows on the devices. Labels stay each dataset's own class ids. Each dataset is
  its own deterministic stream (seeded by dataset_seed), so a run resumed at start_step sees
  exactly the batches it would have seen.
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

  def fused():
    while True:
      batches = [next(stream) for stream in streams]
      yield {
          key: batch_layout.fuse_datasets([batch[key] for batch in batches], local_devices)
          for key in batches[0]
      }

  return fused()
