"""A toy embedding network and its numpy reference, shared by test_embedding and test_verification,
and planted pair scores for the metrics' tests (not a test module itself)."""

import numpy as np

IMAGE_SHAPE = (4, 6, 3)  # [H, W, C] of the toy images.
EMBEDDING_DIM = 5


def projection() -> np.ndarray:
  """The toy network's weights: a fixed random map of the flattened pixels to EMBEDDING_DIM."""
  return (
      np.random.default_rng(0)
      .normal(size=(int(np.prod(IMAGE_SHAPE)), EMBEDDING_DIM))
      .astype(np.float32)
  )


def toy_embed(weights, images):
  """The toy network: flattened pixels [b, H * W * C] times the weights, [b, EMBEDDING_DIM]."""
  return images.reshape(images.shape[0], -1) @ weights


def reference_embeddings(weights, images_uint8, flip):
  """What embedding.compute_embeddings must return for toy_embed, computed here in numpy.

  The normalisation is written out on purpose: the reference must not share code with what it
  checks.
  """
  x = (images_uint8.astype(np.float32) - 127.5) / 127.5
  emb = x.reshape(len(x), -1) @ weights
  emb_flipped = x[:, :, ::-1].reshape(len(x), -1) @ weights
  emb = {"none": emb, "sum": emb + emb_flipped, "concat": np.concatenate([emb, emb_flipped], 1)}[
      flip
  ]
  return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def planted_hetd_scores(seed=1):
  """{set: {'scores', 'is_same', 'fold'}} for LFW (60 pairs), CFP-FP (70) and AgeDB-30 (60):
  genuine scores centred at 0.6, impostors at 0, noise 0.3, 10 consecutive folds each."""
  from adam_face import verification_metrics  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  parts = {}
  for name, size in (("lfw", 60), ("cfp_fp", 70), ("agedb_30", 60)):
    is_same = np.tile([True, False], size // 2)
    parts[name] = {
        "scores": np.where(is_same, 0.6, 0.0) + rng.normal(0, 0.3, size),
        "is_same": is_same,
        "fold": verification_metrics.consecutive_folds(size),
    }
  return parts
