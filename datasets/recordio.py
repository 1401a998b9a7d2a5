"""A pure-Python reader of MXNet RecordIO files (`train.rec` + `train.idx`), as insightface ships.

MXNet itself is not installable here, and only reading is needed, so the byte format is decoded
directly. On disk every record is

    uint32 magic 0xced7230a | uint32 lrecord | payload | zero padding to a 4-byte boundary

where the upper 3 bits of `lrecord` are a continuation flag and the lower 29 bits the payload
length.
A writer that meets the magic word at a 4-byte aligned position inside a payload splits the payload
there and drops that word, so a reader never mistakes payload bytes for a record start: the parts
carry flags 1 (first), 2 (middle), 3 (last), and the reader joins them with the magic word put back.
Whole records carry flag 0.

A payload starts with the image-record header `<IfQQ` (flag, label, id, id2). When flag > 0 the
label is instead the `flag` float32 values that follow the header. The rest is the encoded image.
In the insightface releases record 0 is a meta record whose first label is one past the last image
record, so image records are the keys [1, label[0]); identity records follow them.
"""

import dataclasses
import os
import struct
from typing import BinaryIO

import numpy as np

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_RECORD_HEAD = struct.Struct("<II")  # magic, lrecord
_IMAGE_HEADER = struct.Struct("<IfQQ")  # flag, label, id, id2
_LENGTH_MASK = (1 << 29) - 1

# Continuation flags of a record part.
_WHOLE, _FIRST, _MIDDLE, _LAST = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class ImageRecordHeader:
  """The header of an image record.

  `labels` holds one value when flag == 0 (the scalar label field) and `flag` values otherwise.
  """

  flag: int
  labels: np.ndarray
  id: int
  id2: int


def unpack_image_record(payload: bytes) -> tuple[ImageRecordHeader, bytes]:
  """Splits a record payload into its header and the encoded image bytes."""
  if len(payload) < _IMAGE_HEADER.size:
    raise ValueError(
        f"record payload has {len(payload)} bytes, fewer than the {_IMAGE_HEADER.size}-byte "
        "image header"
    )
  flag, label, id_, id2 = _IMAGE_HEADER.unpack_from(payload)
  rest = payload[_IMAGE_HEADER.size :]
  if flag == 0:
    labels = np.array([label], np.float32)
  else:
    if len(rest) < 4 * flag:
      raise ValueError(f"record header announces {flag} labels but the payload is too short")
    labels = np.frombuffer(rest, np.float32, count=flag).copy()
    rest = rest[4 * flag :]
  return ImageRecordHeader(flag=flag, labels=labels, id=id_, id2=id2), rest


def read_index(idx_path: str | os.PathLike) -> dict[int, int]:
  """Parses a `.idx` file (`key<TAB>byte_offset` per line) into {key: offset}, in file order."""
  index = {}
  with open(idx_path, "r") as f:
    for line_number, line in enumerate(f, start=1):
      line = line.strip()
      if not line:
        continue
      fields = line.split("\t")
      if len(fields) != 2:
        raise ValueError(f"{idx_path}:{line_number}: expected 'key<TAB>offset', got {line!r}")
      index[int(fields[0])] = int(fields[1])
  return index


class DamagedRecordError(ValueError):
  """A record whose bytes do not parse as a record; `where` names the file and record key."""

  def __init__(self, where: str, problem: str):
    super().__init__(f"{where}: {problem}")
    self.where = where


def _read_part(f: BinaryIO, where: str) -> tuple[int, bytes]:
  head = f.read(_RECORD_HEAD.size)
  if len(head) != _RECORD_HEAD.size:
    raise DamagedRecordError(where, "file ends inside a record header")
  magic, lrecord = _RECORD_HEAD.unpack(head)
  if magic != MAGIC:
    raise DamagedRecordError(
        where,
        f"bad magic 0x{magic:08x} (expected 0x{MAGIC:08x}); the record is damaged or the .idx "
        "offsets do not match the .rec file",
    )
  cflag, length = lrecord >> 29, lrecord & _LENGTH_MASK
  payload = f.read(length)
  if len(payload) != length:
    raise DamagedRecordError(where, f"file ends inside a {length}-byte payload")
  f.seek((-length) % 4, os.SEEK_CUR)  # Skip the padding to the next 4-byte boundary.
  return cflag, payload


class IndexedRecordReader:
  """Random access to the records of a `.rec` file through its `.idx` file.

  Usage:
      with IndexedRecordReader('train.rec', 'train.idx') as reader:
          header, image_bytes = unpack_image_record(reader.read(1))
  """

  def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike):
    self.rec_path = os.fspath(rec_path)
    self._offsets = read_index(idx_path)
    self._file = open(self.rec_path, "rb")

  @property
  def keys(self) -> list[int]:
    return list(self._offsets)

  def __len__(self) -> int:
    return len(self._offsets)

  def read(self, key: int) -> bytes:
    """Returns the payload of record `key`, with split parts joined."""
    if key not in self._offsets:
      raise KeyError(f"record {key} is not in the index of {self.rec_path}")
    where = f"{self.rec_path} record {key}"
    self._file.seek(self._offsets[key])
    cflag, payload = _read_part(self._file, where)
    if cflag == _WHOLE:
      return payload
    if cflag != _FIRST:
      raise DamagedRecordError(where, f"starts with continuation flag {cflag}, expected 0 or 1")
    parts = [payload]
    while cflag != _LAST:
      cflag, payload = _read_part(self._file, where)
      if cflag not in (_MIDDLE, _LAST):
        raise DamagedRecordError(where, f"continuation part has flag {cflag}, expected 2 or 3")
      parts.append(payload)
    return _MAGIC_BYTES.join(parts)

  def read_image(self, key: int) -> tuple[ImageRecordHeader, bytes]:
    """(header, encoded image) of record `key`; DamagedRecordError if its bytes do not parse."""
    payload = self.read(key)
    try:
      return unpack_image_record(payload)
    except ValueError as e:
      raise DamagedRecordError(f"{self.rec_path} record {key}", str(e)) from e

  def image_keys(self) -> list[int]:
    """Keys of the image records: [1, label[0]) per the meta record 0, else every key."""
    if 0 in self._offsets:
      header, _ = self.read_image(0)
      if header.flag > 0:
        end = int(header.labels[0])
        missing = [k for k in range(1, end) if k not in self._offsets]
        if missing:
          raise ValueError(
              f"{self.rec_path}: the meta record lists image records 1..{end - 1}, but "
              f"{len(missing)} of them (first: {missing[0]}) are not in the index"
          )
        return list(range(1, end))
    return self.keys

  def close(self) -> None:
    self._file.close()

  def __enter__(self) -> "IndexedRecordReader":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
