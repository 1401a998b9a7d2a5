"""Set-to-set face recognition metrics (the IJB-B / IJB-C protocols) from face embeddings.

A *template* is a set of faces of one subject, grouped into *media* (one photo, or the frames of
one video). Conventions, those of the IJB papers and of insightface's evaluation scripts unless
said otherwise:

* Template feature (media pooling): each face's feature is its embedding times its weight (the
  detector score, the embedding's norm, both or neither: ijb.py chooses); the faces of one medium
  are averaged, the media of a template are averaged, and the result is L2-normalised. (insightface
  sums the media means; after the normalisation that is the same vector.) A face with weight 0
  takes no part; a template whose faces all have weight 0 is *empty* and has no feature.
* 1:1 verification: a template pair's score is the cosine of the two template features. TAR@FAR
  follows verification_metrics.far_threshold (the exact threshold accepting at most
  floor(FAR x impostors) impostor pairs; the achieved FAR is reported). insightface's
  eval_ijbc.py instead reads the TPR of the ROC point whose FPR is nearest the target, which may
  lie above it; its figure is reported beside ours as 'tar_nearest@far=...'.
* 1:N identification, open set, per gallery (NIST's protocol for IJB-C: galleries G1 and G2 each
  searched by all probe templates; a probe whose subject is not in the gallery is *non-mated*):
  - the rank of a mated probe is 1 + the number of gallery templates scoring strictly higher than
    its mated template (ties go to the mated template);
  - rank-k identification rate: the fraction of mated probes of rank <= k (closed set);
  - FPIR(t): the fraction of non-mated probes whose best gallery score is above t; TPIR(t): the
    fraction of mated probes of rank 1 whose mated score is above t; the threshold at a target
    FPIR is far_threshold of the non-mated probes' best scores.
  insightface's ijb_1n.py differs, and its figures are also reported (insightface_one_to_n_metrics):
  it joins G1 and G2 into one gallery, so every probe is mated; rank-k is over every probe; and
  its 'TPR@FAR' threshold is the ceil(FAR x probes)-th largest score of all non-mated (probe,
  gallery template) pairs, its TPR the fraction of probes whose mated score is above it, at any
  rank. Its figures are not comparable with NIST's.

Scores of many pairs and probes are computed on the device mesh: pairs (or probes) are sharded
over every device, the template features replicated.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from adam_face import verification_metrics

VERIFICATION_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
IDENTIFICATION_FPIRS = (1e-2, 1e-1)
IDENTIFICATION_RANKS = (1, 5, 10)
INSIGHTFACE_FARS = (1e-2, 1e-1)  # ijb_1n.py's `Fars`.
# Elements of one block of the templates' Gram matrix (pair_scores): 128 MB of float32; entries
# of a block are int32.
_GRAM_BLOCK_ELEMENTS = 1 << 25
# Template.rows looks ids up in a table while their range is below this (IJB-C's: 0 to ~190k).
_LOOKUP_TABLE_SIZE = 1 << 26
# Probe templates per device and program run of the gallery search ([probes, gallery] scores).
_PROBES_PER_DEVICE = 1 << 10


@dataclasses.dataclass(frozen=True)
class Templates:
  """Pooled template features: ids int64 [T] ascending, features float32 [T, D] of unit norm
  (rows of empty templates are zero), num_faces int [T] (faces of weight > 0)."""

  ids: np.ndarray
  features: np.ndarray
  num_faces: np.ndarray

  @property
  def is_empty(self) -> np.ndarray:
    return self.num_faces == 0

  def rows(self, template_ids: np.ndarray) -> np.ndarray:
    """The row of each template id; ValueError naming the first unknown one."""
    template_ids = np.asarray(template_ids, np.int64)
    if not len(self.ids):
      raise ValueError("there are no templates.")
    low, high = int(self.ids[0]), int(self.ids[-1])
    if high - low < _LOOKUP_TABLE_SIZE:  # IJB's ids: a table is 40x faster than a binary search.
      table = np.full(high - low + 2, -1, np.int64)
      table[self.ids - low] = np.arange(len(self.ids))
      rows = table[np.clip(template_ids - low, -1, high - low + 1)]
      known = rows >= 0
    else:
      rows = np.minimum(np.searchsorted(self.ids, template_ids), len(self.ids) - 1)
      known = self.ids[rows] == template_ids
    if not known.all():
      unknown = np.flatnonzero(~known)
      raise ValueError(
          f"{unknown.size} template ids have no faces (first: {template_ids[unknown[0]]}); the "
          "pair or 1:N lists do not belong to this face list."
      )
    return rows


def pool_templates(
    features: np.ndarray, weights: np.ndarray, templates: np.ndarray, media: np.ndarray
) -> Templates:
  """Media pooling (module docstring) of face features [N, D] with weights [N] into templates.

  Args:
    features: float [N, D], one row per face.
    weights: float [N], >= 0; each face's feature is multiplied by it (0: the face takes no part).
    templates: int [N], each face's template id.
    media: int [N], each face's medium id (media are numbered within the whole list).
  """
  features = np.asarray(features, np.float32)
  weights = np.asarray(weights, np.float64)
  templates, media = np.asarray(templates, np.int64), np.asarray(media, np.int64)
  num_faces = len(features)
  if features.ndim != 2 or not weights.shape == templates.shape == media.shape == (num_faces,):
    raise ValueError(
        f"features must be [N, D] and weights, templates, media [N]; got {features.shape}, "
        f"{weights.shape}, {templates.shape}, {media.shape}."
    )
  if not (np.isfinite(weights).all() and (weights >= 0).all()):
    raise ValueError("weights must be finite and non-negative.")
  used = weights > 0
  # Faces grouped by (template, medium), so each medium's faces, then each template's media, are
  # consecutive runs, summed on the device (numpy's reduceat over rows is 30x slower).
  order = np.lexsort((media, templates))
  order = order[used[order]]
  sorted_templates, sorted_media = templates[order], media[order]
  template_ids = np.unique(templates)
  new_medium = np.ones(len(order), bool)
  new_medium[1:] = (sorted_templates[1:] != sorted_templates[:-1]) | (
      sorted_media[1:] != sorted_media[:-1]
  )
  medium_of_face = np.cumsum(new_medium) - 1
  medium_templates = sorted_templates[new_medium]
  template_of_medium = np.searchsorted(template_ids, medium_templates)
  counts = np.bincount(np.searchsorted(template_ids, sorted_templates), minlength=len(template_ids))
  pooled, norms = _pool(
      features,
      order.astype(np.int32),
      weights[order].astype(np.float32),
      medium_of_face.astype(np.int32),
      np.bincount(medium_of_face, minlength=len(medium_templates)).astype(np.float32),
      template_of_medium.astype(np.int32),
      np.bincount(template_of_medium, minlength=len(template_ids)).astype(np.float32),
  )
  norms = np.asarray(norms)
  if not (np.isfinite(norms) & ((norms > 0) | (counts == 0))).all():
    raise ValueError("a template's pooled feature has zero or non-finite norm.")
  pooled = np.asarray(pooled)
  return Templates(template_ids, pooled, counts)


@jax.jit
def _pool(features, order, face_weights, medium_of_face, medium_sizes, template_of_medium, media):
  """(unit template features [T, D], their norms before normalising [T]) of pool_templates."""
  weighted = features[order] * face_weights[:, None]
  medium_means = (
      jax.ops.segment_sum(
          weighted, medium_of_face, num_segments=medium_sizes.shape[0], indices_are_sorted=True
      )
      / jnp.maximum(medium_sizes, 1)[:, None]
  )
  means = (
      jax.ops.segment_sum(
          medium_means, template_of_medium, num_segments=media.shape[0], indices_are_sorted=True
      )
      / jnp.maximum(media, 1)[:, None]
  )
  norms = jnp.linalg.norm(means, axis=1)
  return means / jnp.where(norms > 0, norms, 1)[:, None], norms


def pair_scores(
    templates: Templates, first: np.ndarray, second: np.ndarray, mesh: jax.sharding.Mesh
) -> np.ndarray:
  """Cosine scores float32 [P] of template pairs (ids).

  Pairs are many (IJB-C: 15.7 million among 23,124 templates, 6% of all template pairs), so
  gathering two feature rows per pair would read 64 GB. Instead the Gram matrix of the templates
  is computed a block of rows at a time (one matrix product on the mesh, the block's rows sharded
  over the devices) and each pair's score is read, on the devices, from the block holding its
  first template.
  """
  rows_a, rows_b = templates.rows(first), templates.rows(second)
  num_templates = len(templates.ids)
  # Blocks of rows a multiple of the devices, so that they split evenly over the mesh.
  block = max(1, min(num_templates, _GRAM_BLOCK_ELEMENTS // num_templates))
  block = -(-block // mesh.size) * mesh.size
  num_blocks = -(-num_templates // block)
  padded = np.zeros((num_blocks * block, templates.features.shape[1]), np.float32)
  padded[:num_templates] = templates.features
  all_features = jax.device_put(padded, NamedSharding(mesh, PartitionSpec()))
  # Pairs grouped by the block of their first template (a stable radix sort of small ints), each
  # given as its entry in that block's flattened [block, all] Gram matrix.
  block_of_pair = (rows_a // block).astype(np.int16 if num_blocks < 2**15 else np.int32)
  order = np.argsort(block_of_pair, kind="stable")
  bounds = np.searchsorted(block_of_pair[order], np.arange(num_blocks + 1))
  entries = ((rows_a - block_of_pair.astype(np.int64) * block) * len(padded) + rows_b)[order]
  step = _gram_block_scores(mesh)
  rows_sharded = NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))
  pending = []
  for k in range(num_blocks):
    lo, hi = bounds[k], bounds[k + 1]
    if hi > lo:
      # A power-of-two number of entries: a handful of programs serve every block.
      wanted = np.zeros(1 << int(hi - lo - 1).bit_length(), np.int32)
      wanted[: hi - lo] = entries[lo:hi]
      rows = jax.device_put(padded[k * block : (k + 1) * block], rows_sharded)
      pending.append((step(rows, all_features, wanted), lo, hi))
  scores = np.empty(len(rows_a), np.float32)
  for block_scores, lo, hi in pending:
    scores[order[lo:hi]] = np.asarray(block_scores)[: hi - lo]
  return scores


@functools.lru_cache(maxsize=None)
def _gram_block_scores(mesh: jax.sharding.Mesh):
  """Jitted (block rows [R, D], all rows [L, D], flat entries [E]) -> those entries of the block's
  Gram matrix [R, L], its rows sharded over the mesh; only the [E] scores leave the devices."""
  rows_sharded = NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))

  def block_scores(rows, features, entries):
    # HIGHEST: float32 products, not TF32 or bfloat16 passes, on accelerators that default to them.
    gram = jnp.matmul(rows, features.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.take(gram.reshape(-1), entries)

  return jax.jit(block_scores, in_shardings=(rows_sharded, None, None))


def one_to_one_metrics(
    scores: np.ndarray, is_same: np.ndarray, fars: Sequence[float] = VERIFICATION_FARS
) -> tuple[dict, tuple[np.ndarray, np.ndarray]]:
  """1:1 metrics of template-pair scores and their ROC (far, tar).

  The metrics: 'tar@far=', 'far@far=' (achieved), 'threshold@far=', 'tar_nearest@far='
  (insightface's nearest-ROC-point reading) per FAR, 'auc', 'eer', 'num_genuine',
  'num_impostor'.
  """
  scores, is_same = np.asarray(scores), np.asarray(is_same).astype(bool)
  fars = verification_metrics.checked_fars(fars)
  far_curve, tar_curve, _ = verification_metrics.roc_curve(scores, is_same)
  # sklearn.metrics.roc_curve(drop_intermediate=True), which insightface reads, keeps the ends
  # and every corner: the points where the curve's second difference in FAR or TAR is non-zero.
  kept = np.ones(len(far_curve), bool)
  kept[1:-1] = (np.diff(far_curve, 2) != 0) | (np.diff(tar_curve, 2) != 0)
  far_kept, tar_kept = far_curve[kept], tar_curve[kept]
  impostors, genuine = scores[~is_same], scores[is_same]
  metrics = {}
  for far in fars:
    label = verification_metrics.far_label(far)
    threshold, achieved = verification_metrics.far_threshold(impostors, far)
    metrics[f"tar@far={label}"] = float(np.count_nonzero(genuine > threshold) / genuine.size)
    metrics[f"far@far={label}"] = achieved
    metrics[f"threshold@far={label}"] = threshold
    # insightface's reading: the TAR of the kept point whose FAR is nearest, the highest if several.
    distance = np.abs(far_kept - far)
    metrics[f"tar_nearest@far={label}"] = float(tar_kept[distance == distance.min()].max())
  metrics["auc"] = verification_metrics.area_under_roc(far_curve, tar_curve)
  metrics["eer"] = verification_metrics.equal_error_rate(far_curve, tar_curve)
  metrics["num_genuine"] = int(genuine.size)
  metrics["num_impostor"] = int(impostors.size)
  return metrics, (far_curve, tar_curve)


@dataclasses.dataclass(frozen=True)
class SearchResult:
  """One gallery searched by every probe: per probe, its mated template's score and rank (NaN and
  0 for non-mated probes) and its best gallery score; and, where asked for, the largest scores of
  non-mated (probe, gallery template) pairs over all probes."""

  mated_score: np.ndarray  # float32 [P]
  rank: np.ndarray  # int32 [P], 0 when non-mated
  best_score: np.ndarray  # float32 [P]
  largest_non_mated: np.ndarray | None = None  # float32 [k], descending

  @property
  def is_mated(self) -> np.ndarray:
    return self.rank > 0


def search_gallery(
    probes: np.ndarray,
    gallery: np.ndarray,
    mated_row: np.ndarray,
    mesh: jax.sharding.Mesh,
    num_largest_non_mated: int = 0,
) -> SearchResult:
  """Scores probe features [P, D] against gallery features [G, D] (unit rows) on the mesh.

  Args:
    probes: float32 [P, D].
    gallery: float32 [G, D].
    mated_row: int [P], the gallery row of each probe's subject, -1 where it has none.
    mesh: probes are sharded over its devices, the gallery replicated; each program run scores
      a block of probes against the whole gallery in one matrix product.
    num_largest_non_mated: k, for SearchResult.largest_non_mated (insightface_one_to_n_metrics);
      each block keeps its probes' k largest non-mated scores, merged on the host.
  """
  probes = np.asarray(probes, np.float32)
  gallery_on_mesh = jax.device_put(
      np.asarray(gallery, np.float32), NamedSharding(mesh, PartitionSpec())
  )
  mated_row = np.asarray(mated_row, np.int32)
  chunk = _PROBES_PER_DEVICE * mesh.size
  # A probe has at most G non-mated scores: its top k never needs more columns.
  row_k = min(num_largest_non_mated, len(gallery))
  search = _search_step(mesh, row_k)
  axes = tuple(mesh.axis_names)
  pending = []
  for start in range(0, len(probes), chunk):
    block, rows = probes[start : start + chunk], mated_row[start : start + chunk]
    valid = len(block)
    pad = chunk - valid if len(probes) > chunk else (-valid) % mesh.size
    block = np.pad(block, ((0, pad), (0, 0)))
    rows = np.pad(rows, (0, pad), constant_values=-1)
    block, rows = jax.device_put((block, rows), NamedSharding(mesh, PartitionSpec(axes)))
    pending.append((search(gallery_on_mesh, block, rows), valid))
  parts, largest = [], None
  for out, valid in pending:
    mated_score, rank, best, *row_largest = (np.asarray(x)[:valid] for x in out)
    parts.append((mated_score, rank, best))
    if row_largest:
      # -inf marks a probe's mated column: never a score. Merged block by block, descending.
      scores = np.concatenate([row_largest[0].ravel()] + ([] if largest is None else [largest]))
      largest = -np.sort(-scores[scores > -np.inf])[:num_largest_non_mated]
  mated_score, rank, best = (np.concatenate(column) for column in zip(*parts))
  return SearchResult(mated_score, rank, best, largest)


@functools.lru_cache(maxsize=None)
def _search_step(mesh: jax.sharding.Mesh, row_k: int):
  shard = NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))

  def search(gallery, probes, mated_row):
    scores = jnp.matmul(probes, gallery.T, precision=jax.lax.Precision.HIGHEST)  # [p, G]
    is_mated = mated_row >= 0
    mated = jnp.take_along_axis(scores, jnp.maximum(mated_row, 0)[:, None], axis=1)[:, 0]
    mated = jnp.where(is_mated, mated, jnp.nan)
    rank = 1 + jnp.sum(scores > mated[:, None], axis=1, dtype=jnp.int32)
    out = (mated, jnp.where(is_mated, rank, 0), jnp.max(scores, axis=1))
    if row_k:
      columns = jnp.arange(scores.shape[1])
      non_mated = jnp.where(columns == mated_row[:, None], -jnp.inf, scores)
      out += (jax.lax.top_k(non_mated, row_k)[0],)
    return out

  return jax.jit(search, in_shardings=(None, shard, shard), out_shardings=shard)


def one_to_n_metrics(
    result: SearchResult,
    fpirs: Sequence[float] = IDENTIFICATION_FPIRS,
    ranks: Sequence[int] = IDENTIFICATION_RANKS,
) -> dict:
  """Open-set metrics of one gallery search (module docstring): 'rank-k' for each k, and
  'tpir@fpir=', 'fpir@fpir=' (achieved), 'threshold@fpir=' for each FPIR, 'num_mated',
  'num_non_mated'."""
  is_mated = result.is_mated
  if not is_mated.any():
    raise ValueError("no probe is mated in this gallery; rank and TPIR are undefined.")
  rank = result.rank[is_mated]
  metrics = {f"rank-{k}": float(np.mean(rank <= k)) for k in ranks}
  non_mated_best = result.best_score[~is_mated]
  first, mated_score = rank == 1, result.mated_score[is_mated]
  for fpir in verification_metrics.checked_fars(fpirs):
    label = verification_metrics.far_label(fpir)
    if non_mated_best.size:
      threshold, achieved = verification_metrics.far_threshold(non_mated_best, fpir)
    else:  # Closed set: nothing to reject.
      threshold, achieved = -np.inf, 0.0
    metrics[f"tpir@fpir={label}"] = float(np.mean(first & (mated_score > threshold)))
    metrics[f"fpir@fpir={label}"] = achieved
    metrics[f"threshold@fpir={label}"] = threshold
  metrics["num_mated"] = int(is_mated.sum())
  metrics["num_non_mated"] = int((~is_mated).sum())
  return metrics


def insightface_one_to_n_metrics(
    result: SearchResult,
    fars: Sequence[float] = INSIGHTFACE_FARS,
    ranks: Sequence[int] = IDENTIFICATION_RANKS,
) -> dict:
  """insightface's ijb_1n.py figures (module docstring) of a search of the galleries joined into
  one, with result.largest_non_mated of at least ceil(max(fars) x probes) scores: 'rank-k' over
  every probe searched (one whose subject has no usable gallery template counts as a miss), and
  'tpr@far=' and 'threshold@far=' for each FAR. Ties rank the mated template first, where
  ijb_1n.py's argsort orders them arbitrarily."""
  num_probes = len(result.rank)
  metrics = {f"rank-{k}": float(np.mean(result.is_mated & (result.rank <= k))) for k in ranks}
  for far in verification_metrics.checked_fars(fars):
    position = math.ceil(num_probes * far)  # ijb_1n.py's `required_topk`, computed as it is.
    if position > len(result.largest_non_mated):
      raise ValueError(
          f"FAR {far} needs the {position} largest non-mated scores; the search kept "
          f"{len(result.largest_non_mated)} (search_gallery's num_largest_non_mated)."
      )
    threshold = float(result.largest_non_mated[position - 1])
    label = verification_metrics.far_label(far)
    # NaN (a probe without a mated template) is above no threshold.
    metrics[f"tpr@far={label}"] = float(np.mean(result.mated_score > threshold))
    metrics[f"threshold@far={label}"] = threshold
  return metrics


def insightface_identification(
    probes: np.ndarray,
    gallery: np.ndarray,
    mated_row: np.ndarray,
    mesh: jax.sharding.Mesh,
    fars: Sequence[float] = INSIGHTFACE_FARS,
    ranks: Sequence[int] = IDENTIFICATION_RANKS,
) -> dict:
  """insightface_one_to_n_metrics of `gallery` (the galleries joined) searched by every probe
  (search_gallery's arguments), keeping as many non-mated scores as its largest FAR reads."""
  result = search_gallery(
      probes, gallery, mated_row, mesh, num_largest_non_mated=math.ceil(max(fars) * len(probes))
  )
  return insightface_one_to_n_metrics(result, fars, ranks)
