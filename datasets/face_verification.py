"""`face_verification`: the standard face verification pair sets, one config each.

An example is a pair {'image_a', 'image_b': uint8 HxWx3, 'is_same': bool, 'fold': int32} in the
'test' split, in the order of the source (folds are blocks of consecutive pairs).

Every config reads insightface's `<manual_dir>/<config>.bin` (as shipped beside the RecordIO
training sets): a Python 2 pickle of (2N encoded images, N booleans), pair i being images 2i and
2i+1, split into 10 folds of consecutive pairs. `lfw` is also read from the original LFW layout:
`<manual_dir>/pairs.txt` with `<manual_dir>/lfw/<Name>/<Name>_0001.jpg`.

An image that does not decode is an error naming the file and the pair, not a dropped pair: a
benchmark is its fixed pair list (published accuracies are over all of it).

A user's own set is given by path (builder kwarg `path=`, see path_config): a `.bin` file, or an
LFW-format pairs file `pairs.txt@image_dir` (bare `pairs.txt`: images in `lfw/` beside it). Its
config is named after the set and a fingerprint of the path and the files' sizes and times, so it
is prepared once under the TFDS data dir and prepared afresh when a file changes.
"""

import dataclasses
import hashlib
import os
import pathlib
import pickle

import numpy as np
import tensorflow_datasets as tfds

from adam_face.verification_metrics import consecutive_folds  # Folds as the metrics count them.
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


_PATH_SYNTAX = (
    "an insightface verification .bin, or an LFW pairs file as pairs.txt@image_dir "
    "(bare pairs.txt: images in lfw/ beside it)"
)


def _latin1_encode(text, encoding):
  """codecs.encode as Python 3 pickles bytes at protocols 0-2: encode(str, 'latin1') only, so
  the global cannot be used to run any other codec (e.g. a decompressor)."""
  if not isinstance(text, str) or encoding != "latin1":
    raise pickle.UnpicklingError(
        "_codecs.encode is allowed in a verification .bin only as encode(str, 'latin1'), the way "
        f"pickle stores bytes; got encode({type(text).__name__}, {encoding!r})"
    )
  return text.encode("latin1")


def _empty_bytes(*args):
  """bytes() as Python 3 pickles b'' at protocols 0-2; with arguments bytes(n) could allocate
  any amount of memory, so none are accepted."""
  if args:
    raise pickle.UnpicklingError(
        "bytes is allowed in a verification .bin only as bytes(), the way pickle stores b''"
    )
  return b""


