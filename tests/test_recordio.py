"""The RecordIO reader against files from an independent writer of the MXNet byte format.

The writer here follows the format description (data/README.md), not the reader: payloads are split
wherever the magic word sits at a 4-byte aligned offset, the word is dropped, and the parts are
flagged 1 (first), 2 (middle), 3 (last).
"""

import struct

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from datasets import recordio

MAGIC_WORD = b"\x0a\x23\xd7\xce"  # 0xced7230a, little-endian.


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


def test_split_records_come_back_whole(tmp_path):
  payloads = {
    0: b"",
    1: b"abc",
    2: MAGIC_WORD,  # Only the magic word: two empty parts.
    3: b"abcd" + MAGIC_WORD + b"efgh" + MAGIC_WORD,  # Split twice, ending on the word.
    4: MAGIC_WORD + MAGIC_WORD + b"xy",  # Consecutive words: an empty middle part.
    5: b"ab" + MAGIC_WORD + b"cd",  # Unaligned: not split.
  }
  encoded = {k: encode_record(p) for k, p in payloads.items()}
  assert encoded[2].count(MAGIC_WORD) == 2 and encoded[5].count(MAGIC_WORD) == 2
  assert encoded[4].count(MAGIC_WORD) == 3
  write_recordio(tmp_path / "a.rec", tmp_path / "a.idx", payloads)
  with recordio.IndexedRecordReader(tmp_path / "a.rec", tmp_path / "a.idx") as reader:
    assert reader.keys == sorted(payloads)
    for key in reversed(sorted(payloads)):  # Random access, not just in file order.
      assert reader.read(key) == payloads[key]


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(
  st.lists(
    st.lists(st.sampled_from([b"\x00", b"\xff", b"ab", MAGIC_WORD, b"\x0a\x23"]), max_size=12).map(
      b"".join
    ),
    min_size=1,
    max_size=6,
  )
)
def test_any_payloads_round_trip(tmp_path_factory, payload_list):
  tmp_path = tmp_path_factory.mktemp("rec")
  payloads = dict(enumerate(payload_list))
  write_recordio(tmp_path / "a.rec", tmp_path / "a.idx", payloads)
  with recordio.IndexedRecordReader(tmp_path / "a.rec", tmp_path / "a.idx") as reader:
    assert {k: reader.read(k) for k in reader.keys} == payloads


def test_unpack_image_record_single_and_multi_label():
  header, image = recordio.unpack_image_record(image_payload(7, b"JPEG..", record_id=5))
  assert (header.flag, header.id) == (0, 5)
  np.testing.assert_array_equal(header.labels, [7.0])
  assert image == b"JPEG.."
  header, image = recordio.unpack_image_record(image_payload([3, 1.5], b"\xff\xd8"))
  assert header.flag == 2
  np.testing.assert_array_equal(header.labels, [3.0, 1.5])
  assert image == b"\xff\xd8"
  with pytest.raises(ValueError, match="image header"):
    recordio.unpack_image_record(b"short")


def test_image_keys_follow_the_meta_record(tmp_path):
  records = {0: meta_payload(num_images=3, num_identities=2)}
  records.update({k: image_payload(k % 2, b"img") for k in (1, 2, 3)})
  records.update({4: image_payload([1, 3], b""), 5: image_payload([3, 4], b"")})  # Identities.
  write_recordio(tmp_path / "a.rec", tmp_path / "a.idx", records)
  with recordio.IndexedRecordReader(tmp_path / "a.rec", tmp_path / "a.idx") as reader:
    assert reader.image_keys() == [1, 2, 3]


def test_without_meta_record_every_key_is_an_image(tmp_path):
  records = {k: image_payload(0, b"img") for k in (0, 1, 2)}
  write_recordio(tmp_path / "a.rec", tmp_path / "a.idx", records)
  with recordio.IndexedRecordReader(tmp_path / "a.rec", tmp_path / "a.idx") as reader:
    assert reader.image_keys() == [0, 1, 2]


def test_wrong_offsets_and_truncation_are_reported(tmp_path):
  write_recordio(tmp_path / "a.rec", tmp_path / "a.idx", {0: b"abcdefgh", 1: b"ijkl"})
  (tmp_path / "bad.idx").write_text("0\t0\n1\t4\n")
  with recordio.IndexedRecordReader(tmp_path / "a.rec", tmp_path / "bad.idx") as reader:
    with pytest.raises(ValueError, match="record 1: bad magic"):
      reader.read(1)
    with pytest.raises(KeyError, match="record 9"):
      reader.read(9)
  (tmp_path / "cut.rec").write_bytes((tmp_path / "a.rec").read_bytes()[:12])
  with recordio.IndexedRecordReader(tmp_path / "cut.rec", tmp_path / "a.idx") as reader:
    with pytest.raises(ValueError, match="ends inside a 8-byte payload"):
      reader.read(0)
  (tmp_path / "malformed.idx").write_text("0 0\n")
  with pytest.raises(ValueError, match="malformed.idx:1"):
    recordio.read_index(tmp_path / "malformed.idx")
