"""Reads the IJB-B / IJB-C protocols in the layout of insightface's IJB release.

  <root>/IJBC/loose_crop/<name>.jpg              the face photos (loosely cropped)
  <root>/IJBC/meta/ijbc_face_tid_mid.txt         `<name> <template id> <medium id>` a face
  <root>/IJBC/meta/ijbc_name_5pts_score.txt      `<name> x1 y1 ... x5 y5 <detector score>` a face,
                                                 the same faces in the same order
  <root>/IJBC/meta/ijbc_template_pair_label.txt  `<template id> <template id> <1|0>` a 1:1 pair
  <root>/IJBC/meta/ijbc_1N_gallery_G1.csv        1:N (optional): CSV with a header, columns
  <root>/IJBC/meta/ijbc_1N_gallery_G2.csv          TEMPLATE_ID, SUBJECT_ID, ... a face
  <root>/IJBC/meta/ijbc_1N_probe_mixed.csv

IJB-B is the same with `IJBB` and `ijbb_`, its galleries being S1 and S2. The landmarks are the
left eye, right eye, nose tip and left and right mouth corners in the loose crop's pixels, the
order datasets/alignment.py takes.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import numpy as np

# The sets this reader knows: folder name, file prefix, and the names of the 1:N galleries.
IJB_SETS = {
    "ijbb": ("IJBB", ("S1", "S2")),
    "ijbc": ("IJBC", ("G1", "G2")),
}
# The meta files of the 1:1 protocol, after the `<set>_` prefix; the 1:N files are optional.
_ONE_TO_ONE_FILES = ("face_tid_mid", "name_5pts_score", "template_pair_label")
_LAYOUT_HELP = (
    "adam_face reads insightface's IJB release layout: <root>/{folder}/loose_crop/*.jpg and "
    "<root>/{folder}/meta/{prefix}_face_tid_mid.txt, {prefix}_name_5pts_score.txt and "
    "{prefix}_template_pair_label.txt (README: IJB-B and IJB-C)"
)


class IJBLayoutError(ValueError):
  """A file of the IJB release is missing or malformed; the message names it and the fix."""


@dataclasses.dataclass(frozen=True)
class SubjectTemplates:
  """The templates of a 1:N gallery or probe list, each once, with its subject."""

  templates: np.ndarray  # int64 [T], ascending
  subjects: np.ndarray  # int64 [T]


@dataclasses.dataclass(frozen=True)
class IJBProtocol:
  """One IJB set: its faces (in the meta files' order), 1:1 template pairs and 1:N lists."""

  name: str  # 'ijbb' or 'ijbc'
  image_dir: str  # The loose_crop folder.
  face_names: np.ndarray  # str [N], file names under image_dir
  landmarks: np.ndarray  # float32 [N, 5, 2]
  detector_scores: np.ndarray  # float32 [N]
  templates: np.ndarray  # int64 [N], each face's template
  media: np.ndarray  # int64 [N], each face's medium
  pairs: tuple[np.ndarray, np.ndarray, np.ndarray]  # template ids int64 [P] x2, is_same bool [P]
  galleries: dict[str, SubjectTemplates]  # Empty without the 1:N files.
  probes: SubjectTemplates | None

  @property
  def num_faces(self) -> int:
    return len(self.face_names)


def set_directory(root: str, name: str) -> str:
  """<root>/IJBC for 'ijbc' (<root> may also be that folder itself)."""
  folder = IJB_SETS[name][0]
  if os.path.basename(os.path.normpath(root)).upper() == folder:
    return root
  return os.path.join(root, folder)


def read_protocol(root: str, name: str) -> IJBProtocol:
  """Reads set `name` ('ijbb' | 'ijbc') under `root`; IJBLayoutError names any bad file."""
  if name not in IJB_SETS:
    raise IJBLayoutError(f"unknown IJB set {name!r}; known: {sorted(IJB_SETS)}.")
  folder, gallery_names = IJB_SETS[name]
  directory = set_directory(root, name)
  meta = os.path.join(directory, "meta")
  image_dir = os.path.join(directory, "loose_crop")
  help_text = _LAYOUT_HELP.format(folder=folder, prefix=name)
  for path in (
      image_dir,
      *(os.path.join(meta, f"{name}_{s}.txt") for s in _ONE_TO_ONE_FILES),
  ):
    if not os.path.exists(path):
      raise IJBLayoutError(f"{path} is missing; {help_text}.")

  face_list = os.path.join(meta, f"{name}_face_tid_mid.txt")
  names, templates, media = _read_face_list(face_list)
  landmark_list = os.path.join(meta, f"{name}_name_5pts_score.txt")
  landmark_names, landmarks, scores = _read_landmarks(landmark_list)
  if len(landmark_names) != len(names):
    raise IJBLayoutError(
        f"{landmark_list} lists {len(landmark_names)} faces and {face_list} {len(names)}; the "
        "two must list the same faces in the same order (use the meta files of one release)."
    )
  differs = np.flatnonzero(landmark_names != names)
  if differs.size:
    line = differs[0] + 1
    raise IJBLayoutError(
        f"line {line} of {landmark_list} is {str(landmark_names[differs[0]])!r} but line {line} "
        f"of {face_list} is {str(names[differs[0]])!r}; the two must list the same faces in the same order."
    )
  pairs = _read_pairs(os.path.join(meta, f"{name}_template_pair_label.txt"))

  one_to_n = [os.path.join(meta, f"{name}_1N_gallery_{g}.csv") for g in gallery_names]
  one_to_n.append(os.path.join(meta, f"{name}_1N_probe_mixed.csv"))
  present = [os.path.exists(path) for path in one_to_n]
  galleries, probes = {}, None
  if any(present):
    if not all(present):
      missing = [p for p, here in zip(one_to_n, present) if not here]
      raise IJBLayoutError(
          f"{missing[0]} is missing while other 1:N lists are there; 1:N needs "
          f"{', '.join(os.path.basename(p) for p in one_to_n)} in {meta}."
      )
    galleries = {g: _read_subject_templates(p) for g, p in zip(gallery_names, one_to_n)}
    probes = _read_subject_templates(one_to_n[-1])
  return IJBProtocol(
      name, image_dir, names, landmarks, scores, templates, media, pairs, galleries, probes
  )


def _read_face_list(path):
  names, ids = _read_table(path, 3, "`<name> <template id> <medium id>`")
  if not (ids == np.round(ids)).all():
    bad = int(np.flatnonzero((ids != np.round(ids)).any(1))[0])
    raise IJBLayoutError(f"{path}: entry {bad + 1} has a template or medium id that is no integer.")
  ids = ids.astype(np.int64)
  return names, ids[:, 0], ids[:, 1]


def _read_landmarks(path):
  names, numbers = _read_table(path, 12, "`<name> x1 y1 ... x5 y5 <detector score>`")
  numbers = numbers.astype(np.float32)
  return names, numbers[:, :10].reshape(-1, 5, 2), numbers[:, 10]


def _read_table(path, num_fields, expected):
  """(names str [N], the other fields float64 [N, num_fields - 1]) of a whitespace table."""
  with open(path) as f:
    rows = [line.split() for line in f if line.strip()]
  numbers = None
  if all(len(row) == num_fields for row in rows):
    try:
      numbers = np.array([row[1:] for row in rows], np.float64).reshape(-1, num_fields - 1)
    except ValueError:
      pass
  if numbers is None or not np.isfinite(numbers).all():
    bad = next(i for i, row in enumerate(rows) if not _is_row(row, num_fields))
    raise IJBLayoutError(
        f"{path}: entry {bad + 1} is {' '.join(rows[bad])!r}; expected {expected} "
        f"({num_fields} fields, finite numbers after the name)."
    )
  return np.array([row[0] for row in rows]), numbers


def _is_row(row, num_fields):
  try:
    return len(row) == num_fields and all(np.isfinite(float(f)) for f in row[1:])
  except ValueError:
    return False


def _read_pairs(path):
  # 15.7 million lines for IJB-C: parsed in C, then checked whole.
  with open(path, "rb") as f:
    data = f.read().strip()
  num_lines = data.count(b"\n") + 1 if data else 0
  try:
    with warnings.catch_warnings():
      # numpy warns, and stops, at the first token that is no integer.
      warnings.simplefilter("error")
      values = np.fromstring(data, dtype=np.int64, sep=" ")
  except (ValueError, DeprecationWarning):
    values = None
  if values is None or values.size != 3 * num_lines or not np.isin(values[2::3], (0, 1)).all():
    raise IJBLayoutError(
        f"{path}: expected lines `<template id> <template id> <1|0>` ({num_lines} lines, "
        "not all of them integers, or not 3 a line); fix or re-extract the file."
    )
  values = values.reshape(-1, 3)
  return values[:, 0], values[:, 1], values[:, 2].astype(bool)


def _read_subject_templates(path):
  with open(path) as f:
    header = f.readline().strip().split(",")
    rows = [line.split(",") for line in f if line.strip()]
  columns = [c.strip().upper() for c in header]
  if "TEMPLATE_ID" not in columns or "SUBJECT_ID" not in columns:
    raise IJBLayoutError(
        f"{path}: the header {header} lacks TEMPLATE_ID or SUBJECT_ID; expected the 1:N CSV of "
        "the IJB release."
    )
  t, s = columns.index("TEMPLATE_ID"), columns.index("SUBJECT_ID")
  try:
    ids = np.array([(row[t], row[s]) for row in rows], np.int64).reshape(-1, 2)
  except (ValueError, IndexError) as e:
    raise IJBLayoutError(f"{path}: a row has no integer TEMPLATE_ID and SUBJECT_ID ({e}).") from e
  templates, first = np.unique(ids[:, 0], return_index=True)
  subjects = ids[first, 1]
  conflict = np.flatnonzero(subjects[np.searchsorted(templates, ids[:, 0])] != ids[:, 1])
  if conflict.size:
    row = ids[conflict[0]]
    raise IJBLayoutError(f"{path}: template {row[0]} is listed with two subjects; fix the file.")
  return SubjectTemplates(templates, subjects)
