"""`face_verification`: the standard face verification pair sets, one config each.

An example is a pair {'image_a', 'image_b': uint8 HxWx3, 'is_same': bool, 'fold': int32} in the
'test' split, in the order of the source (folds are blocks of consecutive pairs).

Every config reads insightface's `<manual_dir>/<config>.bin` (as shipped beside the RecordIO
training sets): a Python 2 pickle of (2N encoded images, N booleans), pair i being images 2i and
2i+1, split into 10 folds of consecutive pairs. `lfw` is also read from the original LFW layout:
`<manual_dir>/pairs.txt` with `<manual_dir>/lfw/<Name>/<Name>_0001.jpg`.
"""

import pathlib
import pickle

import numpy as np
import tensorflow_datasets as tfds

from datasets import images
from datasets import manual_data

SETS = ("lfw", "cfp_fp", "cfp_ff", "agedb_30", "calfw", "cplfw", "vgg2_fp")
NUM_FOLDS = 10

_INSTRUCTIONS = """\
face_verification/<set> (sets: {sets}): copy insightface's <set>.bin (it ships beside train.rec in
the faces_webface_112x112 / faces_emore / faces_vgg2_112x112 releases) to <manual_dir>/<set>.bin.
face_verification/lfw also accepts the original LFW release: <manual_dir>/pairs.txt and
<manual_dir>/lfw/<Name>/<Name>_0001.jpg (images are used as they are; aligned 112x112 crops give
meaningful accuracy, raw 250x250 photos do not).""".format(sets=", ".join(SETS))


class _PairBinUnpickler(pickle.Unpickler):
  """Loads only lists, tuples, bytes, bools and numpy arrays: a .bin is untrusted input."""

  _NUMPY_CORE = getattr(np, "_core", None) or np.core
  _ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _NUMPY_CORE.multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _NUMPY_CORE.multiarray._reconstruct,
    ("numpy.core.multiarray", "scalar"): _NUMPY_CORE.multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): _NUMPY_CORE.multiarray.scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
  }

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(
        f"{module}.{name} is not allowed in a verification .bin (expected a pickle of "
        "(list of encoded images, list of booleans))"
      )
    return self._ALLOWED[(module, name)]


def load_pair_bin(path: pathlib.Path) -> tuple[list[bytes], np.ndarray]:
  """(2N encoded images, bool [N]) from an insightface verification .bin."""
  with open(path, "rb") as f:
    # Python 2 str objects (the encoded images) load as bytes only with encoding='bytes'.
    loaded = _PairBinUnpickler(f, encoding="bytes").load()
  if not isinstance(loaded, (tuple, list)) or len(loaded) != 2:
    raise ValueError(f"{path}: expected a pickled (bins, issame_list) pair")
  bins, issame = loaded
  encoded = [
    bytes(np.asarray(b, np.uint8)) if isinstance(b, np.ndarray) else bytes(b) for b in bins
  ]
  issame = np.asarray(issame, dtype=bool).reshape(-1)
  if len(encoded) != 2 * len(issame):
    raise ValueError(
      f"{path}: {len(encoded)} images for {len(issame)} pairs; expected two images per pair"
    )
  return encoded, issame


