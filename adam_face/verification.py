"""Scores verification sets with an embedding function: embeddings, then exact metrics and HETD.

Embedding is embedding.compute_embeddings (the flip test on the device mesh); scores and metrics
are verification_metrics (numpy); reports of the results are in report.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np

from adam_face import embedding
from adam_face import report
from adam_face import verification_metrics


@dataclasses.dataclass(frozen=True)
class EvaluationResult:
  """Metrics per set (verification_metrics dicts) and ROC curves (far, tar) per set."""

  metrics: dict[str, dict]
  curves: dict[str, tuple[np.ndarray, np.ndarray]]

  def scalars(self) -> dict[str, float]:
    return report.flatten_metrics(self.metrics)


class Evaluator:
  """Scores every verification set, plus HETD when lfw, cfp_fp and agedb_30 are all present.

  Sets are dicts as verification_sets.load_verification_set returns them: 'image_a', 'image_b'
  (uint8 [N, H, W, C]), 'is_same' (bool [N]) and 'fold' (int [N]).
  """

  def __init__(
      self,
      sets: Mapping[str, Mapping[str, np.ndarray]],
      *,
      batch_size: int,
      mesh: jax.sharding.Mesh,
      flip: str = "sum",
      fars: Sequence[float] = verification_metrics.DEFAULT_FARS,
      hetd_fars: Sequence[float] = verification_metrics.HETD_FARS,
  ):
    if not sets:
      raise ValueError("Evaluator needs at least one verification set.")
    if verification_metrics.HETD_NAME in sets:
      raise ValueError(
          f"{verification_metrics.HETD_NAME!r} is reserved for the pooled hard-examples set."
      )
    for name, data in sets.items():
      missing = {"image_a", "image_b", "is_same", "fold"} - set(data)
      if missing:
        raise ValueError(
            f"verification set {name!r} lacks {sorted(missing)}; load it with "
            "verification_sets.load_verification_set."
        )
    if flip not in embedding.FLIP_MODES:
      raise ValueError(f"flip={flip!r} is not one of {embedding.FLIP_MODES}.")
    self._sets = dict(sets)
    self._batch_size = batch_size
    self._mesh = mesh
    self._flip = flip
    self._fars = verification_metrics.checked_fars(fars)
    self._hetd_fars = verification_metrics.checked_fars(hetd_fars)

  def __call__(self, embed_fn: Callable[[jax.Array], jax.Array]) -> EvaluationResult:
    """Embeds and scores every set with embed_fn (see embedding.compute_embeddings)."""
    embed = functools.partial(
        embedding.compute_embeddings,
        embed_fn,
        batch_size=self._batch_size,
        mesh=self._mesh,
        flip=self._flip,
    )
    scored = {}
    for name, data in self._sets.items():
      scores = verification_metrics.pair_scores(embed(data["image_a"]), embed(data["image_b"]))
      scored[name] = {
          "scores": scores,
          "is_same": np.asarray(data["is_same"]),
          "fold": np.asarray(data["fold"]),
      }
    metrics = {
        name: verification_metrics.verification_metrics_from_scores(
            part["scores"], part["is_same"], part["fold"], self._fars
        )
        for name, part in scored.items()
    }
    hetd_members = verification_metrics.HETD_MEMBERS
    if all(name in scored for name in hetd_members):
      hetd_parts = {name: scored[name] for name in hetd_members}
      scored[verification_metrics.HETD_NAME] = verification_metrics.pool_scores(hetd_parts)
      metrics[verification_metrics.HETD_NAME] = verification_metrics.hetd_metrics(
          hetd_parts, self._hetd_fars
      )
    curves = {
        name: verification_metrics.roc_curve(part["scores"], part["is_same"])[:2]
        for name, part in scored.items()
    }
    return EvaluationResult(metrics=metrics, curves=curves)
