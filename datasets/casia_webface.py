"""`casia_webface`: CASIA-WebFace (10,575 identities, ~490k images), aligned 112x112.

recordio (default): insightface's `faces_webface_112x112` release, already aligned.
folder: the raw release `CASIA-WebFace/0000045/001.jpg` (250x250). It ships no landmarks, so each
  image is resized whole to 112x112; the face is then smaller than in an aligned crop, so prefer the
  RecordIO release when training for comparison with published numbers.
"""

import pathlib

from datasets import face_identity
from datasets import image_folder

FOLDER_ROOT = "CASIA-WebFace"


class CasiaWebface(face_identity.FaceIdentityBuilder):
  """CASIA-WebFace identities -> {'image': 112x112x3, 'label'}."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
casia_webface/recordio: extract insightface's faces_webface_112x112 so that these files lie
directly in the manual directory: <manual_dir>/train.rec, <manual_dir>/train.idx,
<manual_dir>/property.
casia_webface/folder: extract the raw CASIA-WebFace release so that its identity folders lie in
<manual_dir>/{FOLDER_ROOT}/<identity>/<image>.jpg (e.g. {FOLDER_ROOT}/0000045/001.jpg)."""

  def _folder_split(self, root: pathlib.Path):
    folder = root / FOLDER_ROOT
    if not folder.is_dir():
      raise FileNotFoundError(f"{self.name}: missing {folder}. {self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    scanned = image_folder.scan_identity_folders(folder)

    names = [identity for identity, _ in scanned]
    return names, lambda skipped: image_folder.identity_folder_examples(
        scanned, lambda identity, path, data, image: face_identity.as_jpeg_112(data, image), skipped
    )
