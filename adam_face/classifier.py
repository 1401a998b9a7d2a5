"""The margin-softmax classifier head, sharded by class over the device mesh, with Partial FC.

The class-centre matrix W [C, D] is the largest tensor of face recognition training (2 M identities
x 512 dims is 4 GB in float32 before its optimiser state), and the logits [B, C] are larger still.
So, as insightface's Partial FC does in PyTorch, every device holds the centres of C/N classes:

  1. the embeddings of the global batch are all-gathered ([B, D] per device, small);
  2. each device computes the cosines and margin logits of the whole batch against *its* classes;
  3. the softmax is finished with a pmax of the row maxima and a psum of the row sums, and the
     target logit (which lives on exactly one device) is recovered with a psum.

The full W and the full [B, C] logits never exist on one device; the backward pass of the
all-gather is a reduce-scatter, which hands every device the gradient of its own embeddings.
Nor do a shard's [B, C/N] logits where they would be large: each shard runs its softmax over
chunks of its classes (`_class_sums`, an online log-sum-exp), and the backward pass recomputes a
chunk's cosines instead of keeping them, so the temporaries are a chunk's (`CHUNK_ELEMENTS`;
`CPU_CHUNK_ELEMENTS` on a CPU).
Each row's target cosine is looked up first (B centres, not the [B, C/N] product), because the
margin's statistics, which CurricularFace's non-target logits read, come before the logits. The
backbone is data-parallel over the same one-axis mesh (`MESH_AXIS`), so one mesh serves both.

Class counts not divisible by N are padded up to `padded_num_classes`; padding classes are left out
of every sum and arg-max, so they never win, never take softmax mass, and receive no gradient.

Partial FC (`sample_rate` < 1): per step and per shard, every class that is a target of the global
batch is kept and the remaining places are filled with negatives drawn uniformly at random without
replacement (`partial_fc_rows`). The number of centres used per shard is static:

  num_sampled = min(C/N, max(ceil(sample_rate * C/N), min(B, C/N)))

(the floor min(B, C/N) guarantees that all positives fit). The training step gathers the sampled
rows of the centres *and of their optimiser state* (`gather_center_rows`), differentiates and
updates that [N * num_sampled, D] block alone, and writes it back in place (`scatter_center_rows`
on donated buffers). So neither the gradient nor the optimiser's work ever spans all C rows, and
the update is lazy: an unsampled centre keeps its value and its optimiser state (momentum, Adam
moments) bit for bit, and weight decay and momentum act on a centre only on the steps it takes
part in. (insightface's partial_fc_v2 instead keeps a dense [C, D] gradient and lets momentum and
weight decay move every row each step; the lazy rule keeps "unsampled" meaning "untouched" and
costs memory only for what is sampled.)
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from adam_face import margins

MESH_AXIS = "data"
_MASKED_LOGIT = -1e30


def create_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A one-axis mesh over all (or the given) devices of every process."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (MESH_AXIS,))


def padded_num_classes(num_classes: int, num_shards: int) -> int:
  return int(math.ceil(num_classes / num_shards) * num_shards)


def num_sampled_per_shard(
    num_classes: int, num_shards: int, global_batch: int, sample_rate: float
) -> int:
  """Centres used per shard and step (all of them when sample_rate == 1)."""
  if not 0.0 < sample_rate <= 1.0:
    raise ValueError(f"head.sample_rate must be in (0, 1], got {sample_rate}.")
  per_shard = padded_num_classes(num_classes, num_shards) // num_shards
  if sample_rate == 1.0:
    return per_shard
  return min(per_shard, max(math.ceil(sample_rate * per_shard), min(global_batch, per_shard)))


def centers_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(MESH_AXIS, None))


# XLA's normal generator holds about three times its output in temporaries; a shard of centres
# larger than this many values is drawn in blocks of _DRAW_BLOCK_ELEMENTS instead (see
# random_centers).
_WHOLE_DRAW_ELEMENTS = 1 << 26
_DRAW_BLOCK_ELEMENTS = 1 << 24


def random_centers(
    key: jax.Array,
    num_classes: int,
    embedding_dim: int,
    mesh: Mesh,
    centers_per_class: int = 1,
) -> jax.Array:
  """N(0, 0.01^2) class centres [C_pad * K, D] (K centres a class, class-major), sharded by class.

  Drawn as one array while a shard holds at most _WHOLE_DRAW_ELEMENTS values (256 MB). Beyond,
  each shard draws its own rows, block after block, from fold_in(fold_in(key, shard), block)
  into its buffer: the generator's temporaries are then a block's, not three times the shard
  (which at 4 M classes on 8 host devices were 24 GB at once). The values of such a head depend
  on the number of devices; their distribution does not.
  """
  rows = padded_num_classes(num_classes, mesh.size) * centers_per_class
  per_shard = rows // mesh.size
  if per_shard * embedding_dim <= _WHOLE_DRAW_ELEMENTS:
    return 0.01 * jax.random.normal(key, (rows, embedding_dim), jnp.float32)
  block = _DRAW_BLOCK_ELEMENTS // embedding_dim

  def local_centers(key):
    key = jax.random.fold_in(key, jax.lax.axis_index(MESH_AXIS))

    def draw(b, centers):
      values = 0.01 * jax.random.normal(jax.random.fold_in(key, b), (block, embedding_dim))
      start = jnp.minimum(b * block, per_shard - block)  # The last block ends at the last row.
      return jax.lax.dynamic_update_slice_in_dim(centers, values, start, 0)

    centers = _varying_constant((per_shard, embedding_dim), jnp.float32)
    return jax.lax.fori_loop(0, -(-per_shard // block), draw, centers)

  return jax.shard_map(local_centers, mesh=mesh, in_specs=P(), out_specs=P(MESH_AXIS, None))(key)


def init_centers(
    key: jax.Array, num_classes: int, embedding_dim: int, mesh: Mesh, centers_per_class: int = 1
) -> jax.Array:
  """random_centers, created directly in their class-sharded layout."""
  init = jax.jit(
      lambda k: random_centers(k, num_classes, embedding_dim, mesh, centers_per_class),
      out_shardings=centers_sharding(mesh),
  )
  return init(key)


def l2_normalize(x: jax.Array) -> jax.Array:
  """Rows scaled to unit norm, in float32 (a zero row stays finite)."""
  x = x.astype(jnp.float32)
  return x * inverse_norms(x)[..., None]


def inverse_norms(x: jax.Array) -> jax.Array:
  """1 / |row| for each row of x (finite for a zero row): what l2_normalize multiplies by, and
  what scales a matmul with raw centres into cosines without a normalised copy of them."""
  return jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1), 1e-12))


def _global_best(
    value: jax.Array, class_id: jax.Array, sentinel: int
) -> tuple[jax.Array, jax.Array]:
  """The best of every shard's (value, class id) per row; ties go to the smallest class id, as
  jnp.argmax over the whole row would."""
  best = jax.lax.pmax(jax.lax.stop_gradient(value), MESH_AXIS)
  return best, jax.lax.pmin(jnp.where(value == best, class_id, sentinel), MESH_AXIS)


def _batch_accuracy(pred: jax.Array, labels_local: jax.Array, shard: jax.Array) -> jax.Array:
  """Accuracy of global predictions, each device scoring its own rows (the psum is invariant)."""
  local_pred = jax.lax.dynamic_slice_in_dim(
      pred, shard * labels_local.shape[0], labels_local.shape[0]
  )
  correct = jax.lax.psum(jnp.sum(local_pred == labels_local), MESH_AXIS)
  return correct / pred.shape[0]


def partial_fc_rows(
    labels: jax.Array, key: jax.Array, *, mesh: Mesh, num_classes: int, sample_rate: float
) -> jax.Array | None:
  """The rows of the class centres that Partial FC uses this step, or None when it uses all.

  Args:
    labels: [B] int class ids of the global batch, batch-sharded over MESH_AXIS.
    key: PRNG key (replicated); shard n draws with fold_in(key, n).

  Returns:
    int32 [N * num_sampled], sharded P(MESH_AXIS): shard n's block holds sorted row indices into
    its own C/N centres: every class that is a target of the global batch, then negatives drawn
    uniformly without replacement (padding classes only when nothing else is left).
  """
  num_shards = mesh.size
  num_sampled = num_sampled_per_shard(num_classes, num_shards, labels.shape[0], sample_rate)
  per_shard = padded_num_classes(num_classes, num_shards) // num_shards
  if num_sampled == per_shard:
    return None

  def local_rows(labels_local, key):
    labels = jax.lax.all_gather(labels_local, MESH_AXIS, tiled=True)
    shard = jax.lax.axis_index(MESH_AXIS)
    class_ids = shard * per_shard + jnp.arange(per_shard)
    local = labels - class_ids[0]
    local = jnp.where((local >= 0) & (local < per_shard), local, per_shard)  # Off-shard: dropped.
    positive = jnp.zeros(per_shard, bool).at[local].set(True, mode="drop")
    score = jax.random.uniform(jax.random.fold_in(key, shard), (per_shard,))
    score = jnp.where(positive, 2.0, score)  # Positives outrank every uniform draw.
    score = jnp.where(class_ids >= num_classes, -1.0, score)  # Padding comes last.
    _, rows = jax.lax.top_k(score, num_sampled)
    return jnp.sort(rows).astype(jnp.int32)

  return jax.shard_map(local_rows, mesh=mesh, in_specs=(P(MESH_AXIS), P()), out_specs=P(MESH_AXIS))(
      labels, key
  )


def gather_rows(centers: jax.Array, rows: jax.Array, mesh: Mesh) -> jax.Array:
  """centers[rows] shard by shard: [N * num_sampled, ...], sharded like the centres."""
  return jax.shard_map(
      lambda w, r: w[r],
      mesh=mesh,
      in_specs=(P(MESH_AXIS), P(MESH_AXIS)),
      out_specs=P(MESH_AXIS),
  )(centers, rows)


def scatter_rows(
    centers: jax.Array,
    rows: jax.Array,
    values: jax.Array,
    mesh: Mesh,
    write: jax.Array | None = None,
) -> jax.Array:
  """centers with its `rows` (per shard, as from partial_fc_rows) replaced by `values`.

  An in-place update of each shard when `centers` is a donated buffer: nothing of size [C, D]
  is allocated. `write`, a scalar bool, False leaves every row as it was: the rows are moved
  past the end, where the scatter drops them.
  """
  write = jnp.ones((), bool) if write is None else write

  def local(w, r, v, write):
    r = jnp.where(write, r, r + w.shape[0])
    return w.at[r].set(v, mode="drop", indices_are_sorted=True, unique_indices=True)

  return jax.shard_map(
      local,
      mesh=mesh,
      in_specs=(P(MESH_AXIS), P(MESH_AXIS), P(MESH_AXIS), P()),
      out_specs=P(MESH_AXIS),
  )(centers, rows, values, write)


def _map_leaves(fn, other, rows: Sequence[jax.Array | None], tree: Any, *rest: Any) -> Any:
  """fn(leaf, *rest_leaves, rows[k]) on every 'centers' leaf of head k whose rows are not None
  (the Partial FC blocks), other(leaf, *rest_leaves) on every other leaf of `tree`.

  The centres of head k are the 'centers' leaves under sequence index k: params['head'][k] and
  its mirrors in the optimiser state (momentum, Adam moments).
  """

  def apply(path, leaf, *rest_leaves):
    keys = [getattr(k, "key", None) for k in path]
    if "centers" in keys:
      position = keys.index("centers")
      head_rows = rows[getattr(path[position - 1], "idx", 0) if position else 0]
      if head_rows is not None:
        return fn(leaf, *rest_leaves, head_rows)
    return other(leaf, *rest_leaves)

  return jax.tree_util.tree_map_with_path(apply, tree, *rest)


def gather_center_rows(tree: Any, rows: Sequence[jax.Array | None], mesh: Mesh) -> Any:
  """Every head's centres in `tree` (params or optimiser state) cut to its Partial FC rows.

  A block comes out as [N * num_sampled, 1, D]: that is the shape XLA gives a row scatter's
  updates, so the optimiser's update of the block, computed in it, can overwrite the gathered
  buffers in place before scatter_center_rows writes it back (a [rows, D] block would make XLA
  hold the old and the new block side by side: one more block-sized buffer at the step's peak).
  """
  return _map_leaves(
      lambda leaf, r: gather_rows(leaf, r, mesh)[:, None], lambda leaf: leaf, rows, tree
  )


def map_unsampled_leaves(fn, rows: Sequence[jax.Array | None], tree: Any, *rest: Any) -> Any:
  """fn(leaf, *rest_leaves) on every leaf of `tree` but the Partial FC blocks, which pass
  through."""
  return _map_leaves(lambda leaf, *_: leaf, fn, rows, tree, *rest)


def scatter_center_rows(
    tree: Any,
    gathered: Any,
    rows: Sequence[jax.Array | None],
    mesh: Mesh,
    write: jax.Array | None = None,
) -> Any:
  """The inverse of gather_center_rows: `tree` with the gathered rows written back (none of them
  where `write` is False; see scatter_rows)."""
  # Every leaf but the sampled centres comes from `gathered`: it holds the new values.
  return _map_leaves(
      lambda part, leaf, r: scatter_rows(leaf, r, part[:, 0], mesh, write),
      lambda part, leaf: part,
      rows,
      gathered,
      tree,
  )


# The [B, columns] cosines, logits and their gradients exist for one chunk of a shard's classes at
# a time, of at most this many elements (16 MB in float32), never for the whole shard; a shard of
# up to twice that is left whole (see chunk_columns_for).
CHUNK_ELEMENTS = 1 << 22
# On a CPU, chunks of half that (8 MB in float32) ran the head faster: at B = 512 and 100k classes
# on one device, 4,000 classes a chunk took 0.56-0.65 s a step against 0.69-0.76 s for 7,693
# (`bench_head --chunk_columns`, benchmarks/README.md, "Margin head"); wider chunks were slower.
CPU_CHUNK_ELEMENTS = 1 << 21
_MIN_CHUNK_COLUMNS = 128  # Keeps the chunk's matmul wide enough to run at speed.


def chunk_columns_for(
    batch_size: int, num_columns: int, chunk_elements: int = CHUNK_ELEMENTS
) -> int:
  """Classes per chunk of `_class_sums` for a global batch of `batch_size` rows.

  A shard whose [B, columns] cosines hold at most 2 * CHUNK_ELEMENTS is one chunk: several chunks
  cost a second pass of the matmul in the backward pass, worth it only where it saves more.
  Otherwise as wide as `chunk_elements` allows (CPU_CHUNK_ELEMENTS on a CPU), evened out over the
  chunks so that the last one re-reads (overlaps) fewer columns than there are chunks.
  """
  if batch_size * num_columns <= 2 * CHUNK_ELEMENTS:
    return num_columns
  widest = min(num_columns, max(_MIN_CHUNK_COLUMNS, chunk_elements // batch_size))
  return -(-num_columns // -(-num_columns // widest))


def _num_chunks(class_ids, chunk):
  return -(-class_ids.shape[0] // chunk)


def _chunk_slice(i, block, class_ids, chunk):
  """Chunk i of the shard's classes: its centres [chunk * K, D], class ids, and which of its
  columns no earlier chunk has covered (the last chunk is moved back to end at the last class,
  so it overlaps its predecessor instead of reading past the end)."""
  k = block.shape[0] // class_ids.shape[0]
  start = jnp.minimum(i * chunk, class_ids.shape[0] - chunk)
  centers = jax.lax.dynamic_slice_in_dim(block, start * k, chunk * k)
  ids = jax.lax.dynamic_slice_in_dim(class_ids, start, chunk)
  fresh = start + jnp.arange(chunk) >= i * chunk
  return start * k, centers, ids, fresh


def _chunk_logits(
    margin, compute_dtype, num_classes, emb_n, centers, ids, fresh, labels, state, cos_target
):
  """The chunk's cosines and non-target logits [B, chunk], with the masks of its target and its
  negative columns (padding classes and columns an earlier chunk covered are in neither)."""
  # The centres' inverse norms scale the matmul's columns (as l2_normalize would scale the
  # rows): no normalised copy of the centres is made. (Traced before the matmul: in the other
  # order XLA:CPU's buffer assignment of the 2M-class step grows by a quarter of a block; see
  # test_two_million_class_step_temporaries_stay_near_three_sampled_blocks.)
  scale = inverse_norms(centers)
  cos = margin.pool_class_cosines(
      jnp.dot(
          emb_n.astype(compute_dtype),
          centers.astype(compute_dtype).T,
          preferred_element_type=jnp.float32,
      )
      * scale
  )
  counted = (fresh & (ids < num_classes))[None, :]
  target = counted & (labels[:, None] == ids[None, :])
  logits = margin.nontarget_logits(cos, cos_target=cos_target, state=state)
  return cos, logits, target, counted & ~target


def _sum_exp(logits, negative, row_max):
  """sum over the negative columns of exp(logit - row_max), finite (and with a finite gradient)
  whatever the masked columns hold."""
  shifted = jnp.where(negative, logits, row_max[:, None]) - row_max[:, None]
  return jnp.sum(jnp.where(negative, jnp.exp(shifted), 0.0), axis=-1)


def _varying_constant(shape, dtype, fill=0):
  """A constant marked as varying over the mesh: a loop's initial carry must be typed as its
  body's result (which depends on the shard's centres) is."""
  return jax.lax.pcast(jnp.full(shape, fill, dtype), MESH_AXIS, to="varying")


def _running_best(best, best_id, values, ids):
  """(best, best_id) updated with the chunk's row maxima; on ties the earlier (smaller) id stays."""
  column = jnp.argmax(values, axis=-1)
  value = jnp.take_along_axis(values, column[:, None], axis=-1)[:, 0]
  better = value > best
  return jnp.where(better, value, best), jnp.where(better, ids[column], best_id)


