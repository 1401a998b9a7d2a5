"""The class-sharded head against the single-device loss library, on 8 host-CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adam_face import classifier, losses, margins

B, D = 16, 8
# Every registered kind at s=16, with a margin where it has one; adm also with its auto-margin
# engaged from the first step (target reached at once), so the sharded update is compared too.
MARGINS = {
    "normface": margins.NormFace(s=16.0),
    "cosface": margins.CosFace(s=16.0, m=0.35),
    "arcface": margins.ArcFace(s=16.0, m=0.5),
    "sphereface": margins.SphereFace(s=16.0, m=4),
    "combined": margins.Combined(s=16.0, m1=1.0, m2=0.3, m3=0.2),
    "adm": margins.ADM(s=16.0, m=0.3),
    "adam": margins.ADM(
        s=16.0,
        m=0.3,
        auto_margin=margins.AutoMargin(target=0.01, rate=0.1, momentum=0.0, m_min=0.0, m_max=0.8),
    ),
    "subcenter_arcface": margins.SubcenterArcFace(s=16.0, m=0.4),
    "curricularface": margins.CurricularFace(s=16.0, m=0.4),
    "adaface": margins.AdaFace(s=16.0, m=0.4),
    "magface": margins.MagFace(s=16.0),
    "elasticface_arc": margins.ElasticFaceArc(s=16.0, m=0.4),
    "elasticface_cos": margins.ElasticFaceCos(s=16.0, m=0.4),
}


def _problem(num_classes, num_shards, seed=0, centers_per_class=1):
  rng = np.random.default_rng(seed)
  c_pad = classifier.padded_num_classes(num_classes, num_shards)
  centers = rng.normal(size=(c_pad * centers_per_class, D)).astype(np.float32)
  # Norms of 5..40 so that AdaFace's and MagFace's norm-dependent margins vary across rows.
  emb = (rng.normal(size=(B, D)) * rng.uniform(5, 40, (B, 1))).astype(np.float32)
  labels = rng.integers(0, num_classes, B).astype(np.int32)
  labels[0] = num_classes - 1  # The last real class sits next to the padding.
  return centers, emb, labels


def _reference(centers, emb, labels, num_classes, margin, key=None):
  """losses.margin_softmax_loss on the full cosine matrix, on one device."""
  k = margin.centers_per_class

  def f(w, e):
    w = w[: num_classes * k] / jnp.linalg.norm(w[: num_classes * k], axis=-1, keepdims=True)
    cos = margin.pool_class_cosines((e / jnp.linalg.norm(e, axis=-1, keepdims=True)) @ w.T)
    loss, metrics, state = losses.margin_softmax_loss(
        cos, labels, margin, feature_norm=jnp.linalg.norm(e, axis=-1), key=key
    )
    return loss, (metrics, state)

  (loss, (metrics, state)), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
      centers, emb
  )
  return loss, metrics, state, grads


def _sharded(mesh, centers, emb, labels, num_classes, margin, key=None, sample_rate=1.0, **kw):
  """The sharded head's loss, metrics, gradients (dense: through gather_rows), sampled mask and
  margin state; Partial FC draws with `key`, and the margin gets split(key)[1] as train_step's."""
  centers = jax.device_put(centers, classifier.centers_sharding(mesh))
  emb = jax.device_put(emb, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
  labels = jax.device_put(
      labels, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  )
  sample_key, margin_key = jax.random.split(jax.random.key(0) if key is None else key)
  per_shard = centers.shape[0] // margin.centers_per_class // mesh.size

  @jax.jit
  def f(w, e):
    rows = classifier.partial_fc_rows(
        labels, sample_key, mesh=mesh, num_classes=num_classes, sample_rate=sample_rate
    )

    def loss_fn(w, e):
      loss, metrics, state = classifier.margin_head_loss(
          w if rows is None else classifier.gather_rows(w, rows, mesh),
          e,
          labels,
          margin,
          margin.init_state(),
          mesh=mesh,
          num_classes=num_classes,
          rows=rows,
          key=margin_key,
          **kw,
      )
      return loss, (metrics, state)

    sampled = jnp.ones(w.shape[0] // margin.centers_per_class, bool)
    if rows is not None:  # Shard-local rows to global class ids.
      shard = jnp.repeat(jnp.arange(mesh.size), rows.shape[0] // mesh.size)
      sampled = jnp.zeros_like(sampled).at[shard * per_shard + rows].set(True)
    return jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(w, e), sampled

  ((loss, (metrics, state)), grads), sampled = f(centers, emb)
  return loss, metrics, grads, np.asarray(sampled), state


# (classes, chunk): 21 classes are 3 a shard, so chunks of 2 overlap (the last re-reads one).
@pytest.mark.parametrize("num_classes, chunk", [(24, None), (21, None), (21, 2)])
@pytest.mark.parametrize("name", list(MARGINS))
def test_sharded_head_matches_single_device_reference(mesh8, name, num_classes, chunk):
  margin = MARGINS[name]
  k = margin.centers_per_class
  key = jax.random.key(7)
  centers, emb, labels = _problem(num_classes, 8, centers_per_class=k)
  ref_loss, ref_metrics, ref_state, (ref_gw, ref_ge) = _reference(
      centers, emb, labels, num_classes, margin, jax.random.split(key)[1]
  )
  loss, metrics, (gw, ge), sampled, state = _sharded(
      mesh8, centers, emb, labels, num_classes, margin, key, chunk_columns=chunk
  )
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
  for name_ in ("acc", "acc_margin"):
    assert float(metrics[name_]) == pytest.approx(float(ref_metrics[name_]))
  for name_, value in ref_metrics.items():  # The margin's own: margin, t, norm statistics.
    np.testing.assert_allclose(metrics[name_], value, rtol=1e-5, atol=1e-6)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), state, ref_state
  )
  # The head hands back each row's target cosine (for the angle histogram).
  w = centers.reshape(-1, k, D)[labels] / np.linalg.norm(
      centers.reshape(-1, k, D)[labels], axis=-1, keepdims=True
  )
  e = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
  np.testing.assert_allclose(
      metrics["cos_target"], np.einsum("bd,bkd->bk", e, w).max(-1), rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(ge, ref_ge, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gw[: num_classes * k], ref_gw[: num_classes * k], rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(gw[num_classes * k :]) == 0), "padding classes must get no gradient"
  assert sampled.all()


def test_one_device_mesh_runs_unchanged():
  mesh1 = classifier.create_mesh(jax.devices()[:1])
  centers, emb, labels = _problem(21, 1)
  ref_loss, _, _, (ref_gw, _) = _reference(centers, emb, labels, 21, MARGINS["arcface"])
  loss, _, (gw, _), _, _ = _sharded(mesh1, centers, emb, labels, 21, MARGINS["arcface"])
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(gw, ref_gw, rtol=1e-5, atol=1e-6)


def test_sample_rate_one_equals_full_path_exactly(mesh8):
  # 0.99 of 10 centres per shard rounds up to all 10: the sampling code runs but keeps everything.
  centers, emb, labels = _problem(80, 8)
  full = _sharded(mesh8, centers, emb, labels, 80, MARGINS["arcface"])
  sampled = _sharded(
      mesh8, centers, emb, labels, 80, MARGINS["arcface"], sample_rate=0.99, key=jax.random.key(3)
  )
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
    loss, metrics, (gw, _), sampled, _ = _sharded(
        mesh8,
        centers,
        emb,
        labels,
        num_classes,
        MARGINS["cosface"],
        sample_rate=rate,
        key=jax.random.key(seed),
    )
    assert sampled[labels].all(), "every positive class must be sampled"
    np.testing.assert_array_equal(sampled.reshape(8, per_shard).sum(1), n)
    assert np.all(np.asarray(gw)[~sampled] == 0), "unsampled centres must get no gradient"
    # The sampled loss is exactly the full loss over the sampled classes alone.
    kept = np.flatnonzero(sampled)
    ref_loss, _, _, _ = _reference(
        centers[kept], emb, np.searchsorted(kept, labels), len(kept), MARGINS["cosface"]
    )
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)


def test_chunked_partial_fc_equals_one_chunk(mesh8):
  """Partial FC's sampled block in chunks (37 columns a shard, chunks of 8: the last overlaps)
  gives the one-chunk loss, metrics and gradients."""
  num_classes, rate = 2400, 0.12
  assert classifier.num_sampled_per_shard(num_classes, 8, B, rate) == 36
  centers, emb, labels = _problem(num_classes, 8, seed=2)
  for name in ("arcface", "curricularface"):
    args = (mesh8, centers, emb, labels, num_classes, MARGINS[name])
    whole = _sharded(*args, sample_rate=rate, key=jax.random.key(5))
    chunked = _sharded(*args, sample_rate=rate, key=jax.random.key(5), chunk_columns=8)
    np.testing.assert_array_equal(whole[3], chunked[3])  # The same classes were sampled.
    np.testing.assert_allclose(chunked[0], whole[0], rtol=1e-6)
    for key in ("acc", "acc_margin", "cos_target"):
      np.testing.assert_allclose(chunked[1][key], whole[1][key], rtol=1e-6, atol=1e-7)
    for a, b in zip(chunked[2], whole[2]):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("limit", [classifier.CHUNK_ELEMENTS, classifier.CPU_CHUNK_ELEMENTS])
def test_chunk_columns_even_out_and_bound_the_temporaries(limit):
  # Within 2 x CHUNK_ELEMENTS a shard stays whole, whatever the chunks' size.
  assert classifier.chunk_columns_for(512, 10_000, limit) == 10_000
  for batch, columns in [(512, 25_000), (512, 100_000), (4096, 250_000), (512, 2 * 8192 + 1)]:
    chunk = classifier.chunk_columns_for(batch, columns, limit)
    num_chunks = -(-columns // chunk)
    assert batch * chunk <= limit
    assert num_chunks * chunk - columns < num_chunks, "the last chunk re-reads too much"
  assert classifier.chunk_columns_for(512, 100_000, classifier.CPU_CHUNK_ELEMENTS) == 4000


def test_chunked_head_holds_no_full_logits():
  """At C/N = 8192 classes and B = 64 the one-chunk head keeps [B, C/N] cosines for its backward
  pass; in chunks of 512 the compiled gradient's temporaries are a fraction of that."""
  mesh1 = classifier.create_mesh(jax.devices()[:1])
  num_classes, batch, dim = 8192, 64, 64

  def temp_bytes(chunk):
    def loss(w, e, y):
      return classifier.margin_head_loss(
          w,
          e,
          y,
          margins.ArcFace(),
          {},
          mesh=mesh1,
          num_classes=num_classes,
          chunk_columns=chunk,
      )[0]

    shapes = (
        jax.ShapeDtypeStruct((num_classes, dim), jnp.float32),
        jax.ShapeDtypeStruct((batch, dim), jnp.float32),
        jax.ShapeDtypeStruct((batch,), jnp.int32),
    )
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*shapes).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  logits_bytes = batch * num_classes * 4
  whole, chunked = temp_bytes(None), temp_bytes(512)
  assert whole >= logits_bytes
  assert chunked < whole / 3 and chunked < logits_bytes, (whole, chunked)


def test_large_heads_are_drawn_in_blocks(mesh8, monkeypatch):
  """A shard over _WHOLE_DRAW_ELEMENTS values is drawn block by block: N(0, 0.01^2), every row
  drawn (the last block overlaps its predecessor), shards and blocks independent; below it the
  centres are jax.random.normal's, as always."""
  key = jax.random.key(4)
  small = classifier.init_centers(key, 24, D, mesh8)
  np.testing.assert_allclose(small, 0.01 * jax.random.normal(key, (24, D)), rtol=1e-6)
  monkeypatch.setattr(classifier, "_WHOLE_DRAW_ELEMENTS", 64 * D)
  monkeypatch.setattr(classifier, "_DRAW_BLOCK_ELEMENTS", 48 * D)
  centers = classifier.init_centers(key, 8 * 100, D, mesh8)  # 100 rows a shard: blocks of 48.
  assert centers.sharding == classifier.centers_sharding(mesh8)
  values = np.asarray(centers)
  assert np.all(values != 0), "a row was left undrawn"
  assert abs(values.std() - 0.01) < 0.001 and abs(values.mean()) < 0.001
  shards = values.reshape(8, 100, D)
  assert not np.allclose(shards[0], shards[1])
  assert not np.allclose(shards[0, :48], shards[0, 48:96])


def test_per_device_memory_of_head_is_one_eighth(mesh8):
  """W and its momentum take ~C/N per device: compiled memory analysis at N = 1 vs N = 8."""
  num_classes, dim, batch = 8192, 64, 64
  tx = optax.sgd(0.1, momentum=0.9)

  def compiled_step(mesh):
    w_sharding = classifier.centers_sharding(mesh)
    e_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

    def step(w, mom, e, y):
      g = jax.grad(
          lambda w: classifier.margin_head_loss(
              w, e, y, margins.ArcFace(), {}, mesh=mesh, num_classes=num_classes
          )[0]
      )(w)
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


def test_bad_batch_and_mismatched_rows_are_refused(mesh8):
  centers = classifier.init_centers(jax.random.key(0), 24, D, mesh8)
  rows = jnp.zeros(16, jnp.int32)
  cases = [  # (batch, margin, rows, the message)
      (12, margins.ArcFace(), None, "not divisible by the 8 devices"),
      (16, margins.ArcFace(), rows, "Partial FC chose 16"),  # All 24 rows, not the 16 gathered.
      (16, margins.SubcenterArcFace(), rows, "does not support sub-centres"),
  ]
  for batch, margin, head_rows, message in cases:
    with pytest.raises(ValueError, match=message):
      classifier.margin_head_loss(
          centers,
          jnp.zeros((batch, D)),
          jnp.zeros(batch, jnp.int32),
          margin,
          {},
          mesh=mesh8,
          num_classes=24,
          rows=head_rows,
      )
  with pytest.raises(ValueError, match="chunk_columns must be a positive number of classes, got 0"):
    classifier.margin_head_loss(
        centers,
        jnp.zeros((16, D)),
        jnp.zeros(16, jnp.int32),
        margins.ArcFace(),
        {},
        mesh=mesh8,
        num_classes=24,
        chunk_columns=0,
    )
  with pytest.raises(ValueError, match="sample_rate"):
    classifier.num_sampled_per_shard(24, 8, 16, 0.0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_partial_fc_step_allocates_nothing_the_size_of_the_centres(mesh8, dtype):
  """The compiled train step (benchmarks/bench_partial_fc.py's, donated as train.py donates):
  at sample rate 0.02 its temporaries (a few [sampled, D] blocks and [B, sampled] logits) stay far
  below one device's share of W (no dense [C, D] gradient, update or bfloat16 copy), and W and
  its momentum are updated in place (aliased); at rate 1 the dense gradient shows up, so the
  check can tell them apart."""
  del mesh8  # The step's mesh spans every device: the conftest's 8.
  from benchmarks import bench_partial_fc

  num_classes, dim = 65536, 64
  shard_bytes = num_classes // 8 * dim * 4  # One device's W (and again its momentum).

  def memory(rate):
    step, init, batch = bench_partial_fc.head_only_step(
        num_classes, rate, dtype, batch_size=64, dim=dim
    )
    return step.lower(jax.eval_shape(init, jax.random.key(0)), batch).compile().memory_analysis()

  sampled, dense = memory(0.02), memory(1.0)
  assert sampled.temp_size_in_bytes < 0.25 * shard_bytes, sampled.temp_size_in_bytes
  assert sampled.alias_size_in_bytes >= 2 * shard_bytes, "W and momentum must be donated in place"
  assert dense.temp_size_in_bytes >= shard_bytes, dense.temp_size_in_bytes


def test_two_million_class_step_temporaries_stay_near_three_sampled_blocks(mesh8):
  """The compiled step of benchmarks/bench_partial_fc.py at WebFace42M's scale (2M classes, rate
  0.1, B = D = 512, 8 devices), compiled but never run: its temporaries per device stay under 3.5
  sampled blocks [25000, 512] (the 170 MB behind bench_partial_fc's 1.24x peak; a select between
  old and new blocks, or [B, sampled] logits kept whole, would add one block or more each)."""
  del mesh8  # The step's mesh spans every device: the conftest's 8.
  from benchmarks import bench_partial_fc

  step, init, batch = bench_partial_fc.head_only_step(2_000_000, 0.1, "float32")
  state = jax.eval_shape(init, jax.random.key(0))
  memory = step.lower(state, batch).compile().memory_analysis()
  block_bytes = classifier.num_sampled_per_shard(2_000_000, 8, 512, 0.1) * 512 * 4
  assert memory.temp_size_in_bytes < 3.5 * block_bytes, memory.temp_size_in_bytes / block_bytes
