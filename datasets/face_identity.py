"""The shared builder behind `casia_webface` and `vggface2`: aligned 112x112 faces with labels.

Two configs read the two forms these datasets are distributed in:
  recordio  the insightface release (`train.rec`, `train.idx`, `property`), already aligned.
  folder    the raw identity-folder release, aligned (or resized) here by the subclass.
Either way an example is {'image': uint8 112x112x3 (JPEG), 'label': int}; the label names are the
identity folder names for `folder` and the label numbers for `recordio` (which has no names).
"""

import abc
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from datasets import images
from datasets import manual_data
from datasets import recordio

IMAGE_SIZE = 112

RECORDIO_FILES = ("train.rec", "train.idx", "property")


def read_property(path: pathlib.Path) -> int:
  """num_classes from an insightface `property` file (`num_classes,height,width`)."""
  fields = path.read_text().strip().split(",")
  try:
    num_classes = int(fields[0])
  except ValueError as e:
    raise ValueError(f"{path}: expected 'num_classes,height,width', got {fields}") from e
  if num_classes <= 0:
    raise ValueError(f"{path}: num_classes must be positive, got {num_classes}")
  return num_classes


def checked_label(labels: np.ndarray, num_classes: int, where: str) -> int:
  """The record's class label, refused unless it is a whole number in [0, num_classes)."""
  label = float(labels[0])
  if not (np.isfinite(label) and label == int(label) and 0 <= label < num_classes):
    raise ValueError(
        f"{where}: label {label} is not a class in [0, {num_classes}) (num_classes from the "
        "property file); the property file and the .rec do not belong together"
    )
  return int(label)


def as_jpeg_112(data: bytes, image) -> bytes:
  """`data` when it already is a 112x112 RGB JPEG, else the image resized whole, as JPEG."""
  if image.format == "JPEG" and image.mode == "RGB" and image.size == (IMAGE_SIZE, IMAGE_SIZE):
    return data
  return images.encode_jpeg(images.resize_rgb(image, IMAGE_SIZE))


# Bit rot or a bad copy damages one record or a handful; the .idx gives every record its own offset,
# so the others still read and only those are skipped. An .idx written for another .rec, or a .rec
# cut short early, sends nearly every offset into the middle of a record instead. More damaged
# records than 1 % and than a few (a tiny release may lose one or two), or all of them, is that
# case: an error rather than a dataset built quietly from what is left.
DAMAGED_FRACTION_ALLOWED = 0.01
DAMAGED_RECORDS_ALLOWED = 5


def recordio_examples(manual_dir: pathlib.Path, num_classes: int, skipped: images.SkippedImages):
  """Yields (record key, {'image': bytes, 'label': int}) for every readable image record.

  Damaged records and undecodable images are skipped and counted in `skipped`; more damaged records
  than DAMAGED_FRACTION_ALLOWED and DAMAGED_RECORDS_ALLOWED allow raise ValueError.
  """
  idx_path = manual_dir / "train.idx"
  with recordio.IndexedRecordReader(manual_dir / "train.rec", idx_path) as reader:
    keys = reader.image_keys()
    allowed = max(DAMAGED_RECORDS_ALLOWED, int(DAMAGED_FRACTION_ALLOWED * len(keys)))
    num_damaged = 0
    for num_read, key in enumerate(keys, start=1):
      where = f"{reader.rec_path} record {key}"
      try:
        header, data = reader.read_image(key)
      except recordio.DamagedRecordError as e:
        num_damaged += 1
        if num_damaged > allowed or num_damaged == len(keys):
          raise ValueError(
              f"{num_damaged} of the first {num_read} of {len(keys)} image records are damaged "
              f"(latest: {e}): {idx_path} probably does not belong to this .rec, or the .rec is "
              "cut short; put the train.idx of the same release beside it (re-download the "
              "release), or regenerate it with MXNet's `python tools/rec2idx.py train.rec "
              "train.idx`"
          ) from e
        skipped.skip(e)
        continue
      label = checked_label(header.labels, num_classes, where)
      try:
        image = images.decode(data, where)
      except images.UndecodableImageError as e:
        skipped.skip(e)
        continue
      yield key, {"image": as_jpeg_112(data, image), "label": label}


class FaceIdentityBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Subclasses set MANUAL_DOWNLOAD_INSTRUCTIONS and implement _folder_split."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name="recordio", description="insightface RecordIO release"),
      tfds.core.BuilderConfig(name="folder", description="raw identity-folder release"),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(
                    shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format="jpeg"
                ),
                "label": tfds.features.ClassLabel(),  # Set once the data is found.
            }
        ),
        supervised_keys=("image", "label"),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    root = manual_data.manual_dir(dl_manager, self.name, self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    if self.builder_config.name == "recordio":
      manual_data.require(
          [root / name for name in RECORDIO_FILES], self.name, self.MANUAL_DOWNLOAD_INSTRUCTIONS
      )
      num_classes = read_property(root / "property")
      self.info.features["label"].names = [str(i) for i in range(num_classes)]
      return {
          "train": self._generate_examples(
              lambda skipped: recordio_examples(root, num_classes, skipped)
          )
      }
    names, examples = self._folder_split(root)
    self.info.features["label"].names = names
    return {"train": self._generate_examples(examples)}

  @abc.abstractmethod
  def _folder_split(self, root: pathlib.Path):
    """(identity names, skipped -> iterator of examples) for the raw release under root."""

  def _generate_examples(self, examples):
    skipped = images.SkippedImages(f"{self.name}/{self.builder_config.name}", "train")
    yield from examples(skipped)
    skipped.record(self.info.metadata)