def _initial_sums(batch, id_dtype):
  """The running values of `_class_sums` before any chunk (see _add_chunk)."""
  masked = _varying_constant(batch, jnp.float32, _MASKED_LOGIT)
  zeros = _varying_constant(batch, jnp.float32)
  no_id = _varying_constant(batch, id_dtype)
  return masked, zeros, zeros, masked, no_id, masked, no_id


def _add_chunk(head, i, chunk, emb_n, block, class_ids, labels, state, cos_target, sums):
  """The running sums of `_class_sums` with chunk i of the shard's classes added."""
  margin, compute_dtype, num_classes = head
  row_max, sum_exp, cos_t, best_logit, best_logit_id, best_cos, best_cos_id = sums
  _, centers, ids, fresh = _chunk_slice(i, block, class_ids, chunk)
  cos, logits, target, negative = _chunk_logits(
      margin, compute_dtype, num_classes, emb_n, centers, ids, fresh, labels, state, cos_target
  )
  cos_t = cos_t + jnp.sum(jnp.where(target, cos, 0.0), axis=-1)
  # The running maximum only shifts the exponent: no gradient flows through it.
  new_max = jax.lax.stop_gradient(
      jnp.maximum(row_max, jnp.max(jnp.where(negative, logits, _MASKED_LOGIT), axis=-1))
  )
  sum_exp = sum_exp * jnp.exp(row_max - new_max) + _sum_exp(logits, negative, new_max)
  best_logit, best_logit_id = _running_best(
      best_logit, best_logit_id, jnp.where(negative, logits, _MASKED_LOGIT), ids
  )
  best_cos, best_cos_id = _running_best(
      best_cos, best_cos_id, jnp.where(negative | target, cos, _MASKED_LOGIT), ids
  )
  return new_max, sum_exp, cos_t, best_logit, best_logit_id, best_cos, best_cos_id


