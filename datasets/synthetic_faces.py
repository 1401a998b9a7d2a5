"""`synthetic_faces`: the built-in default dataset, drawn procedurally, no download needed.

Each identity is a fixed random face-like template and each image a random pose, expression,
illumination, background, occlusion and noise perturbation of it (see face_renderer). Everything is
a function of (seed, identity, image index), so every machine builds the same dataset.

Splits:
  train    num_identities x images_per_identity images, labels 0..num_identities-1.
  heldout  num_heldout_identities x heldout_images_per_identity images of further identities,
           never seen in training; their label is -1 (no training class) and `identity` tells them
           apart. The 'synthetic' verification set pairs these images (verification_sets).

The default config suits a 2-core laptop (6,000 training images, 240 held-out; about a minute to
build). Builder kwargs with the config's field names make any other size, e.g.
tfds.builder('synthetic_faces', num_identities=16, images_per_identity=4, image_size=32).
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from datasets import face_renderer
from datasets import images


@dataclasses.dataclass
class SyntheticFacesConfig(tfds.core.BuilderConfig):
  num_identities: int = 300
  images_per_identity: int = 20
  num_heldout_identities: int = 30
  heldout_images_per_identity: int = 8
  image_size: int = 112
  seed: int = 0


_SIZE_FIELDS = (
    "num_identities",
    "images_per_identity",
    "num_heldout_identities",
    "heldout_images_per_identity",
    "image_size",
    "seed",
)
DEFAULT_CONFIG = SyntheticFacesConfig(name="default", description="the built-in default size")


def _config_for(**sizes) -> SyntheticFacesConfig:
  values = {f: sizes.get(f, getattr(DEFAULT_CONFIG, f)) for f in _SIZE_FIELDS}
  for field, value in values.items():
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
      raise ValueError(f"synthetic_faces: {field} must be an int, got {value!r}")
  minimum = {
      "num_identities": 1,
      "images_per_identity": 1,
      "num_heldout_identities": 2,
      "heldout_images_per_identity": 2,
      "image_size": 8,
      "seed": 0,
  }
  for field, least in minimum.items():
    if values[field] < least:
      raise ValueError(
          f"synthetic_faces: {field} must be >= {least} (held-out identities "
          f"need two images each and two identities for impostor pairs), got "
          f"{values[field]}"
      )
  if all(values[f] == getattr(DEFAULT_CONFIG, f) for f in _SIZE_FIELDS):
    return DEFAULT_CONFIG
  name = (
      "ids{num_identities}x{images_per_identity}_heldout{num_heldout_identities}x"
      "{heldout_images_per_identity}_{image_size}px_seed{seed}"
  ).format(**values)
  return SyntheticFacesConfig(name=name, description="custom size", **values)


def identity_images(seed: int, identity: int, num_images: int, image_size: int) -> list[np.ndarray]:
  """The first num_images images (uint8 [S, S, 3]) of identity number `identity`."""
  template = face_renderer.sample_identity(np.random.default_rng([seed, 0, identity]))
  return [
      face_renderer.render_face(
          template,
          face_renderer.sample_nuisance(np.random.default_rng([seed, 1, identity, i])),
          image_size,
      )
      for i in range(num_images)
  ]


class SyntheticFaces(tfds.core.GeneratorBasedBuilder):
  """Procedural identities -> {'image', 'label', 'identity'}."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [DEFAULT_CONFIG]

  def __init__(self, **kwargs):
    sizes = {f: kwargs.pop(f) for f in _SIZE_FIELDS if f in kwargs}
    if sizes:
      if kwargs.get("config") is not None:
        raise ValueError("synthetic_faces: give either a config or size kwargs, not both")
      kwargs["config"] = _config_for(**sizes)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(size, size, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=self.builder_config.num_identities),
                "identity": np.int32,
            }
        ),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    config = self.builder_config
    train = range(config.num_identities)
    heldout = range(config.num_identities, config.num_identities + config.num_heldout_identities)
    return {
        "train": self._generate_examples(train, config.images_per_identity, labelled=True),
        "heldout": self._generate_examples(
            heldout, config.heldout_images_per_identity, labelled=False
        ),
    }

  def _generate_examples(self, identities, images_per_identity, labelled):
    config = self.builder_config
    for identity in identities:
      for i, image in enumerate(
          identity_images(config.seed, identity, images_per_identity, config.image_size)
      ):
        yield (
            f"{identity}_{i}",
            {
                "image": images.encode_jpeg(image),
                "label": identity if labelled else -1,
                "identity": identity,
            },
        )
