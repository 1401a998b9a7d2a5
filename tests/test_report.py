"""Tests of adam_face.report: flat scalars, the paper-style table and the ROC plot of metrics."""

import json

import pytest
from PIL import Image

from adam_face import report
from adam_face import verification_metrics
import toy_embeddings


@pytest.fixture(scope="module")
def planted():
  """(metrics, curves) of three planted sets and their HETD pool, as an Evaluator returns them."""
  parts = toy_embeddings.planted_hetd_scores()
  metrics = {
      name: verification_metrics.verification_metrics_from_scores(
          part["scores"], part["is_same"], part["fold"]
      )
      for name, part in parts.items()
  }
  metrics["hetd"] = verification_metrics.hetd_metrics(parts)
  parts["hetd"] = verification_metrics.pool_scores(parts)
  curves = {
      name: verification_metrics.roc_curve(part["scores"], part["is_same"])[:2]
      for name, part in parts.items()
  }
  return metrics, curves


def test_flatten_metrics_keeps_every_scalar_and_no_array(planted):
  metrics, _ = planted
  scalars = report.flatten_metrics(metrics)
  assert scalars["lfw/accuracy"] == metrics["lfw"]["accuracy"]
  assert scalars["hetd/num_genuine"] == 95
  assert "hetd/tar@far=3e-4" in scalars and "lfw/tar@far=3e-3" in scalars
  assert all(isinstance(value, float) for value in scalars.values())
  assert not any(key.endswith(("fold_accuracy", "fold_threshold")) for key in scalars)


def test_table_rows_in_percent_with_a_header_per_set_of_fars(planted):
  metrics, _ = planted
  table = report.format_table(metrics).splitlines()
  assert len(table) == 6
  assert table[0] == "set       acc / TAR@FAR=1e-1 / 1e-2 / 3e-3 / 1e-3"
  assert table[4] == "set       acc / TAR@FAR=1e-1 / 1e-2 / 1e-3 / 3e-4"
  m = metrics["lfw"]
  assert table[1] == "lfw       " + " / ".join(
      f"{100 * m[key]:.2f}"
      for key in ("accuracy", "tar@far=1e-1", "tar@far=1e-2", "tar@far=3e-3", "tar@far=1e-3")
  )
  assert table[5].startswith("hetd      ")


def test_plot_roc_writes_a_png(planted, tmp_path):
  _, curves = planted
  path = tmp_path / "roc.png"
  report.plot_roc(curves, str(path))
  with Image.open(path) as png:
    assert png.format == "PNG" and png.size[0] > 100


def test_train_log_keeps_the_latest_row_of_each_step_and_plots_the_margin(tmp_path):
  log = tmp_path / "train_log.jsonl"
  rows = [
      {"step": 50, "margin": 0.3, "acc_margin": 0.1},
      {"step": 100, "margin": 0.3, "acc_margin": 0.4},
      # A resumed run logs step 100 again (after restoring the step-50 checkpoint).
      {"step": 100, "margin": 0.3, "acc_margin": 0.5},
      {"step": 150, "margin": 0.32, "acc_margin": 0.7},
  ]
  log.write_text("".join(json.dumps(row) + "\n" for row in rows))
  history = report.read_train_log(str(log))
  assert [row["step"] for row in history] == [50, 100, 150]
  assert history[1]["acc_margin"] == 0.5
  path = tmp_path / "margin.png"
  report.plot_margin_trajectory(history, str(path))
  assert Image.open(path).size[0] > 500