def _class_sums(head, chunk, emb_n, block, class_ids, labels, state, cos_target):
  """One shard's share of the softmax, chunk by chunk over its classes (an online softmax).

  Args:
    head: (margin, compute_dtype, num_classes).
    chunk: classes per chunk.
    emb_n: [B, D] normalised embeddings of the global batch.
    block: [columns * K, D] the shard's centres (all of them or Partial FC's rows).
    class_ids: [columns] ascending class id of each (pooled) column.
    state, cos_target: the margin's state and each row's target cosine (no gradient), which
      non-target logits may read.

  Returns per row [B]: the largest negative logit (no gradient), the sum of exp(negative logit -
  that maximum), the target cosine if the target is on this shard (else 0), the best negative
  logit and its class id, and the best cosine and its class id (the last four without gradient).
  Differentiable in emb_n and block.
  """
  if chunk >= class_ids.shape[0]:
    # One chunk: plain autodiff, which keeps the [B, columns] cosines for the backward pass.
    sums = _initial_sums(emb_n.shape[0], class_ids.dtype)
    return _add_chunk(head, 0, chunk, emb_n, block, class_ids, labels, state, cos_target, sums)
  return _chunked_class_sums(head, chunk, emb_n, block, class_ids, labels, state, cos_target)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunked_class_sums(head, chunk, emb_n, block, class_ids, labels, state, cos_target):
  """_class_sums over several chunks, whose backward pass recomputes each chunk's cosines rather
  than keeping them: one more [B, D] x [D, chunk] product per chunk buys memory that does not
  grow with B x columns. The block's gradient is written chunk by chunk into one buffer."""
  return _chunked_class_sums_fwd(head, chunk, emb_n, block, class_ids, labels, state, cos_target)[0]


