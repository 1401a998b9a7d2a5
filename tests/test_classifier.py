"""The class-sharded head against the single-device loss library, on 8 host-CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adam_face import classifier, losses, margins, modern_losses
from configs import default

KINDS = [("normface", 0.0), ("cosface", 0.35), ("arcface", 0.5), ("sphereface", 4),
         ("combined", (1.0, 0.3, 0.2)), ("adm", 0.3)]
B, D = 16, 8


@pytest.fixture(scope="module")
def mesh8():
  assert jax.device_count() == 8, "tests/conftest.py forces 8 host devices"
  return classifier.create_mesh()


def _problem(num_classes, num_shards, seed=0):
  rng = np.random.default_rng(seed)
  c_pad = classifier.padded_num_classes(num_classes, num_shards)
  centers = rng.normal(size=(c_pad, D)).astype(np.float32)
  emb = rng.normal(size=(B, D)).astype(np.float32)
  labels = rng.integers(0, num_classes, B).astype(np.int32)
  labels[0] = num_classes - 1  # The last real class sits next to the padding.
  return centers, emb, labels


def _reference(centers, emb, labels, num_classes, kind, m):
  def f(w, e):
    w = w[:num_classes] / jnp.linalg.norm(w[:num_classes], axis=-1, keepdims=True)
    e = e / jnp.linalg.norm(e, axis=-1, keepdims=True)
    return losses.margin_softmax_loss(e @ w.T, labels, kind=kind, s=16.0, m=m)
  (loss, metrics), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(centers, emb)
  return loss, metrics, grads


def _sharded(mesh, centers, emb, labels, num_classes, kind, m, **kw):
  centers = jax.device_put(centers, classifier.centers_sharding(mesh))
  emb = jax.device_put(emb, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))

  @jax.jit
  def f(w, e):
    def loss_fn(w, e):
      loss, metrics, sampled = classifier.margin_head_loss(
          w, e, jnp.asarray(labels), mesh=mesh, num_classes=num_classes, kind=kind, s=16.0, m=m,
          **kw)
      return loss, (metrics, sampled)
    return jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(w, e)
  (loss, (metrics, sampled)), grads = f(centers, emb)
  return loss, metrics, grads, np.asarray(sampled)


@pytest.mark.parametrize("num_classes", [24, 21])
@pytest.mark.parametrize("kind,m", KINDS)
def test_sharded_head_matches_single_device_reference(mesh8, kind, m, num_classes):
  centers, emb, labels = _problem(num_classes, 8)
  ref_loss, ref_metrics, (ref_gw, ref_ge) = _reference(centers, emb, labels, num_classes, kind, m)
  loss, metrics, (gw, ge), sampled = _sharded(mesh8, centers, emb, labels, num_classes, kind, m)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
  for k in ("acc", "acc_margin"):
    assert float(metrics[k]) == pytest.approx(float(ref_metrics[k]))
  # The head hands back each row's target cosine (for the angle histogram), as
  # margins.target_cosines computes it outside the head.
  np.testing.assert_allclose(metrics["cos_target"],
                             margins.target_cosines(emb, centers, labels), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ge, ref_ge, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gw[:num_classes], ref_gw[:num_classes], rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(gw[num_classes:]) == 0), "padding classes must get no gradient"
  assert sampled.all()


def test_one_device_mesh_runs_unchanged():
  mesh1 = classifier.create_mesh(jax.devices()[:1])
  centers, emb, labels = _problem(21, 1)
  ref_loss, _, (ref_gw, _) = _reference(centers, emb, labels, 21, "arcface", 0.5)
  loss, _, (gw, _), _ = _sharded(mesh1, centers, emb, labels, 21, "arcface", 0.5)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(gw, ref_gw, rtol=1e-5, atol=1e-6)


def test_traced_auto_margin_reaches_every_shard(mesh8):
  centers, emb, labels = _problem(24, 8)
  ref_loss, _, _ = _reference(centers, emb, labels, 24, "adm", 0.3)
  loss, _, _, _ = _sharded(mesh8, centers, emb, labels, 24, "adm", jnp.float32(0.3))
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)


def test_sample_rate_one_equals_full_path_exactly(mesh8):
  # 0.99 of 10 centres per shard rounds up to all 10: the sampling code runs but keeps everything.
  centers, emb, labels = _problem(80, 8)
  full = _sharded(mesh8, centers, emb, labels, 80, "arcface", 0.5)
  sampled = _sharded(mesh8, centers, emb, labels, 80, "arcface", 0.5, sample_rate=0.99,
                     sample_key=jax.random.key(3))
  assert float(full[0]) == float(sampled[0])
  np.testing.assert_array_equal(full[2][0], sampled[2][0])
  np.testing.assert_array_equal(full[2][1], sampled[2][1])


def test_partial_fc_keeps_every_positive_and_the_configured_count(mesh8):
  num_classes, rate = 800, 0.2  # 100 classes per shard, 16 labels in the batch.
  per_shard = num_classes // 8
  n = classifier.num_sampled_per_shard(num_classes, 8, B, rate)
  assert n == 20
  centers, emb, labels = _problem(num_classes, 8)
  for seed in range(3):
    loss, metrics, (gw, _), sampled = _sharded(
        mesh8, centers, emb, labels, num_classes, "cosface", 0.35, sample_rate=rate,
        sample_key=jax.random.key(seed))
    assert sampled[labels].all(), "every positive class must be sampled"
    np.testing.assert_array_equal(sampled.reshape(8, per_shard).sum(1), n)
    assert np.all(np.asarray(gw)[~sampled] == 0), "unsampled centres must get no gradient"
    # The sampled loss is exactly the full loss over the sampled classes alone.
    kept = np.flatnonzero(sampled)
    ref_loss, _, _ = _reference(centers[kept], emb, np.searchsorted(kept, labels), len(kept),
                                "cosface", 0.35)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)


def test_keep_unsampled_rows_makes_the_optimiser_update_lazy(mesh8):
  """Each head (one per fused dataset) is restored with its own mask."""
  params = {"head": ({"centers": jnp.ones((8, 2))}, {"centers": jnp.ones((4, 2))}),
            "w": jnp.ones((8, 2))}
  tx = optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.5, momentum=0.9))
  opt_state = tx.init(params)
  sampled = (jnp.asarray([True, False] * 4), jnp.asarray([False, False, True, True]))
  grads = jax.tree.map(jnp.ones_like, params)
  updates, new_opt_state = tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  new_params, new_opt_state = classifier.keep_unsampled_rows(
      (new_params, new_opt_state), (params, opt_state), sampled)
  for head, mask in enumerate(sampled):
    mask = np.asarray(mask)
    c = np.asarray(new_params["head"][head]["centers"])
    assert np.all(c[~mask] == 1.0) and np.all(c[mask] != 1.0)
    momentum = np.asarray(new_opt_state[1][0].trace["head"][head]["centers"])
    assert np.all(momentum[~mask] == 0) and np.all(momentum[mask] != 0)
  assert np.all(np.asarray(new_params["w"]) != 1.0), "non-head parameters are untouched"


def test_per_device_memory_of_head_is_one_eighth(mesh8):
  """W and its momentum take ~C/N per device: compiled memory analysis at N = 1 vs N = 8."""
  num_classes, dim, batch = 8192, 64, 64
  tx = optax.sgd(0.1, momentum=0.9)

  def compiled_step(mesh):
    w_sharding = classifier.centers_sharding(mesh)
    e_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

    def step(w, mom, e, y):
      g = jax.grad(lambda w: classifier.margin_head_loss(
          w, e, y, mesh=mesh, num_classes=num_classes, kind="arcface", s=64.0, m=0.5)[0])(w)
      upd, mom = tx.update(g, mom, w)
      return optax.apply_updates(w, upd), mom

    w = jax.ShapeDtypeStruct((num_classes, dim), jnp.float32, sharding=w_sharding)
    mom = tx.init(w)
    mom = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=w_sharding), mom)
    e = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=e_sharding)
    y = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=e_sharding)
    return jax.jit(step, donate_argnums=(0, 1)).lower(w, mom, e, y).compile().memory_analysis()

  head_bytes = 2 * num_classes * dim * 4  # W + momentum
  one = compiled_step(classifier.create_mesh(jax.devices()[:1]))
  eight = compiled_step(mesh8)
  assert one.argument_size_in_bytes >= head_bytes
  assert eight.argument_size_in_bytes <= head_bytes / 8 + 4 * batch * dim
  # Temporaries ([B, C/N] cosines, logits and their gradients) shrink with N as well.
  assert one.temp_size_in_bytes >= batch * num_classes * 4, "N = 1 holds the full [B, C] logits"
  assert eight.temp_size_in_bytes < one.temp_size_in_bytes / 4


def test_bad_batch_and_missing_key_are_refused(mesh8):
  centers = classifier.init_centers(jax.random.key(0), 24, D, mesh8)
  with pytest.raises(ValueError, match="not divisible by the 8 devices"):
    classifier.margin_head_loss(centers, jnp.zeros((12, D)), jnp.zeros(12, jnp.int32),
                                mesh=mesh8, num_classes=24, kind="arcface", s=64.0, m=0.5)
  big = classifier.init_centers(jax.random.key(0), 800, D, mesh8)
  with pytest.raises(ValueError, match="sample_key"):
    classifier.margin_head_loss(big, jnp.zeros((16, D)), jnp.zeros(16, jnp.int32),
                                mesh=mesh8, num_classes=800, kind="arcface", s=64.0, m=0.5,
                                sample_rate=0.1)
  with pytest.raises(ValueError, match="sample_rate"):
    classifier.num_sampled_per_shard(24, 8, 16, 0.0)


MODERN = ["subcenter_arcface", "curricularface", "adaface", "magface", "elasticface_arc",
          "elasticface_cos"]


def _modern_reference(kind, loss_config, cos_sub, emb, labels, state, key):
  """The single-device loss of modern_losses on the full cosine matrix."""
  norms = jnp.linalg.norm(emb, axis=-1)
  c = loss_config
  if kind == "subcenter_arcface":
    return modern_losses.subcenter_arcface_loss(cos_sub, labels, s=c.s, m=c.m)[0]
  cos = cos_sub[..., 0]
  if kind == "curricularface":
    return modern_losses.curricularface_loss(cos, labels, state, s=c.s, m=c.m,
                                             t_alpha=c.t_alpha)[0]
  if kind == "adaface":
    return modern_losses.adaface_loss(cos, labels, norms, state, s=c.s, m=c.m, h=c.h,
                                      t_alpha=c.t_alpha)[0]
  if kind == "magface":
    return modern_losses.magface_loss(cos, labels, norms, s=c.s, l_a=c.l_a, u_a=c.u_a, l_m=c.l_m,
                                      u_m=c.u_m, lambda_g=c.lambda_g)[0]
  return modern_losses.elasticface_loss(cos, labels, key, kind=kind, s=c.s, m=c.m,
                                        sigma=c.sigma)[0]


@pytest.mark.parametrize("kind", MODERN)
def test_modern_losses_through_the_sharded_head_match_single_device(mesh8, kind):
  num_classes = 21
  loss_config = default.get_config().loss
  loss_config.kind, loss_config.s, loss_config.m = kind, 16.0, 0.4
  k = margins.subcenters_per_class(loss_config)
  rng = np.random.default_rng(0)
  c_pad = classifier.padded_num_classes(num_classes, 8)
  centers = rng.normal(size=(c_pad * k, D)).astype(np.float32)
  emb = (rng.normal(size=(B, D)) * rng.uniform(5, 40, (B, 1))).astype(np.float32)
  labels = jnp.asarray(rng.integers(0, num_classes, B).astype(np.int32))
  key = jax.random.key(7)
  state = margins.init_loss_state(loss_config)

  w = centers.reshape(c_pad, k, D)[:num_classes]
  w = w / np.linalg.norm(w, axis=-1, keepdims=True)
  e = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
  cos_sub = jnp.asarray(np.einsum("bd,ckd->bck", e, w))
  ref = _modern_reference(kind, loss_config, cos_sub, jnp.asarray(emb), labels, state, key)

  @jax.jit
  def sharded(centers, emb):
    cos_target = margins.target_cosines(emb, centers, labels, k)
    new_state = margins.update_loss_state(loss_config, state, cos_target=cos_target,
                                          feature_norm=jnp.linalg.norm(emb, axis=-1))
    return classifier.margin_head_loss(
        centers, emb, labels, mesh=mesh8, num_classes=num_classes, kind=kind, s=16.0, m=0.4,
        margin_fn=margins.margin_fn(loss_config, new_state, key), num_subcenters=k)[0]

  loss = sharded(jax.device_put(centers, classifier.centers_sharding(mesh8)), jnp.asarray(emb))
  np.testing.assert_allclose(loss, ref, rtol=1e-5, atol=1e-5)
