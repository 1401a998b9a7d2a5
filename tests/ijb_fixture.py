"""An IJB-C folder in insightface's release layout, built from aligned faces (not a test module):
test_ijb and test_train's evaluate test score it.

Loose crops are made by pasting aligned faces (real LFW faces from ../shared/data/lfw_dev for half
of the subjects when given, smooth random images otherwise) into larger photos at known offsets
and scales, with the landmarks that follow; every fifth photo is stored sideways with an EXIF
orientation tag (landmarks of the photo as shown). Subject s has template 10s+1 (faces 0 and 1, two
media; its 1:N gallery template, G1 for s < 5, G2 otherwise) and 10s+2 (face 2, then face 0
twice as two frames of one medium; a mixed probe). Template 991 repeats template 21's faces (exact
score ties); template 31 has a missing photo and 41 an undecodable one besides their good faces;
template 992's only face is missing. Every pair of templates is a 1:1 pair, genuine when both are
the same subject's.
"""

import io
import os
import pathlib

import jax
import numpy as np
from PIL import Image

from datasets import alignment
from datasets import ijb
from fixtures_data import encoded_image

SUBJECTS = 10
EMBED_SIZE = 16  # The toy model's input side: the cached 112x112 faces are resized to it.


def _aligned_faces(lfw_dev_dir):
  """Per subject, three aligned 112x112 faces: half of the subjects LFW's when lfw_dev_dir is
  given, the others smooth random images."""
  faces = []
  if lfw_dev_dir is not None:
    train = pathlib.Path(lfw_dev_dir) / "train"
    for person in sorted(os.listdir(train)):
      files = sorted((train / person).iterdir())
      if len(files) >= 3:
        faces.append([np.asarray(Image.open(f).convert("RGB")) for f in files[:3]])
      if len(faces) == SUBJECTS // 2:
        break
  while len(faces) < SUBJECTS:
    seed = 100 * len(faces)
    faces.append([np.asarray(_decode(encoded_image(seed + k, fmt="PNG"))) for k in range(3)])
  return faces


def _decode(data):
  return Image.open(io.BytesIO(data)).convert("RGB")


def _loose_crop(face, rng):
  """The face pasted, scaled, into a larger photo; (photo, its five landmarks)."""
  scale = rng.choice([1.0, 1.25])
  size = int(round(112 * scale))
  canvas = Image.fromarray(rng.integers(0, 255, (180, 170, 3), dtype=np.uint8))
  offset = rng.integers(5, 170 - size, 2)
  canvas.paste(Image.fromarray(face).resize((size, size), Image.Resampling.BICUBIC), tuple(offset))
  return canvas, alignment.ARCFACE_TEMPLATE_112 * size / 112 + offset


def write_ijbc(root: pathlib.Path, lfw_dev_dir=None, name: str = "ijbc") -> pathlib.Path:
  """Writes <root>/IJBC (module docstring), or with name 'ijbb' the same as <root>/IJBB, its
  galleries named S1 and S2; returns root."""
  folder, (gallery_1, gallery_2) = ijb.IJB_SETS[name]
  crops, meta = root / folder / "loose_crop", root / folder / "meta"
  crops.mkdir(parents=True)
  meta.mkdir()
  rng = np.random.default_rng(5)
  faces = _aligned_faces(lfw_dev_dir)
  face_rows, landmark_rows = [], []
  # Template ids: subject s has templates 10s+1 (its gallery template: faces 0, 1 in two media)
  # and 10s+2 (a probe: face 2, and face 0 again as a second medium of two frames).
  template_faces = {}
  for s, person in enumerate(faces):
    template_faces[10 * s + 1] = [(person[0], 1), (person[1], 2)]
    template_faces[10 * s + 2] = [(person[2], 3), (person[0], 4), (person[0], 4)]
  template_faces[991] = list(template_faces[21])  # Repeats template 21: exact ties.
  for t, entries in template_faces.items():
    for face, medium in entries:
      file_name = f"{len(face_rows)}.jpg"
      photo, points = _loose_crop(face, rng)
      if len(face_rows) % 5 == 4:
        # Stored sideways with EXIF orientation 6, as a camera writes a portrait photo; the
        # landmarks are of the photo as shown, as insightface's (read by cv2.imread) are.
        exif = Image.Exif()
        exif[0x0112] = 6
        photo.transpose(Image.Transpose.ROTATE_90).save(crops / file_name, quality=95, exif=exif)
      else:
        photo.save(crops / file_name, quality=95)
      score = rng.uniform(0.5, 1.0)
      face_rows.append(f"{file_name} {t} {1000 * t + medium}")
      landmark_rows.append(
          file_name + " " + " ".join(f"{v:.3f}" for v in points.ravel()) + f" {score}"
      )
  # A face whose photo is missing and one that cannot be decoded (in template 31 and 41); and
  # template 992, whose only face is missing.
  for t, kind in ((31, "missing"), (41, "broken"), (992, "missing")):
    file_name = f"{len(face_rows)}_{kind}.jpg"
    if kind == "broken":
      (crops / file_name).write_bytes(b"not a jpeg")
    face_rows.append(f"{file_name} {t} {1000 * t + 9}")
    landmark_rows.append(file_name + " 38 51 73 51 56 71 41 92 70 92 0.9")
  (meta / f"{name}_face_tid_mid.txt").write_text("\n".join(face_rows) + "\n")
  (meta / f"{name}_name_5pts_score.txt").write_text("\n".join(landmark_rows) + "\n")
  pairs = []
  ids = sorted(template_faces) + [992]
  for i, a in enumerate(ids):
    for b in ids[i + 1 :]:
      pairs.append(f"{a} {b} {int(a // 10 == b // 10 and a < 990)}")
  (meta / f"{name}_template_pair_label.txt").write_text("\n".join(pairs) + "\n")
  header = "TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID\n"
  g1 = "".join(f"{10 * s + 1},{s},x.jpg,0\n" for s in range(0, SUBJECTS // 2))
  g2 = "".join(f"{10 * s + 1},{s},x.jpg,0\n{10 * s + 1},{s},y.jpg,1\n" for s in range(5, SUBJECTS))
  probes = "".join(f"{10 * s + 2},{s},x.jpg,0\n" for s in range(SUBJECTS))
  (meta / f"{name}_1N_gallery_{gallery_1}.csv").write_text(header + g1)
  (meta / f"{name}_1N_gallery_{gallery_2}.csv").write_text(header + g2)
  (meta / f"{name}_1N_probe_mixed.csv").write_text(header + probes)

  return root


def toy_embed_fn():
  """(embed_fn, its weights): a fixed random projection of the pixels of EMBED_SIZE-square faces
  to 8 dimensions, the toy model the IJB tests score with."""
  weights = np.random.default_rng(6).normal(size=(EMBED_SIZE * EMBED_SIZE * 3, 8))
  weights = weights.astype(np.float32)
  return jax.tree_util.Partial(_project, weights), weights


def _project(weights, images):
  return images.reshape(images.shape[0], -1) @ weights
