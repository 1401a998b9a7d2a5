"""The RecordIO reader against files from an independent writer of the MXNet byte format.

The writer (tests/fixtures_data.py) follows the format description in the docstring of
datasets/recordio.py, not the reader: payloads are split wherever the magic word sits at a 4-byte
aligned offset, the word is dropped, and the parts are flagged 1 (first), 2 (middle), 3 (last).
"""

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from datasets import recordio
from fixtures_data import MAGIC_WORD
from fixtures_data import encode_record
from fixtures_data import image_payload
from fixtures_data import meta_payload
from fixtures_data import write_recordio


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
        st.lists(
            st.sampled_from([b"\x00", b"\xff", b"ab", MAGIC_WORD, b"\x0a\x23"]), max_size=12
        ).map(b"".join),
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
