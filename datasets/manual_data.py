"""Clear errors for manually downloaded data that is missing or misplaced."""

import pathlib

import tensorflow_datasets as tfds


def manual_dir(
    dl_manager: tfds.download.DownloadManager, dataset: str, instructions: str
) -> pathlib.Path:
  """The manual directory, or FileNotFoundError saying what to put there."""
  try:
    return pathlib.Path(dl_manager.manual_dir)
  except AssertionError as e:  # TFDS's way of saying the directory is missing or empty.
    # TFDS's first line names the directory and ends by introducing the instructions.
    raise FileNotFoundError(
        f"{dataset}: {str(e).splitlines()[0]}\n{instructions}\nThe manual directory is "
        "tfds.download.DownloadConfig(manual_dir=...), or the dataset config's manual_dir; "
        "by default <data_dir>/downloads/manual."
    ) from e


def require(paths: list[pathlib.Path], dataset: str, instructions: str) -> None:
  """Raises FileNotFoundError naming each missing path, followed by the instructions."""
  missing = [str(p) for p in paths if not p.exists()]
  if missing:
    raise FileNotFoundError(f"{dataset}: missing {', '.join(missing)}. {instructions}")
