"""Verification pairs drawn from labelled images, split into folds."""

import numpy as np


def make_pairs(
    identities: np.ndarray,
    *,
    num_folds: int = 10,
    num_impostor_pairs: int | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
  """Every genuine pair, and all or a seeded sample of the impostor pairs, in balanced folds.

  Genuine and impostor pairs are each shuffled with `seed` and dealt round-robin into the folds,
  so every fold holds the same mix; the result is ordered by fold (consecutive blocks, as in
  LFW) and, within a fold, genuine pairs first.

  Args:
    identities: [N] identity of each image (any comparable values).
    num_folds: number of folds.
    num_impostor_pairs: how many impostor pairs to sample without replacement; None keeps all.
    seed: seeds the sampling and the dealing.
  Returns:
    {'index_a', 'index_b': int64 [P] image indices with index_a < index_b, 'is_same': bool [P],
     'fold': int32 [P]}.
  """
  identities = np.asarray(identities)
  index_a, index_b = np.triu_indices(len(identities), k=1)
  same = identities[index_a] == identities[index_b]
  genuine, impostor = np.flatnonzero(same), np.flatnonzero(~same)
  if len(genuine) == 0 or len(impostor) == 0:
    raise ValueError(
        f"need two images of one identity and two identities for genuine and "
        f"impostor pairs; got {len(genuine)} genuine and {len(impostor)} "
        "impostor pairs"
    )
  rng = np.random.default_rng(seed)
  if num_impostor_pairs is not None:
    if not 0 < num_impostor_pairs <= len(impostor):
      raise ValueError(
          f"num_impostor_pairs must be in [1, {len(impostor)}], got {num_impostor_pairs}"
      )
    impostor = np.sort(rng.choice(impostor, num_impostor_pairs, replace=False))
  genuine, impostor = rng.permutation(genuine), rng.permutation(impostor)
  chosen = np.concatenate([genuine, impostor])
  fold = np.concatenate(
      [np.arange(len(genuine)) % num_folds, np.arange(len(impostor)) % num_folds]
  ).astype(np.int32)
  order = np.argsort(fold, kind="stable")
  chosen, fold = chosen[order], fold[order]
  return {
      "index_a": index_a[chosen],
      "index_b": index_b[chosen],
      "is_same": same[chosen],
      "fold": fold,
  }
