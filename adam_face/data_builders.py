"""TFDS builders ready to read: a dataset config's builder, prepared on first use, and its facts.

Every reader of data (training input in train_input, verification pairs in verification_sets)
gets its builder here, so a dataset is prepared in one way only: without network access, by one
process at a time, with a clear error where manual data is missing.

dataset_config fields read (a ConfigDict; config_lib.default_dataset_config() makes one):
  name            TFDS builder name, with config if any: 'synthetic_faces',
                  'image_folder/orl_s1_s30', 'casia_webface', 'vggface2/folder', ...
  data_dir        TFDS data directory; None or "" for TFDS's default ($TFDS_DATA_DIR or
                  ~/tensorflow_datasets).
  split           the split to train on, e.g. 'train' or 'train[:90%]'.
  image_size      side of the square images produced.
  augment         the training augmentations (see train_input.augment_image).
  shuffle_buffer  records in the shuffle buffer (capped at the process's record count).
  builder_kwargs  dict passed to the builder, e.g. synthetic_faces sizes or image_folder root.
  manual_dir      (optional) where manually downloaded data lies; None or "" for TFDS's
                  default <data_dir>/downloads/manual.
"""

from absl import logging
import jax
from jax.experimental import multihost_utils
import tensorflow_datasets as tfds
from tensorflow_datasets.core import constants as tfds_constants

import datasets  # noqa: F401  Importing the package registers all its builders with TFDS.


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
    _remove_unfinished_builds(builder)
    return builder

  if jax.process_count() == 1:
    return prepare()
  # Several processes: on a shared filesystem only one may write the dataset (concurrent builds
  # collide renaming their output). Process 0 builds; the others then find it ready, or build
  # their own copy where each host has its own disk.
  builder = prepare() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices(f"adam_face: {name} prepared")
  return builder or prepare()


def _remove_unfinished_builds(builder: tfds.core.DatasetBuilder) -> None:
  """Deletes what builds of the prepared builder's version that never finished left behind.

  TFDS builds into a temporary folder beside the version's folder and renames it when done, so a
  build killed on the way (SIGKILL, preemption, the OOM killer) leaves its temporary folder, maybe
  gigabytes, for good; the next build uses a new one. Once the version's folder exists, every such
  folder is garbage: a build still running could not rename its folder onto the existing one, so it
  cannot finish either.
  """
  version_dir = builder.data_path
  pattern = f"{tfds_constants.INCOMPLETE_PREFIX}*_{version_dir.name}"
  for unfinished in version_dir.parent.glob(pattern):
    logging.warning("Deleting %s, left by a build that did not finish", unfinished)
    unfinished.rmtree(missing_ok=True)


def dataset_builder(dataset_config) -> tfds.core.DatasetBuilder:
  """The prepared builder of a dataset config (see the module docstring)."""
  return prepared_builder(
      dataset_config.name,
      data_dir=dataset_config.data_dir,
      builder_kwargs=dataset_config.builder_kwargs,
      manual_dir=dataset_config.get("manual_dir"),
  )


def num_skipped_images(builder, split: str) -> int:
  """Images of the split left out at build time: undecodable, or in a damaged RecordIO record."""
  metadata = builder.info.metadata or {}
  whole_split = split.split("[")[0]  # They are counted per whole split.
  return int(metadata.get("num_skipped_images", {}).get(whole_split, 0))


def dataset_info(dataset_config) -> dict:
  """{'num_classes', 'num_examples' (whole split), 'num_skipped_images', 'full_name'}."""
  builder = dataset_builder(dataset_config)
  return {
      "num_classes": int(builder.info.features["label"].num_classes),
      "num_examples": int(builder.info.splits[dataset_config.split].num_examples),
      "num_skipped_images": num_skipped_images(builder, dataset_config.split),
      "full_name": builder.info.full_name,
  }
