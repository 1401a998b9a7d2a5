"""`vggface2`: VGGFace2 training identities (8,631 identities, ~3.1M images), aligned 112x112.

recordio (default): insightface's `faces_vgg2_112x112` release, already aligned.
folder: the raw release `train/n000002/0001_01.jpg`, each image warped onto the ArcFace 5-point
  template with the landmarks of `bb_landmark/loose_landmark_train.csv`. An image without a
  landmark row is resized whole instead; those are counted in the metadata ('num_unaligned_images').
"""

import csv
import pathlib

import numpy as np
from absl import logging

from datasets import alignment
from datasets import face_identity
from datasets import image_folder
from datasets import images
from datasets import manual_data

FOLDER_ROOT = "train"
LANDMARKS_CSV = "bb_landmark/loose_landmark_train.csv"


class LandmarkTable:
  """Five landmarks per image from a VGGFace2 loose_landmark csv, looked up by 'n000002/0001_01'.

  Names are kept as a sorted fixed-width byte array and points as float32, so the 3.1M rows of
  the full release take a few hundred MB rather than a dict's several GB.
  """

  def __init__(self, csv_path: pathlib.Path):
    names, points = [], []
    with open(csv_path, newline="") as f:
      reader = csv.reader(f)
      header = next(reader, None)
      if header is None or len(header) != 11 or header[0].strip() != "NAME_ID":
        raise ValueError(
            f"{csv_path}: expected the header NAME_ID,P1X,P1Y,...,P5X,P5Y, got {header}"
        )
      for line_number, row in enumerate(reader, start=2):
        if len(row) != 11:
          raise ValueError(f"{csv_path}:{line_number}: expected 11 fields, got {row}")
        names.append(row[0].strip())
        points.append([float(v) for v in row[1:]])
    order = np.argsort(np.array(names, dtype=object)) if names else np.zeros(0, np.int64)
    self._names = np.array(names, dtype=np.bytes_)[order]
    self._points = np.array(points, np.float32).reshape(-1, 5, 2)[order]

  def get(self, name: str) -> np.ndarray | None:
    """[5, 2] (x, y) landmarks of `name`, or None when the csv has no row for it."""
    key = name.encode()
    i = np.searchsorted(self._names, key)
    if i < len(self._names) and self._names[i] == key:
      return self._points[i]
    return None


class Vggface2(face_identity.FaceIdentityBuilder):
  """VGGFace2 training identities -> {'image': 112x112x3, 'label'}."""

  name = "vggface2"
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
vggface2/recordio: extract insightface's faces_vgg2_112x112 so that these files lie directly in
the manual directory: <manual_dir>/train.rec, <manual_dir>/train.idx, <manual_dir>/property.
vggface2/folder: extract the raw VGGFace2 training images and landmarks so that
<manual_dir>/{FOLDER_ROOT}/<identity>/<image>.jpg (e.g. {FOLDER_ROOT}/n000002/0001_01.jpg) and
<manual_dir>/{LANDMARKS_CSV} exist."""

  def _folder_split(self, root: pathlib.Path):
    manual_data.require(
        [root / FOLDER_ROOT, root / LANDMARKS_CSV], self.name, self.MANUAL_DOWNLOAD_INSTRUCTIONS
    )
    scanned = image_folder.scan_identity_folders(root / FOLDER_ROOT)
    landmarks = LandmarkTable(root / LANDMARKS_CSV)

    def examples(skipped):
      unaligned = []

      def to_bytes(identity, path, data, image):
        del data
        points = landmarks.get(f"{identity}/{path.stem}")
        if points is None:
          unaligned.append(f"{identity}/{path.name}")
          return images.encode_jpeg(images.resize_rgb(image, face_identity.IMAGE_SIZE))
        return images.encode_jpeg(alignment.align_face(image, points, face_identity.IMAGE_SIZE))

      yield from image_folder.identity_folder_examples(scanned, to_bytes, skipped)
      if unaligned:
        logging.warning(
            "%s: %d images have no row in %s and were resized, not aligned (first: %s)",
            self.name,
            len(unaligned),
            LANDMARKS_CSV,
            unaligned[0],
        )
      self.info.metadata["num_unaligned_images"] = {"train": len(unaligned)}

    return [identity for identity, _ in scanned], examples