def _chunked_class_sums_fwd(head, chunk, emb_n, block, class_ids, labels, state, cos_target):
  sums = jax.lax.fori_loop(
      0,
      _num_chunks(class_ids, chunk),
      lambda i, sums: _add_chunk(
          head, i, chunk, emb_n, block, class_ids, labels, state, cos_target, sums
      ),
      _initial_sums(emb_n.shape[0], class_ids.dtype),
  )
  return sums, (emb_n, block, class_ids, labels, state, cos_target, sums[0])


def _chunked_class_sums_bwd(head, chunk, residuals, cotangents):
  margin, compute_dtype, num_classes = head
  emb_n, block, class_ids, labels, state, cos_target, row_max = residuals
  # The row maximum and the arg-maxes carry no gradient.
  _, d_sum_exp, d_cos_t = cotangents[:3]

  def body(i, carry):
    d_emb, d_block = carry
    offset, centers, ids, fresh = _chunk_slice(i, block, class_ids, chunk)

    def sums(emb_n, centers):
      cos, logits, target, negative = _chunk_logits(
          margin,
          compute_dtype,
          num_classes,
          emb_n,
          centers,
          ids,
          fresh,
          labels,
          state,
          cos_target,
      )
      return _sum_exp(logits, negative, row_max), jnp.sum(jnp.where(target, cos, 0.0), axis=-1)

    _, pullback = jax.vjp(sums, emb_n, centers)
    d_emb_chunk, d_centers = pullback((d_sum_exp, d_cos_t))
    # Added, not written: the overlapping last chunk adds zeros to the columns it re-reads.
    d_centers = jax.lax.dynamic_slice_in_dim(d_block, offset, centers.shape[0]) + d_centers
    return d_emb + d_emb_chunk, jax.lax.dynamic_update_slice_in_dim(d_block, d_centers, offset, 0)

  d_emb, d_block = jax.lax.fori_loop(
      0,
      _num_chunks(class_ids, chunk),
      body,
      (_varying_constant(emb_n.shape, emb_n.dtype), _varying_constant(block.shape, block.dtype)),
  )
  return d_emb, d_block, None, None, None, None


