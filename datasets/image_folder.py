"""`image_folder`: any identity-folder tree (`<root>/<identity>/<image>`) as a labelled dataset.

Labels number the identity folders in natural order ('s2' before 's10'); the label names are the
folder names. Images are stored as they are when TensorFlow can decode them (JPEG, PNG) and as PNG
otherwise (e.g. the ORL faces' PGM files), at their own size; the input pipeline converts them to
3-channel image_size x image_size.

Configs:
  image_folder/manual      the tree in the manual directory (default).
  image_folder/orl         the ORL faces beside the checkout (../shared/data/orl_faces, or
                           $ADAM_FACE_ORL_DIR): 40 identities s1..s40, 400 images.
  image_folder/orl_s1_s30  the ORL training view: identities s1..s30 only, so s31..s40 stay unseen
                           for verification.
Builder kwargs `root=` and/or `identities=` select any other tree or subset (a config named after
them is made, so different selections never share a prepared copy).
"""

import dataclasses
import hashlib
import os
import pathlib
from typing import Callable, Iterator

import tensorflow_datasets as tfds
from PIL import Image

from datasets import images
from datasets import manual_data

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
ORL_IDENTITIES = tuple(f"s{i}" for i in range(1, 41))
ORL_TRAIN_IDENTITIES = ORL_IDENTITIES[:30]
ORL_VERIFICATION_IDENTITIES = ORL_IDENTITIES[30:]

_MANUAL_INSTRUCTIONS = """\
Put one folder per identity in the manual directory, each holding that person's images:
<manual_dir>/<identity>/<image>.jpg (any format pillow reads: jpg, png, pgm, bmp, ...). Or pass
the tree's location as the builder kwarg root=... (e.g. dataset_config.builder_kwargs.root)."""


def orl_faces_dir() -> pathlib.Path:
  """$ADAM_FACE_ORL_DIR, else ../shared/data/orl_faces relative to the repository root."""
  return pathlib.Path(
      os.environ.get("ADAM_FACE_ORL_DIR", REPO_ROOT.parent / "shared" / "data" / "orl_faces")
  )


def scan_identity_folders(
    root: pathlib.Path, identities: tuple[str, ...] | None = None
) -> list[tuple[str, list[pathlib.Path]]]:
  """[(identity, sorted image paths)] for the sub-folders of root, in natural order.

  Args:
    root: the tree's top folder.
    identities: folder names to keep (all when None); each must exist and hold images.
  Raises:
    FileNotFoundError: root is missing, holds no identity folder with images, or lacks a
      requested identity.
  """
  root = pathlib.Path(root)
  if not root.is_dir():
    raise FileNotFoundError(f"identity-folder root {root} does not exist")
  folders = {p.name: p for p in root.iterdir() if p.is_dir()}
  if identities is not None:
    missing = [name for name in identities if name not in folders]
    if missing:
      raise FileNotFoundError(f"{root} has no identity folder {', '.join(missing)}")
    folders = {name: folders[name] for name in identities}
  scanned = []
  for name in sorted(folders, key=images.natural_key):
    files = sorted(
        (p for p in folders[name].iterdir() if p.is_file() and images.is_image_file(p.name)),
        key=lambda p: images.natural_key(p.name),
    )
    if files:
      scanned.append((name, files))
    elif identities is not None:
      raise FileNotFoundError(f"identity folder {folders[name]} holds no image files")
  if not scanned:
    raise FileNotFoundError(
        f"{root} holds no identity folders with images (expected <root>/<identity>/<image>)"
    )
  return scanned


ImageToBytes = Callable[[str, pathlib.Path, bytes, Image.Image], bytes]


def identity_folder_examples(
    scanned: list[tuple[str, list[pathlib.Path]]],
    to_bytes: ImageToBytes,
    skipped: images.SkippedImages,
) -> Iterator[tuple[str, dict]]:
  """Yields (key, {'image': bytes, 'label': int}) for every decodable image of `scanned`.

  Args:
    scanned: output of scan_identity_folders; labels are positions in it.
    to_bytes: (identity, path, file bytes, decoded image) -> the bytes to store.
    skipped: records the files that do not decode.
  """
  for label, (identity, files) in enumerate(scanned):
    for path in files:
      data = path.read_bytes()
      try:
        image = images.decode(data, str(path))
      except images.UndecodableImageError as e:
        skipped.skip(e)
        continue
      yield (
          f"{identity}/{path.name}",
          {"image": to_bytes(identity, path, data, image), "label": label},
      )


@dataclasses.dataclass
class ImageFolderConfig(tfds.core.BuilderConfig):
  """root: the tree (None: the manual directory); identities: folder names to keep (None: all)."""

  root: str | None = None
  identities: tuple[str, ...] | None = None


def _custom_config(root: str | None, identities) -> ImageFolderConfig:
  root = None if root is None else str(pathlib.Path(root).resolve())
  identities = None if identities is None else tuple(identities)
  digest = hashlib.sha1(repr((root, identities)).encode()).hexdigest()[:12]
  base = (
      "manual"
      if root is None
      else "".join(c if c.isalnum() else "_" for c in pathlib.Path(root).name)
  )
  return ImageFolderConfig(
      name=f"{base}_{digest}",
      root=root,
      identities=identities,
      description=f"identity folders of {root or 'the manual directory'}"
      + (f", identities {', '.join(identities)}" if identities else ""),
  )


class ImageFolder(tfds.core.GeneratorBasedBuilder):
  """Identity-folder tree -> {'image', 'label'}, one class per folder."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_INSTRUCTIONS
  BUILDER_CONFIGS = [
      ImageFolderConfig(name="manual", description="identity folders of the manual directory"),
      ImageFolderConfig(
          name="orl",
          root=str(orl_faces_dir()),
          identities=ORL_IDENTITIES,
          description="ORL faces, s1..s40",
      ),
      ImageFolderConfig(
          name="orl_s1_s30",
          root=str(orl_faces_dir()),
          identities=ORL_TRAIN_IDENTITIES,
          description="ORL faces training view, s1..s30",
      ),
  ]

  def __init__(self, *, root: str | os.PathLike | None = None, identities=None, **kwargs):
    if root is not None or identities is not None:
      if kwargs.get("config") is not None:
        raise ValueError("image_folder: give either a config name or root=/identities=, not both")
      kwargs["config"] = _custom_config(root, identities)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(),  # Names are set from the folders found.
            }
        ),
        supervised_keys=("image", "label"),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    config = self.builder_config
    if config.root is None:
      root = manual_data.manual_dir(dl_manager, self.name, _MANUAL_INSTRUCTIONS)
    else:
      root = pathlib.Path(config.root)
      if not root.is_dir():
        hint = (
            "The ORL faces belong at ../shared/data/orl_faces beside the checkout, or "
            "set $ADAM_FACE_ORL_DIR."
            if config.name.startswith("orl")
            else ""
        )
        raise FileNotFoundError(f"image_folder/{config.name}: {root} does not exist. {hint}")
    scanned = scan_identity_folders(root, config.identities)
    self.info.features["label"].names = [identity for identity, _ in scanned]
    return {"train": self._generate_examples(scanned)}

  def _generate_examples(self, scanned):
    skipped = images.SkippedImages(f"{self.name}/{self.builder_config.name}", "train")
    yield from identity_folder_examples(
        scanned, lambda identity, path, data, image: images.storable_bytes(data, image), skipped
    )
    skipped.record(self.info.metadata)
