"""The margin-softmax classifier head, sharded by class over the device mesh, with Partial FC.

The class-centre matrix W [C, D] is the largest tensor of face recognition training (2 M identities
x 512 dims is 4 GB in float32 before its optimiser state), and the logits [B, C] are larger still.
So, as insightface's Partial FC does in PyTorch, every device holds the centres of C/N classes:

  1. the embeddings of the global batch are all-gathered ([B, D] per device, small);
  2. each device computes the cosines and margin logits of the whole batch against *its* classes;
  3. the softmax is finished with a pmax of the row maxima and a psum of the row sums, and the
     target logit (which lives on exactly one device) is recovered with a psum.

The full W and the full [B, C] logits never exist on one device; the backward pass of the
all-gather is a reduce-scatter, which hands every device the gradient of its own embeddings. The
backbone is data-parallel over the same one-axis mesh (`MESH_AXIS`), so one mesh serves both.

Class counts not divisible by N are padded up to `padded_num_classes`; padding classes get a logit
of `_MASKED_LOGIT`, so they never win the arg-max, never take softmax mass, and receive no gradient.

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

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from adam_face import losses, margins

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


def random_centers(
    key: jax.Array,
    num_classes: int,
    embedding_dim: int,
    num_shards: int,
    centers_per_class: int = 1,
) -> jax.Array:
  """N(0, 0.01^2) class centres [C_pad * K, D] (K centres a class, class-major)."""
  shape = (padded_num_classes(num_classes, num_shards) * centers_per_class, embedding_dim)
  return 0.01 * jax.random.normal(key, shape, jnp.float32)


def init_centers(
    key: jax.Array, num_classes: int, embedding_dim: int, mesh: Mesh, centers_per_class: int = 1
) -> jax.Array:
  """random_centers, created directly in their class-sharded layout."""
  init = jax.jit(
      lambda k: random_centers(k, num_classes, embedding_dim, mesh.size, centers_per_class),
      out_shardings=centers_sharding(mesh),
  )
  return init(key)


def l2_normalize(x: jax.Array) -> jax.Array:
  """Rows scaled to unit norm, in float32 (a zero row stays finite)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


def _global_argmax(values: jax.Array, class_ids: jax.Array, sentinel: int) -> jax.Array:
  """Arg-max over classes spread across shards; ties go to the smallest class id (jnp.argmax)."""
  values = jax.lax.stop_gradient(values)
  local_best = jnp.max(values, axis=-1)
  local_arg = class_ids[jnp.argmax(values, axis=-1)]
  best = jax.lax.pmax(local_best, MESH_AXIS)
  return jax.lax.pmin(jnp.where(local_best == best, local_arg, sentinel), MESH_AXIS)


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


def scatter_rows(centers: jax.Array, rows: jax.Array, values: jax.Array, mesh: Mesh) -> jax.Array:
  """centers with its `rows` (per shard, as from partial_fc_rows) replaced by `values`.

  An in-place update of each shard when `centers` is a donated buffer: nothing of size [C, D]
  is allocated.
  """
  return jax.shard_map(
      lambda w, r, v: w.at[r].set(v, indices_are_sorted=True, unique_indices=True),
      mesh=mesh,
      in_specs=(P(MESH_AXIS), P(MESH_AXIS), P(MESH_AXIS)),
      out_specs=P(MESH_AXIS),
  )(centers, rows, values)


def _map_center_leaves(fn, rows: Sequence[jax.Array | None], tree: Any, *rest: Any) -> Any:
  """fn(leaf, *rest_leaves, rows[k]) on every 'centers' leaf of head k whose rows are not None;
  every other leaf of `tree` passes through.

  The centres of head k are the 'centers' leaves under sequence index k: params['head'][k] and
  its mirrors in the optimiser state (momentum, Adam moments).
  """

  def apply(path, leaf, *rest_leaves):
    keys = [getattr(k, "key", None) for k in path]
    if "centers" not in keys:
      return leaf
    position = keys.index("centers")
    head_rows = rows[getattr(path[position - 1], "idx", 0) if position else 0]
    return leaf if head_rows is None else fn(leaf, *rest_leaves, head_rows)

  return jax.tree_util.tree_map_with_path(apply, tree, *rest)


def gather_center_rows(tree: Any, rows: Sequence[jax.Array | None], mesh: Mesh) -> Any:
  """Every head's centres in `tree` (params or optimiser state) cut to its Partial FC rows."""
  return _map_center_leaves(lambda leaf, r: gather_rows(leaf, r, mesh), rows, tree)


def scatter_center_rows(
    tree: Any, gathered: Any, rows: Sequence[jax.Array | None], mesh: Mesh
) -> Any:
  """The inverse of gather_center_rows: `tree` with the gathered rows written back."""
  # Every leaf but the sampled centres comes from `gathered`: it holds the new values.
  return _map_center_leaves(
      lambda part, leaf, r: scatter_rows(leaf, r, part, mesh), rows, gathered, tree
  )


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
    emb = jax.lax.all_gather(emb_local, MESH_AXIS, tiled=True)
    labels = jax.lax.all_gather(labels_local, MESH_AXIS, tiled=True)
    class_ids = shard * per_shard + rows_local
    # The centres' inverse norms scale the matmul's columns (as l2_normalize would scale the
    # rows): no normalised copy of the [C/N, D] block is made, one block less at the step's peak.
    inverse_norms = jax.lax.rsqrt(
        jnp.maximum(jnp.sum(centers_local * centers_local, axis=-1), 1e-12)
    )
    cos = margin.pool_class_cosines(
        jnp.dot(
            l2_normalize(emb).astype(compute_dtype),
            centers_local.astype(compute_dtype).T,
            preferred_element_type=jnp.float32,
        )
        * inverse_norms
    )
    target_mask = labels[:, None] == class_ids[None, :]
    real = (class_ids < num_classes)[None, :]
    # Each row's target lives on exactly one shard; the psum hands its cosine to every shard.
    cos_target = jax.lax.psum(losses.target_cosines(cos, target_mask), MESH_AXIS)
    # Every shard sees the same global cos_target and feature_norm, so the state stays replicated.
    state = margin.update_statistics(state, cos_target=cos_target, feature_norm=feature_norm)
    # The same margin_key on every shard: a margin that draws gives each row one value.
    target = margin.target_logits(
        cos_target, state=state, feature_norm=feature_norm, key=margin_key
    )
    # Per-row values, the same on every shard, meet this shard's [B, C/N] block below. Marked as
    # varying while still [B]: else shard_map marks the broadcast [B, C/N] operand, and the
    # backward pass all-reduces a [B, C/N] gradient instead of a [B] one.
    as_varying = lambda x: jax.lax.pcast(x, MESH_AXIS, to="varying")  # noqa: E731
    others = margin.nontarget_logits(cos, cos_target=as_varying(cos_target), state=state)
    logits = jnp.where(
        real, jnp.where(target_mask, as_varying(target)[:, None], others), _MASKED_LOGIT
    )
    row_max = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(logits, axis=-1)), MESH_AXIS)
    sum_exp = jax.lax.psum(jnp.sum(jnp.exp(logits - row_max[:, None]), axis=-1), MESH_AXIS)
    loss = jnp.mean(jnp.log(sum_exp) + row_max - target) + margin.extra_loss(feature_norm)
    pred_margin = _global_argmax(logits, class_ids, c_pad)
    pred = _global_argmax(jnp.where(real, cos, _MASKED_LOGIT), class_ids, c_pad)
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