_chunked_class_sums.defvjp(_chunked_class_sums_fwd, _chunked_class_sums_bwd)


def _target_cosines_by_lookup(margin, compute_dtype, emb_n, block, class_ids, labels):
  """Each row's cosine to its target class if that class is among this shard's columns, else 0:
  the centres of the B targets looked up, not the whole [B, columns] product."""
  k = block.shape[0] // class_ids.shape[0]
  position = jnp.clip(jnp.searchsorted(class_ids, labels), 0, class_ids.shape[0] - 1)
  centers = block.reshape(-1, k, block.shape[-1])[position]  # [B, K, D]
  cos = jnp.einsum(
      "bd,bkd->bk",
      emb_n.astype(compute_dtype),
      centers.astype(compute_dtype),
      preferred_element_type=jnp.float32,
  )
  cos = margin.pool_class_cosines(cos * inverse_norms(centers))[:, 0]
  return jnp.where(class_ids[position] == labels, cos, 0.0)


def margin_head_loss(
    centers: jax.Array,
    embeddings: jax.Array,
    labels: jax.Array,
    margin: margins.Margin,
    margin_state: margins.State,
    *,
    mesh: Mesh,
    num_classes: int,
    rows: jax.Array | None = None,
    key: jax.Array | None = None,
    compute_dtype: Any = jnp.float32,
    chunk_columns: int | None = None,
):
  """Margin-softmax cross-entropy of a class-sharded head, for any margin method.

  Args:
    centers: [C_pad * K, D] class centres (K = margin.centers_per_class, class-major), sharded
      P(MESH_AXIS, None); with `rows`, only the Partial FC block gather_rows(all, rows).
    embeddings: [B, D] backbone embeddings (not normalised), batch-sharded over MESH_AXIS.
    labels: [B] int class ids in [0, num_classes).
    margin: an adam_face.margins.Margin; margin_state its state before this batch.
    rows: Partial FC's rows for this batch (partial_fc_rows), which must hold its labels.
    key: PRNG key for margins that draw (ElasticFace).
    compute_dtype: dtype of the cosine matmul (accumulation is always float32; the float32 master
      centres are cast as they are, and their inverse norms scale the matmul's float32 result).
    chunk_columns: classes per chunk of the softmax (default: chunk_columns_for the batch, so
      that no [B, chunk] temporary exceeds CHUNK_ELEMENTS, CPU_CHUNK_ELEMENTS on a CPU); the
      result does not depend on it beyond float rounding.

  Returns:
    (loss, metrics, new_margin_state): metrics hold 'acc', 'acc_margin', the margin's own
    metrics (current margin, running statistics) and 'cos_target' [B], each row's cosine to its
    own class (the best sub-centre's), without gradient; new_margin_state is the state after this
    batch. With `rows`, accuracy is over the sampled classes, as the loss is.
  """
  num_shards = mesh.size
  k = margin.centers_per_class
  c_pad = padded_num_classes(num_classes, num_shards)
  if rows is None and centers.shape[0] != c_pad * k:
    raise ValueError(
        f"centers has {centers.shape[0]} rows; expected {c_pad * k} for "
        f"{num_classes} classes x {k} centres on {num_shards} devices (use "
        "init_centers)."
    )
  if rows is not None and k > 1:
    raise ValueError(
        "Partial FC sampling (head.sample_rate < 1) does not support sub-centres; "
        "use head.sample_rate = 1 with subcenter_arcface."
    )
  if rows is not None and centers.shape[0] != rows.shape[0]:
    raise ValueError(
        f"centers has {centers.shape[0]} rows but Partial FC chose {rows.shape[0]}; pass "
        "gather_rows(centers, rows, mesh)."
    )
  if chunk_columns is not None and chunk_columns < 1:
    raise ValueError(
        f"chunk_columns must be a positive number of classes, got {chunk_columns}; leave it "
        "None for chunk_columns_for's choice."
    )
  if embeddings.shape[0] % num_shards:
    raise ValueError(
        f"Global batch {embeddings.shape[0]} is not divisible by the {num_shards} "
        "devices of the mesh; choose a batch size that is a multiple of it."
    )
  per_shard = c_pad // num_shards
  if rows is None:  # Every centre: the rows are the shard's own, in order.
    rows = jnp.tile(jnp.arange(per_shard, dtype=jnp.int32), num_shards)
  margin_key = jax.random.key(0) if key is None else key

  def local_loss(
      centers_local, rows_local, emb_local, labels_local, state, margin_key, feature_norm
  ):
    shard = jax.lax.axis_index(MESH_AXIS)
    emb_n = l2_normalize(jax.lax.all_gather(emb_local, MESH_AXIS, tiled=True))
    labels = jax.lax.all_gather(labels_local, MESH_AXIS, tiled=True)
    class_ids = shard * per_shard + rows_local
    # The batch's statistics come before its logits (CurricularFace's non-target logits read
    # them), so each row's target cosine is looked up first; each lives on exactly one shard.
    cos_target_now = jax.lax.stop_gradient(
        jax.lax.psum(
            _target_cosines_by_lookup(
                margin, compute_dtype, emb_n, centers_local, class_ids, labels
            ),
            MESH_AXIS,
        )
    )
    # Every shard sees the same global cos_target and feature_norm, so the state stays replicated.
    state = margin.update_statistics(state, cos_target=cos_target_now, feature_norm=feature_norm)
    on_cpu = mesh.devices.flat[0].platform == "cpu"
    chunk = chunk_columns or chunk_columns_for(
        emb_n.shape[0],
        rows_local.shape[0],
        CPU_CHUNK_ELEMENTS if on_cpu else CHUNK_ELEMENTS,
    )
    row_max, sum_exp, cos_t, best_logit, best_logit_id, best_cos, best_cos_id = _class_sums(
        (margin, compute_dtype, num_classes),
        chunk,
        emb_n,
        centers_local,
        class_ids,
        labels,
        state,
        cos_target_now,
    )
    # The target cosine again, from the chunks' products: this one carries the gradient.
    cos_target = jax.lax.psum(cos_t, MESH_AXIS)
    # The same margin_key on every shard: a margin that draws gives each row one value.
    target = margin.target_logits(
        cos_target, state=state, feature_norm=feature_norm, key=margin_key
    )
    # log-sum-exp over every class: the shards' negatives, then the target.
    row_max = jax.lax.stop_gradient(row_max)
    global_max = jax.lax.pmax(row_max, MESH_AXIS)
    negatives = jax.lax.psum(sum_exp * jnp.exp(row_max - global_max), MESH_AXIS)
    top = jnp.maximum(global_max, jax.lax.stop_gradient(target))
    log_sum_exp = top + jnp.log(negatives * jnp.exp(global_max - top) + jnp.exp(target - top))
    loss = jnp.mean(log_sum_exp - target) + margin.extra_loss(feature_norm)
    best_negative, best_negative_id = _global_best(best_logit, best_logit_id, c_pad)
    target_wins = (target > best_negative) | (
        (target == best_negative) & (labels < best_negative_id)
    )
    pred_margin = jnp.where(jax.lax.stop_gradient(target_wins), labels, best_negative_id)
    _, pred = _global_best(best_cos, best_cos_id, c_pad)
    acc_margin = _batch_accuracy(pred_margin, labels_local, shard)
    metrics = {
        "acc": _batch_accuracy(pred, labels_local, shard),
        "acc_margin": acc_margin,
        **margin.metrics(state),
        "cos_target": jax.lax.stop_gradient(cos_target),
    }
    return loss, metrics, margin.update_margin(state, acc_margin=acc_margin)

  sharded = jax.shard_map(
      local_loss,
      mesh=mesh,
      in_specs=(P(MESH_AXIS, None), P(MESH_AXIS), P(MESH_AXIS, None), P(MESH_AXIS), P(), P(), P()),
      out_specs=(P(), P(), P()),
  )
  # Norms of the global batch, replicated (AdaFace and MagFace read them; MagFace's gradient
  # flows back through them to the embeddings).
  feature_norm = jnp.linalg.norm(embeddings.astype(jnp.float32), axis=-1)
  return sharded(centers, rows, embeddings, labels, margin_state, margin_key, feature_norm)
