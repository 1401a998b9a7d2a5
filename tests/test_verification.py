"""Tests of adam_face.verification: the Evaluator on toy sets, and the whole path (embeddings on the
mesh, then metrics) against numbers recorded on real faces (ORL)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from adam_face import embedding
from adam_face import verification
from adam_face import verification_metrics
import toy_embeddings

# ---------------------------------------------------------------------------------------------
# Evaluator.


@pytest.fixture(scope="module")
def toy_embed_fn():
  return jax.tree_util.Partial(toy_embeddings.toy_embed, jnp.asarray(toy_embeddings.projection()))


def _toy_set(rng, num_pairs, shape=toy_embeddings.IMAGE_SHAPE):
  image_a = rng.integers(0, 256, size=(num_pairs,) + shape, dtype=np.uint8)
  is_same = np.arange(num_pairs) % 2 == 0
  noise = rng.integers(-40, 41, size=image_a.shape)
  image_b = np.where(
      is_same[:, None, None, None],
      np.clip(image_a + noise, 0, 255),
      rng.integers(0, 256, size=image_a.shape),
  ).astype(np.uint8)
  return {
      "image_a": image_a,
      "image_b": image_b,
      "is_same": is_same,
      "fold": verification_metrics.consecutive_folds(num_pairs),
  }


def test_evaluator_scores_every_set_and_hetd(toy_embed_fn, mesh8):
  rng = np.random.default_rng(2)
  sets = {"lfw": _toy_set(rng, 40), "cfp_fp": _toy_set(rng, 50), "agedb_30": _toy_set(rng, 30)}
  result = verification.Evaluator(sets, batch_size=16, mesh=mesh8)(toy_embed_fn)

  assert list(result.metrics) == ["lfw", "cfp_fp", "agedb_30", "hetd"]
  assert list(result.curves) == ["lfw", "cfp_fp", "agedb_30", "hetd"]
  assert result.metrics["hetd"]["num_genuine"] == 60
  lfw = sets["lfw"]
  projection = toy_embeddings.projection()
  expected = verification_metrics.verification_metrics(
      toy_embeddings.reference_embeddings(projection, lfw["image_a"], "sum"),
      toy_embeddings.reference_embeddings(projection, lfw["image_b"], "sum"),
      lfw["is_same"],
      lfw["fold"],
  )
  assert result.metrics["lfw"]["accuracy"] == pytest.approx(expected["accuracy"])
  assert result.metrics["lfw"]["auc"] == pytest.approx(expected["auc"], abs=1e-6)

  scalars = result.scalars()
  assert scalars["lfw/accuracy"] == result.metrics["lfw"]["accuracy"]
  assert "hetd/tar@far=3e-4" in scalars and "lfw/tar@far=3e-3" in scalars
  assert all(isinstance(value, float) for value in scalars.values())
  assert not any(key.endswith("fold_accuracy") for key in scalars)


def test_evaluator_without_all_hetd_members_skips_hetd(toy_embed_fn, mesh8):
  sets = {"lfw": _toy_set(np.random.default_rng(3), 20)}
  result = verification.Evaluator(sets, batch_size=8, mesh=mesh8, flip="none")(toy_embed_fn)
  assert list(result.metrics) == ["lfw"]
  with pytest.raises(ValueError, match="lacks \\['fold'\\]"):
    verification.Evaluator(
        {"lfw": {k: v for k, v in sets["lfw"].items() if k != "fold"}}, batch_size=8, mesh=mesh8
    )


# ---------------------------------------------------------------------------------------------
# Real faces: ORL s31..s40, every pair (450 genuine, 4500 impostor), 10 consecutive folds.

# Recorded with raw pixels centred per image as the embedding. pair_scores of these float64
# embeddings are the exact cosines rounded to float32 (float32 dot products are off by up to
# ~1e-6, enough to swap a genuine/impostor pair: 1 / (450 * 4500) = 4.9e-7 of AUC each).
_ORL_RECORDED = {
    "accuracy": 0.9446464646464644,
    "accuracy_std": 0.03355238705782092,
    "tar@far=1e-1": 0.78,
    "tar@far=1e-2": 0.5066666666666667,
    "tar@far=3e-3": 0.44666666666666666,
    "tar@far=1e-3": 0.41333333333333333,
    "auc": 0.9041955555555555,
    "eer": 0.18000000000000005,
}


@pytest.fixture(scope="module")
def orl_pairs(orl_dir):
  images, people = [], []
  for person in range(31, 41):
    for index in range(1, 11):
      with Image.open(orl_dir / f"s{person}" / f"{index}.pgm") as pgm:
        images.append(np.asarray(pgm))
      people.append(person)
  pairs = np.array(list(itertools.combinations(range(len(images)), 2)))
  is_same = np.array(people)[pairs[:, 0]] == np.array(people)[pairs[:, 1]]
  return np.stack(images), pairs, is_same


def _orl_embed(images):
  flat = images.reshape(images.shape[0], -1)
  return flat - flat.mean(axis=1, keepdims=True)


# About 1 s on an idle machine, but it gathers 0.8 GB of float64 pair embeddings (4950 pairs x
# 10,304 pixels x 2): 13-40 s measured on 2 busy, shared CPU cores.
@pytest.mark.slow
def test_orl_metrics_are_recorded(orl_pairs):
  images, pairs, is_same = orl_pairs
  assert images.shape == (100, 112, 92) and is_same.sum() == 450 and (~is_same).sum() == 4500
  embeddings = _orl_embed(images.astype(np.float64))
  metrics = verification_metrics.verification_metrics(
      embeddings[pairs[:, 0]], embeddings[pairs[:, 1]], is_same
  )
  for key, value in _ORL_RECORDED.items():
    assert metrics[key] == pytest.approx(value, abs=1e-9), key


def test_orl_through_compute_embeddings(orl_pairs, mesh8):
  images, pairs, is_same = orl_pairs
  rgb = np.repeat(images[..., None], 3, axis=-1)
  # 100 images in batches of 16: the last batch holds 4.
  embeddings = embedding.compute_embeddings(_orl_embed, rgb, batch_size=16, mesh=mesh8, flip="none")
  metrics = verification_metrics.verification_metrics(
      embeddings[pairs[:, 0]], embeddings[pairs[:, 1]], is_same
  )
  for key, value in _ORL_RECORDED.items():
    assert metrics[key] == pytest.approx(value, abs=1e-6), key