def consecutive_folds(num_pairs: int, num_folds: int = NUM_FOLDS) -> np.ndarray:
  """int32 [num_pairs]: consecutive blocks, the first num_pairs % num_folds one pair longer."""
  sizes = np.full(num_folds, num_pairs // num_folds)
  sizes[: num_pairs % num_folds] += 1
  return np.repeat(np.arange(num_folds, dtype=np.int32), sizes)


def read_lfw_pairs(pairs_txt: pathlib.Path, image_root: pathlib.Path):
  """[(path_a, path_b, is_same, fold)] from LFW's pairs.txt.

  The first line gives the number of folds and the pairs per class per fold; each fold then
  lists that many matched lines `name i j` followed by as many mismatched `name1 i name2 j`.
  """
  lines = [line.split() for line in pairs_txt.read_text().splitlines() if line.strip()]
  num_folds, per_fold = (int(v) for v in lines[0])
  if len(lines) - 1 != num_folds * 2 * per_fold:
    raise ValueError(
      f"{pairs_txt}: the header announces {num_folds} folds of 2x{per_fold} "
      f"pairs but {len(lines) - 1} pair lines follow"
    )

  def path(name, number):
    return image_root / name / f"{name}_{int(number):04d}.jpg"

  pairs = []
  for line_number, fields in enumerate(lines[1:], start=2):
    fold = (line_number - 2) // (2 * per_fold)
    if len(fields) == 3:
      pairs.append((path(fields[0], fields[1]), path(fields[0], fields[2]), True, fold))
    elif len(fields) == 4:
      pairs.append((path(fields[0], fields[1]), path(fields[2], fields[3]), False, fold))
    else:
      raise ValueError(
        f"{pairs_txt}:{line_number}: expected 'name i j' or "
        f"'name1 i name2 j', got {' '.join(fields)!r}"
      )
  missing = sorted({str(p) for a, b, _, _ in pairs for p in (a, b) if not p.exists()})
  if missing:
    raise FileNotFoundError(
      f"{pairs_txt} names {len(missing)} images that do not exist "
      f"(first: {missing[0]}). {_INSTRUCTIONS}"
    )
  return pairs


class FaceVerification(tfds.core.GeneratorBasedBuilder):
  """Verification pairs -> {'image_a', 'image_b', 'is_same', 'fold'}."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  BUILDER_CONFIGS = [
    tfds.core.BuilderConfig(name=name, description=f"{name} pairs") for name in SETS
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "image_a": tfds.features.Image(shape=(None, None, 3)),
          "image_b": tfds.features.Image(shape=(None, None, 3)),
          "is_same": np.bool_,
          "fold": np.int32,
        }
      ),
      disable_shuffling=True,  # Keep the source order: folds are consecutive blocks.
      metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    root = manual_data.manual_dir(dl_manager, self.name, _INSTRUCTIONS)
    name = self.builder_config.name
    bin_path = root / f"{name}.bin"
    if bin_path.exists():
      return {"test": self._generate_examples(self._bin_pairs(bin_path))}
    if name == "lfw" and (root / "pairs.txt").exists():
      return {"test": self._generate_examples(self._lfw_pairs(root))}
    alternative = f" (or {root / 'pairs.txt'} with {root / 'lfw'})" if name == "lfw" else ""
    raise FileNotFoundError(f"{self.name}/{name}: missing {bin_path}{alternative}. {_INSTRUCTIONS}")

  @staticmethod
  def _bin_pairs(bin_path):
    encoded, issame = load_pair_bin(bin_path)
    folds = consecutive_folds(len(issame))
    for i in range(len(issame)):
      yield (
        i,
        (encoded[2 * i], f"{bin_path} image {2 * i}"),
        (encoded[2 * i + 1], f"{bin_path} image {2 * i + 1}"),
        issame[i],
        folds[i],
      )

  @staticmethod
  def _lfw_pairs(root):
    for i, (a, b, is_same, fold) in enumerate(read_lfw_pairs(root / "pairs.txt", root / "lfw")):
      yield i, (a.read_bytes(), str(a)), (b.read_bytes(), str(b)), is_same, fold

  def _generate_examples(self, pairs):
    skipped = images.SkippedImages(f"{self.name}/{self.builder_config.name}", "test")
    for i, (data_a, where_a), (data_b, where_b), is_same, fold in pairs:
      try:
        image_a = images.decode(data_a, where_a)
        image_b = images.decode(data_b, where_b)
      except images.UndecodableImageError as e:
        skipped.skip(e)  # The whole pair goes; its other image is not counted.
        continue
      yield (
        i,
        {
          "image_a": images.storable_bytes(data_a, image_a),
          "image_b": images.storable_bytes(data_b, image_b),
          "is_same": bool(is_same),
          "fold": int(fold),
        },
      )
    skipped.record(self.info.metadata)
