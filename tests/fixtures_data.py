"""Writers of the small data files tests build their fixtures from (not a test module itself).

* REPO_ROOT: the checkout, for tests that read its configs or notebooks or run its programs.
* encoded_image: a smooth random image, encoded as JPEG, PNG, PPM, BMP, ...
* save_tiny_model: a model directory of the `tiny` network with random weights.
* python2_pair_bin: an insightface verification .bin exactly as Python 2 pickles it.
* encode_record, write_recordio, image_payload, meta_payload: MXNet RecordIO files written from
  the format description (the docstring of datasets/recordio.py), not from that reader's code,
  which they test: payloads are split wherever the magic word sits at a 4-byte aligned offset,
  the word is dropped, and the parts are flagged 1 (first), 2 (middle), 3 (last).
"""

import io
import pathlib
import struct

import numpy as np
from PIL import Image

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# A synthetic_faces build small enough to prepare in a second (test_train_input,
# test_verification_sets and conftest's synthetic_config).
SMALL_SYNTHETIC = dict(
    num_identities=5,
    images_per_identity=4,
    num_heldout_identities=4,
    heldout_images_per_identity=3,
    image_size=20,
)

MAGIC_WORD = b"\x0a\x23\xd7\xce"  # 0xced7230a, little-endian.


def encoded_image(seed: int, size=(112, 112), mode="RGB", fmt="JPEG") -> bytes:
  """A smooth random image (width, height) in `mode`, encoded as `fmt`."""
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
  image = Image.fromarray(small).resize(size, Image.Resampling.BILINEAR).convert(mode)
  buffer = io.BytesIO()
  image.save(buffer, format=fmt)
  return buffer.getvalue()


def python2_pair_bin(bins: list[bytes], issame: list[bool]) -> bytes:
  """(bins, issame) pickled as Python 2 does at protocol 2: str as (SHORT_)BINSTRING opcodes."""
  out = [b"\x80\x02", b"]q\x01("]  # PROTO 2; EMPTY_LIST, BINPUT (memo, as Python 2 does), MARK
  for b in bins:
    if len(b) < 256:
      out.append(b"U" + bytes([len(b)]) + b)  # SHORT_BINSTRING
    else:
      out.append(b"T" + struct.pack("<i", len(b)) + b)  # BINSTRING
  out.append(b"e](")  # APPENDS; EMPTY_LIST, MARK
  out.extend(b"\x88" if s else b"\x89" for s in issame)  # NEWTRUE / NEWFALSE
  out.append(b"e\x86.")  # APPENDS, TUPLE2, STOP
  return b"".join(out)


def _part(cflag: int, data: bytes) -> bytes:
  return (
      MAGIC_WORD
      + struct.pack("<I", (cflag << 29) | len(data))
      + data
      + b"\x00" * ((4 - len(data) % 4) % 4)
  )


def encode_record(payload: bytes) -> bytes:
  """One logical record as MXNet's writer lays it out."""
  parts, start = [], 0
  for pos in range(0, len(payload) - 3, 4):
    if payload[pos : pos + 4] == MAGIC_WORD:
      parts.append(payload[start:pos])
      start = pos + 4
  parts.append(payload[start:])
  if len(parts) == 1:
    return _part(0, parts[0])
  flags = [1] + [2] * (len(parts) - 2) + [3]
  return b"".join(_part(f, p) for f, p in zip(flags, parts))


def write_recordio(rec_path, idx_path, records: dict[int, bytes]) -> None:
  """Writes records {key: payload} in key order, with the `.idx` of their byte offsets."""
  blob, lines = b"", []
  for key in sorted(records):
    lines.append(f"{key}\t{len(blob)}\n")
    blob += encode_record(records[key])
  rec_path.write_bytes(blob)
  idx_path.write_text("".join(lines))


def image_payload(label, image: bytes, record_id: int = 0) -> bytes:
  """Header `<IfQQ` then, for a label sequence, flag=len float32 labels, then the image bytes."""
  if np.ndim(label) == 0:
    return struct.pack("<IfQQ", 0, float(label), record_id, 0) + image
  labels = np.asarray(label, np.float32)
  return struct.pack("<IfQQ", len(labels), 0.0, record_id, 0) + labels.tobytes() + image


def meta_payload(num_images: int, num_identities: int) -> bytes:
  """Record 0 of the insightface layout: labels (first identity record, end of those)."""
  return image_payload([num_images + 1, num_images + 1 + num_identities], b"")


def save_tiny_model(path: str, image_size: int = 32, embedding_dim: int = 32) -> str:
  """Writes a model directory (adam_face/model_dir.py) of a randomly initialised `tiny` network at
  `path`; returns path."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from adam_face import model_dir, models  # pylint: disable=g-import-not-at-top

  model_config = {"name": "tiny", "embedding_dim": embedding_dim}
  model = models.create_model(**model_config)
  # Jitted, with the rbg generator: its init compiles in a fraction of threefry's time.
  variables = jax.jit(lambda x: model.init(jax.random.key(0, impl="rbg"), x, train=False))(
      jnp.zeros((1, image_size, image_size, 3))
  )
  model_dir.save(
      path, model_config=model_config, image_size=image_size, variables=variables, source="test"
  )
  return path