class _PairBinUnpickler(pickle.Unpickler):
  """Loads only lists, tuples, bytes, bools and numpy arrays: a .bin is untrusted input.

  Protocols 3-5 store bytes with their own opcodes and Python 2 stores its str (the encoded
  images) as strings, so those need no global; protocols 0-2 of Python 3 rebuild bytes by calling
  _codecs.encode (b'' by bytes()), which are allowed only in that form. numpy arrays and scalars
  (some .bin writers pickle the images as uint8 arrays) rebuild through the numpy functions below,
  under numpy 1's and numpy 2's module names.
  """

  _NUMPY_CORE = getattr(np, "_core", None) or np.core
  _ALLOWED = {
      ("numpy.core.multiarray", "_reconstruct"): _NUMPY_CORE.multiarray._reconstruct,
      ("numpy._core.multiarray", "_reconstruct"): _NUMPY_CORE.multiarray._reconstruct,
      ("numpy.core.multiarray", "scalar"): _NUMPY_CORE.multiarray.scalar,
      ("numpy._core.multiarray", "scalar"): _NUMPY_CORE.multiarray.scalar,
      ("numpy.core.numeric", "_frombuffer"): _NUMPY_CORE.numeric._frombuffer,  # Protocol 5.
      ("numpy._core.numeric", "_frombuffer"): _NUMPY_CORE.numeric._frombuffer,
      ("numpy", "ndarray"): np.ndarray,
      ("numpy", "dtype"): np.dtype,
      ("_codecs", "encode"): _latin1_encode,
      ("__builtin__", "bytes"): _empty_bytes,  # The name protocols 0-2 write (fix_imports).
      ("builtins", "bytes"): _empty_bytes,
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


def read_lfw_pairs(
    pairs_txt: pathlib.Path, image_root: pathlib.Path, instructions: str = _INSTRUCTIONS
):
  """[(path_a, path_b, is_same, fold)] from LFW's pairs.txt.

  The first line gives the number of folds and the pairs per class per fold; each fold then
  lists that many matched lines `name i j` followed by as many mismatched `name1 i name2 j`.
  Missing images raise FileNotFoundError naming the first, followed by `instructions`.
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
        f"(first: {missing[0]}). {instructions}"
    )
  return pairs


def is_path_entry(entry: str) -> bool:
  """Whether a verification-set entry is meant as a path rather than a set name: it names an
  existing file, or has a folder separator, an '@' or a .bin/.txt ending."""
  return (
      os.path.exists(entry)
      or os.sep in entry
      or "/" in entry
      or "@" in entry
      or entry.endswith((".bin", ".txt"))
  )


def _split_entry(entry: str) -> tuple[pathlib.Path, pathlib.Path | None]:
  """(pairs or .bin file, image folder or None) of a path entry; a file whose own name holds an
  '@' is taken whole."""
  if "@" in entry and not os.path.exists(entry):
    file_part, _, images_part = entry.rpartition("@")
    return pathlib.Path(file_part).expanduser(), pathlib.Path(images_part).expanduser()
  return pathlib.Path(entry).expanduser(), None


def path_set_name(entry: str) -> str:
  """The name of a set given by path, used in tables and metric names: the file's stem
  ('dev' for dev.bin), less a 'pairs_' prefix ('dev' for pairs_dev.txt); a file named just
  pairs.txt takes its image folder's name ('lfw' for pairs.txt beside lfw/)."""
  path, image_root = _split_entry(entry)
  if path.suffix == ".bin":
    return path.stem
  if path.stem == "pairs":
    return (image_root or path.parent / "lfw").name
  return path.stem.removeprefix("pairs_")


def _fingerprint(path: pathlib.Path) -> tuple[int, int]:
  stat = path.stat()
  return stat.st_size, stat.st_mtime_ns


@dataclasses.dataclass
class FaceVerificationConfig(tfds.core.BuilderConfig):
  """A set read from the manual directory (both paths None), from a .bin file (bin_path), or
  from an LFW pairs file (pairs_path) and its image folder (image_root)."""

  bin_path: str | None = None
  pairs_path: str | None = None
  image_root: str | None = None


def path_config(entry: str) -> FaceVerificationConfig:
  """The config of a set given by path: `<file>.bin`, `<pairs file>@<image folder>`, or a bare
  `<pairs file>` whose images are in lfw/ beside it.

  Its name is the set's name plus a digest of the resolved paths and of the size and
  modification time of every file read (the .bin; the pairs file and each image it names), so a
  prepared copy is reused only while none of them changed.
  Raises FileNotFoundError naming a missing file or folder and what was expected there.
  """
  path, image_root = _split_entry(entry)
  path = path.resolve()
  if not path.is_file():
    raise FileNotFoundError(
        f"verification set {entry!r}: {path} does not exist; expected {_PATH_SYNTAX}"
    )
  if path.suffix == ".bin":
    if image_root is not None:
      raise ValueError(
          f"verification set {entry!r}: a .bin holds its own images; drop '@{image_root}'"
      )
    fingerprint = (str(path), _fingerprint(path))
    fields = {"bin_path": str(path), "description": f"pairs of {path}"}
  else:
    image_root = (image_root or path.parent / "lfw").resolve()
    if not image_root.is_dir():
      raise FileNotFoundError(
          f"verification set {entry!r}: image folder {image_root} does not exist; expected "
          "<Name>/<Name>_NNNN.jpg under the folder after '@' (bare pairs.txt: under lfw/ beside it)"
      )
    pairs = read_lfw_pairs(path, image_root, f"Expected {_PATH_SYNTAX}.")
    images = sorted({p for a, b, _, _ in pairs for p in (a, b)})
    fingerprint = (
        str(path),
        _fingerprint(path),
        str(image_root),
        [_fingerprint(p) for p in images],
    )
    fields = {
        "pairs_path": str(path),
        "image_root": str(image_root),
        "description": f"pairs of {path}, images in {image_root}",
    }
  name = "".join(c if c.isalnum() else "_" for c in path_set_name(entry))
  digest = hashlib.sha1(repr(fingerprint).encode()).hexdigest()[:12]
  return FaceVerificationConfig(name=f"{name}_{digest}", **fields)


class FaceVerification(tfds.core.GeneratorBasedBuilder):
  """Verification pairs -> {'image_a', 'image_b', 'is_same', 'fold'}."""

  # 1.1.0 so that a set prepared by 1.0.0 less an undecodable image's pair is prepared again.
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
      "1.0.0": "Initial release.",
      "1.1.0": "An undecodable image is an error; 1.0.0 dropped its pair.",
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  BUILDER_CONFIGS = [
      FaceVerificationConfig(name=name, description=f"{name} pairs") for name in SETS
  ]

  def __init__(self, *, path: str | os.PathLike | None = None, **kwargs):
    if path is not None:
      if kwargs.get("config") is not None:
        raise ValueError("face_verification: give either a config name or path=, not both")
      kwargs["config"] = path_config(os.fspath(path))
    super().__init__(**kwargs)

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
    )

  def _split_generators(self, dl_manager):
    config = self.builder_config
    if config.bin_path:
      return {"test": self._generate_examples(self._bin_pairs(pathlib.Path(config.bin_path)))}
    if config.pairs_path:
      pairs_txt, image_root = pathlib.Path(config.pairs_path), pathlib.Path(config.image_root)
      pairs = read_lfw_pairs(pairs_txt, image_root, f"Expected {_PATH_SYNTAX}.")
      return {"test": self._generate_examples(self._lfw_pairs(pairs_txt, pairs))}
    root = manual_data.manual_dir(dl_manager, self.name, _INSTRUCTIONS)
    name = config.name
    bin_path = root / f"{name}.bin"
    if bin_path.exists():
      return {"test": self._generate_examples(self._bin_pairs(bin_path))}
    if name == "lfw" and (root / "pairs.txt").exists():
      pairs = read_lfw_pairs(root / "pairs.txt", root / "lfw")
      return {"test": self._generate_examples(self._lfw_pairs(root / "pairs.txt", pairs))}
    alternative = f" (or {root / 'pairs.txt'} with {root / 'lfw'})" if name == "lfw" else ""
    raise FileNotFoundError(f"{self.name}/{name}: missing {bin_path}{alternative}. {_INSTRUCTIONS}")

  @staticmethod
  def _bin_pairs(bin_path):
    encoded, issame = load_pair_bin(bin_path)
    folds = consecutive_folds(len(issame))
    for i in range(len(issame)):
      yield (
          i,
          (encoded[2 * i], f"{bin_path} pair {i} (image_a: image {2 * i} of the .bin)"),
          (encoded[2 * i + 1], f"{bin_path} pair {i} (image_b: image {2 * i + 1} of the .bin)"),
          issame[i],
          folds[i],
      )

  @staticmethod
  def _lfw_pairs(pairs_txt, pairs):
    for i, (a, b, is_same, fold) in enumerate(pairs):
      yield (
          i,
          (a.read_bytes(), f"{pairs_txt} pair {i} (image_a: {a})"),
          (b.read_bytes(), f"{pairs_txt} pair {i} (image_b: {b})"),
          is_same,
          fold,
      )

  def _generate_examples(self, pairs):
    for i, (data_a, where_a), (data_b, where_b), is_same, fold in pairs:
      try:
        image_a = images.decode(data_a, where_a)
        image_b = images.decode(data_b, where_b)
      except images.UndecodableImageError as e:
        # Published accuracies are over the whole fixed pair list, so a set less a pair would be
        # a different benchmark: refuse it rather than drop the pair.
        raise ValueError(
            f"{e}; a verification set is scored on all its pairs, so none can be dropped: "
            "re-download or re-create the file (see face_verification's instructions)"
        ) from e
      yield (
          i,
          {
              "image_a": images.storable_bytes(data_a, image_a),
              "image_b": images.storable_bytes(data_b, image_b),
              "is_same": bool(is_same),
              "fold": int(fold),
          },
      )
