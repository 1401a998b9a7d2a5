"""Verification pair sets as numpy arrays, by name or by path, for evaluation in and after training.

A set is {'image_a', 'image_b': uint8 [N, S, S, 3], 'is_same': bool [N], 'fold': int32 [N]},
decoded exactly as training decodes (train_input.decode_image), so the pixels are PIL's.

An entry of config.verification.sets is one of VERIFICATION_SETS, or a path:
  /data/dev.bin                         an insightface verification .bin; set 'dev'
  /data/pairs_dev.txt@/data/dev_images  an LFW-format pairs file and its image folder
                                        (<Name>/<Name>_NNNN.jpg); set 'dev'
  /data/pairs.txt                       an LFW-format pairs file with its images in lfw/
                                        beside it; set 'lfw'
A path set goes through the face_verification builder with a config derived from the path and
the files' sizes and times (datasets/face_verification.py: path_config), so it is prepared once
under the TFDS data dir, and again when a file changes.
"""

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from adam_face import data_builders
from adam_face import train_input
from datasets import face_verification
from datasets import image_folder
from datasets import pairs

VERIFICATION_SETS = face_verification.SETS + ("synthetic", "orl")


def set_name(entry: str) -> str:
  """The name of a verification-set entry in tables and metric names: a known set's own name,
  or for a path the file's stem (see face_verification.path_set_name: 'dev' for dev.bin and
  pairs_dev.txt)."""
  if entry in VERIFICATION_SETS or not face_verification.is_path_entry(entry):
    return entry
  return face_verification.path_set_name(entry)


def decoded_uint8(
    ds: tf.data.Dataset, image_keys: tuple[str, ...], image_size: int, other_keys: tuple[str, ...]
) -> dict[str, np.ndarray]:
  """Reads all of ds (with undecoded images) into numpy, images as uint8 [N, S, S, 3]."""

  def decode(example):
    out = {k: example[k] for k in other_keys}
    for k in image_keys:
      image = train_input.decode_image(example[k], image_size)
      out[k] = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    return out

  batches = list(
      ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE).batch(256).prefetch(1).as_numpy_iterator()
  )
  return {k: np.concatenate([b[k] for b in batches]) for k in image_keys + other_keys}


def _images_of(builder, split: str, image_size: int) -> dict[str, np.ndarray]:
  ds = builder.as_dataset(
      split=split,
      shuffle_files=False,
      decoders={"image": tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(try_autocache=False),
  )
  keys = tuple(k for k in ("label", "identity") if k in builder.info.features)
  return decoded_uint8(ds, ("image",), image_size, keys)


def _pairs_of(images: np.ndarray, identities: np.ndarray, **pair_kwargs) -> dict[str, np.ndarray]:
  chosen = pairs.make_pairs(identities, **pair_kwargs)
  return {
      "image_a": images[chosen["index_a"]],
      "image_b": images[chosen["index_b"]],
      "is_same": chosen["is_same"],
      "fold": chosen["fold"],
  }


def _balanced_pairs_of(images: np.ndarray, identities: np.ndarray) -> dict[str, np.ndarray]:
  """Every genuine pair and as many seeded impostor pairs, as LFW balances them: with every
  impostor pair (91 % of ORL's) accuracy would mostly score a threshold that rejects everything."""
  counts = np.unique(identities, return_counts=True)[1]
  num_genuine = int(sum(n * (n - 1) // 2 for n in counts))
  return _pairs_of(images, identities, num_impostor_pairs=num_genuine)


def _face_verification_pairs(builder, image_size: int) -> dict[str, np.ndarray]:
  ds = builder.as_dataset(
      split="test",
      shuffle_files=False,
      decoders={"image_a": tfds.decode.SkipDecoding(), "image_b": tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(try_autocache=False),
  )
  out = decoded_uint8(ds, ("image_a", "image_b"), image_size, ("is_same", "fold"))
  return {
      "image_a": out["image_a"],
      "image_b": out["image_b"],
      "is_same": out["is_same"].astype(bool),
      "fold": out["fold"].astype(np.int32),
  }


def load_verification_set(
    name: str,
    *,
    data_dir: str | None = None,
    image_size: int = 112,
    builder_kwargs=None,
    manual_dir: str | None = None,
) -> dict[str, np.ndarray]:
  """A verification pair set: {'image_a', 'image_b': uint8 [N, S, S, 3], 'is_same': bool [N],
  'fold': int32 [N]}.

  Args:
    name: one of VERIFICATION_SETS, or a path (see the module docstring). 'lfw', 'cfp_fp', ...
      read face_verification/<name>; 'synthetic' pairs the held-out identities of
      synthetic_faces (every genuine pair and as many impostor pairs, seeded), 'orl' ORL's
      s31..s40 (all 450 genuine pairs and 450 seeded impostor pairs), both in 10 folds; a path
      reads the file through face_verification with path=name.
    data_dir: TFDS data directory (None: TFDS's default).
    image_size: side of the square images returned.
    builder_kwargs: for 'synthetic', the synthetic_faces sizes used in training.
    manual_dir: for the face_verification sets, where the .bin files (or LFW's pairs.txt tree)
      lie.
  Raises:
    FileNotFoundError: a path entry names a missing file or image folder.
    ValueError: name is neither a known set nor a path.
  """
  if name in face_verification.SETS:
    builder = data_builders.prepared_builder(
        f"face_verification/{name}", data_dir=data_dir, manual_dir=manual_dir
    )
    return _face_verification_pairs(builder, image_size)
  if name == "synthetic":
    builder = data_builders.prepared_builder(
        "synthetic_faces", data_dir=data_dir, builder_kwargs=builder_kwargs
    )
    heldout = _images_of(builder, "heldout", image_size)
    return _balanced_pairs_of(heldout["image"], heldout["identity"])
  if name == "orl":
    builder = data_builders.prepared_builder("image_folder/orl", data_dir=data_dir)
    orl = _images_of(builder, "train", image_size)
    names = np.array(builder.info.features["label"].names)[orl["label"]]
    keep = np.isin(names, image_folder.ORL_VERIFICATION_IDENTITIES)
    return _balanced_pairs_of(orl["image"][keep], names[keep])
  if face_verification.is_path_entry(name):
    builder = data_builders.prepared_builder(
        "face_verification", data_dir=data_dir, builder_kwargs={"path": name}
    )
    return _face_verification_pairs(builder, image_size)
  raise ValueError(
      f"unknown verification set {name!r}; known: {', '.join(VERIFICATION_SETS)}, or a path to a "
      ".bin file or an LFW pairs file (pairs.txt@image_dir)"
  )
