"""Reports of verification metrics: flat scalars for logging, the paper-style table, ROC plots."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np


def flatten_metrics(metrics: Mapping[str, Mapping]) -> dict[str, float]:
  """{'lfw/accuracy': ..., 'lfw/tar@far=1e-3': ...}: every scalar entry of every set."""
  return {
      f"{name}/{key}": float(value)
      for name, set_metrics in metrics.items()
      for key, value in set_metrics.items()
      if np.ndim(value) == 0
  }


def format_table(metrics: Mapping[str, Mapping]) -> str:
  """One row per set, in percent with two decimals, as papers report them.

  Pair sets: 'acc / TAR@FAR=...'; sets without an accuracy (IJB 1:1): 'TAR@FAR=...'; 1:N
  identification: 'rank-k / ... / TPIR@FPIR=...'. A header line precedes each run of rows sharing
  the same columns.
  """
  width = max(len(name) for name in metrics)
  lines, previous_header = [], None
  for name, set_metrics in metrics.items():
    header, keys = _columns(set_metrics)
    if header != previous_header:
      lines.append(f"{'set':<{width}}  {header}")
      previous_header = header
    lines.append(f"{name:<{width}}  " + " / ".join(f"{100 * set_metrics[k]:.2f}" for k in keys))
  return "\n".join(lines)


def _columns(set_metrics: Mapping) -> tuple[str, list[str]]:
  """(header, metric keys) of a set's row in format_table."""
  parts, keys = [], []
  if "accuracy" in set_metrics:
    parts.append("acc")
    keys.append("accuracy")
  ranks = [key for key in set_metrics if key.startswith("rank-")]
  parts += ranks
  keys += ranks
  for prefix, title in (("tar@far=", "TAR@FAR="), ("tpir@fpir=", "TPIR@FPIR=")):
    rates = [key.removeprefix(prefix) for key in set_metrics if key.startswith(prefix)]
    if rates:
      parts.append(title + " / ".join(rates))
      keys += [prefix + rate for rate in rates]
  return " / ".join(parts), keys


# Points of a ROC curve worth drawing: more are invisible at the figure's resolution.
_ROC_PLOT_POINTS = 4000


def thinned_roc(far: np.ndarray, tar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The ROC (FAR ascending) cut to at most about _ROC_PLOT_POINTS points for plotting, evenly
  spaced in log FAR and in TAR, keeping both ends: IJB-C's 15.7 million pairs draw the same."""
  far, tar = np.asarray(far), np.asarray(tar)
  if len(far) <= _ROC_PLOT_POINTS:
    return far, tar
  positive = far[far > 0]
  if positive.size:
    log_grid = np.geomspace(positive.min(), 1.0, _ROC_PLOT_POINTS // 2)
  else:
    log_grid = np.zeros(0)
  picks = np.searchsorted(far, log_grid, side="right") - 1
  picks = np.concatenate(
      [
          [0, len(far) - 1],
          picks,
          np.searchsorted(tar, np.linspace(0, 1, _ROC_PLOT_POINTS // 2)).clip(0, len(far) - 1),
      ]
  )
  picks = np.unique(picks)
  return far[picks], tar[picks]


def plot_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str) -> None:
  """Writes one PNG with the ROC (TAR against log-scale FAR) of every set."""
  # The object-oriented API renders with Agg without touching pyplot's global backend state.
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  figure = Figure(figsize=(6, 4.5), dpi=120)
  axes = figure.subplots()
  smallest_far = 1.0
  for name, (far, tar) in curves.items():
    far, tar = np.asarray(far), np.asarray(tar)
    shown = far > 0  # FAR = 0 has no place on a log axis.
    axes.plot(far[shown], tar[shown], label=name, linewidth=1.2)
    if shown.any():
      smallest_far = min(smallest_far, float(far[shown].min()))
  axes.set_xscale("log")
  axes.set_xlim(smallest_far, 1.0)
  axes.set_xlabel("false accept rate")
  axes.set_ylabel("true accept rate")
  axes.grid(True, which="both", alpha=0.3)
  axes.legend(loc="lower right")
  figure.tight_layout()
  figure.savefig(path, format="png")


# The training scalars of every logged step, one JSON row each, in the workdir (train.py writes it).
TRAIN_LOG = "train_log.jsonl"


def read_train_log(path: str) -> list[dict[str, float]]:
  """The rows of a workdir's train_log.jsonl, one per logged step, in step order.

  A resumed run logs again the steps between its last checkpoint and the crash; the latest row of
  each step wins.
  """
  rows = {}
  with open(path) as f:
    for line in f:
      if line.strip():
        row = json.loads(line)
        rows[row["step"]] = row
  return [rows[step] for step in sorted(rows)]


def plot_margin_trajectory(rows: Sequence[Mapping[str, float]], path: str) -> None:
  """Writes one PNG: the margin (left axis) and acc_margin (right axis) against the step, for the
  whole batch and, with several datasets, per dataset ('<dataset>/margin')."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  steps = [row["step"] for row in rows]
  prefixes = sorted(
      {
          key[: -len("margin")]
          for row in rows
          for key in row
          if key.endswith("margin") and not key.endswith("acc_margin")
      }
  )
  figure = Figure(figsize=(7, 4.5), dpi=120)
  margin_axes = figure.subplots()
  acc_axes = margin_axes.twinx()
  for prefix in prefixes:
    label = prefix.rstrip("/") or "batch"
    margin_axes.plot(
        steps,
        [row.get(prefix + "margin", np.nan) for row in rows],
        label=f"{label} margin",
        linewidth=1.4,
    )
    acc_axes.plot(
        steps,
        [row.get(prefix + "acc_margin", np.nan) for row in rows],
        "--",
        label=f"{label} acc_margin",
        linewidth=1.0,
    )
  margin_axes.set_xlabel("step")
  margin_axes.set_ylabel("margin m (solid)")
  acc_axes.set_ylabel("acc_margin (dashed)")
  acc_axes.set_ylim(0.0, 1.0)
  margin_axes.grid(True, alpha=0.3)
  handles = margin_axes.get_legend_handles_labels()
  more = acc_axes.get_legend_handles_labels()
  margin_axes.legend(handles[0] + more[0], handles[1] + more[1], loc="upper left", fontsize=8)
  figure.tight_layout()
  figure.savefig(path, format="png")
