"""Decoding, re-encoding and bad-image bookkeeping shared by the builders.

Every image is fully decoded with pillow when a dataset is built, so a truncated or corrupt file is
found then rather than crashing a training run days later: a training set skips it (logged and
counted in the dataset metadata), a verification set refuses it (its pair list is a fixed
protocol). Pillow also reads formats TensorFlow cannot (PGM, BMP, ...); those are stored as PNG.
"""

import io
import re

import numpy as np
from absl import logging
from PIL import Image, ImageOps

# File name endings treated as images when scanning folders; anything else (READMEs, csv files)
# is ignored.
IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".pgm",
    ".ppm",
    ".pbm",
    ".bmp",
    ".tif",
    ".tiff",
    ".webp",
)
# TF reads these formats in these modes as they are, to the same pixels as pillow
# (adam_face/train_input.py: decode_image; greyscale expands to 3 channels at decode time), so
# such bytes are stored unchanged.
_TF_DECODABLE = {"JPEG": ("L", "RGB"), "PNG": ("L", "RGB")}
# 8-bit pixel modes that convert to L or RGB without losing meaning (16-bit and float greyscale
# would need a rescaling guess, so such files are refused).
_GREY_MODES = ("1", "L", "LA")
_COLOUR_MODES = ("P", "PA", "RGB", "RGBA", "CMYK", "YCbCr")
JPEG_QUALITY = 95


class UndecodableImageError(ValueError):
  """An image file or record that pillow cannot decode; `where` names the file or record."""

  def __init__(self, where: str, cause: Exception):
    super().__init__(f"{where}: cannot decode image ({cause})")
    self.where = where


def decode(data: bytes, where: str) -> Image.Image:
  """Fully decodes `data`; raises UndecodableImageError naming `where` if that fails."""
  try:
    image = Image.open(io.BytesIO(data))
    image.load()
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise UndecodableImageError(where, e) from e
  if image.mode not in _GREY_MODES + _COLOUR_MODES:
    raise UndecodableImageError(where, ValueError(f"unsupported pixel mode {image.mode}"))
  return image


# The EXIF tag that says how a camera held the photo (1: as stored).
_EXIF_ORIENTATION = 0x0112


def upright(image: Image.Image) -> Image.Image:
  """`image` as a viewer shows it: rotated or mirrored as its EXIF orientation says (a phone's
  portrait photo is stored sideways with such a tag). OpenCV's imread does the same, and
  insightface reads photos with it (its IJB evaluation, recognition/_evaluation_/ijb), so
  landmarks given for a photo are in these coordinates. The image itself when it has no such
  tag."""
  if image.getexif().get(_EXIF_ORIENTATION, 1) == 1:
    return image
  return ImageOps.exif_transpose(image)


def storable_bytes(data: bytes, image: Image.Image) -> bytes:
  """The bytes to store for decoded `image`: `data` itself when TF decodes it to `image`, else a
  PNG (also of an image changed since decoding, e.g. made `upright`: it has no format)."""
  if image.mode in _TF_DECODABLE.get(image.format, ()):
    return data
  mode = "L" if image.mode in _GREY_MODES else "RGB"
  return encode_png(np.asarray(image.convert(mode)))


def encode_png(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


def encode_jpeg(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="JPEG", quality=JPEG_QUALITY)
  return buffer.getvalue()


def resize_rgb(image: Image.Image, size: int) -> np.ndarray:
  """uint8 [size, size, 3]: the whole image resized (aspect ratio not kept)."""
  resized = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
  return np.asarray(resized, np.uint8)


def natural_key(name: str) -> list:
  """Sort key putting 's2' before 's10'."""
  return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def is_image_file(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


class SkippedImages:
  """Logs each unreadable image as it is skipped, then its split's count into the metadata.

  Unreadable: an UndecodableImageError, or a recordio.DamagedRecordError (a RecordIO record whose
  bytes do not parse); both name the file or record in `where`. The builder's metadata then holds
  {'num_skipped_images': {split: n}, 'skipped_images': {split: [file or record names]}}, so a
  shorter epoch is always accounted for.
  """

  def __init__(self, dataset_name: str, split: str):
    self._dataset_name = dataset_name
    self._split = split
    self.names: list[str] = []

  def skip(self, error: ValueError) -> None:
    """Records `error`, an UndecodableImageError or a recordio.DamagedRecordError."""
    logging.warning(
        "%s/%s: skipping an unreadable image: %s", self._dataset_name, self._split, error
    )
    self.names.append(error.where)

  def record(self, metadata: dict) -> None:
    """Logs the final count and stores it in `metadata` (the builder's info.metadata)."""
    if self.names:
      logging.warning(
          "%s/%s: skipped %d unreadable images (listed in the dataset metadata "
          "under 'skipped_images')",
          self._dataset_name,
          self._split,
          len(self.names),
      )
    metadata.setdefault("num_skipped_images", {})[self._split] = len(self.names)
    metadata.setdefault("skipped_images", {})[self._split] = list(self.names)
