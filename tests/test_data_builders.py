"""Preparing builders (data_builders): clear errors for missing data, TFDS's default dirs, and
images skipped at build time counted in the dataset info."""

import pytest
import tensorflow_datasets as tfds

from adam_face import config_lib
from adam_face import data_builders
from adam_face import train_input
from fixtures_data import encoded_image


def test_missing_dataset_says_what_to_put_where(tmp_path):
  config = config_lib.default_dataset_config(
      name="vggface2", data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "empty")
  )
  expected = r"(?s)/empty does not exist or is empty.*faces_vgg2_112x112 .*train\.rec"
  with pytest.raises(FileNotFoundError, match=expected):
    train_input.create_train_iterator(config, global_batch_size=4, seed=0)


def test_empty_dirs_mean_tfds_defaults(tmp_path, monkeypatch):
  # TFDS reads its default data dir when called, so the test can point it at tmp_path.
  monkeypatch.setattr(tfds.core.constants, "DATA_DIR", str(tmp_path / "default"))
  monkeypatch.chdir(tmp_path)
  expected = f"{tmp_path / 'default' / 'downloads' / 'manual'} does not exist"
  with pytest.raises(FileNotFoundError, match=expected):
    data_builders.prepared_builder("vggface2", data_dir="", manual_dir="")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["default"]


def test_skipped_images_are_counted(tmp_path):
  for name, data in {
      "a/1.jpg": encoded_image(0),
      "a/2.jpg": encoded_image(1),
      "b/1.jpg": encoded_image(2),
      "b/2.jpg": b"garbage",
  }.items():
    (tmp_path / "tree" / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "tree" / name).write_bytes(data)
  config = config_lib.default_dataset_config(
      name="image_folder",
      data_dir=str(tmp_path / "tfds"),
      image_size=8,
      builder_kwargs={"root": str(tmp_path / "tree")},
  )
  info = data_builders.dataset_info(config)
  assert (info["num_classes"], info["num_examples"], info["num_skipped_images"]) == (2, 3, 1)
