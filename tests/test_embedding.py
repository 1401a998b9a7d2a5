"""Tests of adam_face.embedding: flip-test embeddings in jitted batches on the 8-device mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from adam_face import embedding
import toy_embeddings


@pytest.fixture(scope="module", params=["explicit_1d", "auto_2d"])
def mesh(request):
  # Both kinds of mesh axes: jax.make_mesh makes explicit ones, Mesh(...) (as
  # classifier.create_mesh does) auto ones, here over two axes.
  if request.param == "explicit_1d":
    return jax.make_mesh((8,), ("data",))
  return Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))


@pytest.fixture(scope="module")
def projection():
  return toy_embeddings.projection()


@pytest.fixture(scope="module")
def toy_images():
  return np.random.default_rng(1).integers(
      0, 256, size=(21,) + toy_embeddings.IMAGE_SHAPE, dtype=np.uint8
  )


@pytest.mark.parametrize("flip", embedding.FLIP_MODES)
def test_compute_embeddings_pads_the_last_batch_and_flips(mesh, projection, toy_images, flip):
  embed_fn = jax.tree_util.Partial(toy_embeddings.toy_embed, jnp.asarray(projection))
  # 21 images in batches of 8: the third batch holds 5 images and 3 padding rows.
  embeddings = embedding.compute_embeddings(
      embed_fn, toy_images, batch_size=8, mesh=mesh, flip=flip
  )
  expected = toy_embeddings.reference_embeddings(projection, toy_images, flip)
  assert embeddings.shape == expected.shape == (21, 10 if flip == "concat" else 5)
  assert embeddings.dtype == np.float32
  np.testing.assert_allclose(embeddings, expected, atol=2e-5)


def test_compute_embeddings_takes_plain_closures(mesh, projection, toy_images):
  embeddings = embedding.compute_embeddings(
      lambda images: toy_embeddings.toy_embed(jnp.asarray(projection), images),
      toy_images[:3],
      batch_size=16,
      mesh=mesh,
      flip="none",
  )
  np.testing.assert_allclose(
      embeddings, toy_embeddings.reference_embeddings(projection, toy_images[:3], "none"), atol=2e-5
  )


def test_compute_embeddings_rejects_bad_input(mesh, toy_images):
  identity = lambda images: images.reshape(images.shape[0], -1)  # noqa: E731
  with pytest.raises(ValueError, match="multiple of the mesh's 8 devices"):
    embedding.compute_embeddings(identity, toy_images, batch_size=12, mesh=mesh)
  with pytest.raises(ValueError, match="uint8"):
    embedding.compute_embeddings(identity, toy_images.astype(np.float32), batch_size=8, mesh=mesh)
  with pytest.raises(ValueError, match="flip="):
    embedding.compute_embeddings(identity, toy_images, batch_size=8, mesh=mesh, flip="mean")
  with pytest.raises(ValueError, match=r"to \[b, D\] embeddings"):
    embedding.compute_embeddings(lambda images: images, toy_images, batch_size=8, mesh=mesh)
  with pytest.raises(ValueError, match="zero or non-finite norm .first at image 0"):
    embedding.compute_embeddings(
        lambda images: jnp.zeros((images.shape[0], 2)), toy_images, batch_size=8, mesh=mesh
    )
