"""Benchmark: every margin loss on real faces, same backbone and budget, several seeds.

Trains each row of configs/lfw_dev.py (normface, cosface, arcface at s=64 and s=30, sphereface,
adm at s=30 and s=64, ADAM = adm with auto-margin, and the modern kinds) on the LFW people of
../shared/data/lfw_dev/train, verifies on the LFW dev fold (600 pairs of people not in train), and
prints one table: dev accuracy, TAR@FAR=1e-1 and 1e-2, AUC and the final margin, each as the mean
and standard deviation over the seeds, plus the seconds a run took. An `untrained` row scores the
initial network of each seed, so that what training adds is visible.

  python -m benchmarks.real_faces                       # the whole table on a CPU (about an hour)
  python -m benchmarks.real_faces --rows adam,arcface_s64 --seeds 0
  python -m benchmarks.real_faces --preset gpu          # iresnet50 at 112x112, batch 512

Each run writes its workdir under --workdir (default /tmp/adam_face_real_faces/<row>/seed<k>),
with train_log.jsonl, margin.png and roc.png; the table goes to stdout and, with --out, to a
Markdown file and a JSON file of every run's figures. Runs are in-process and share JAX's
persistent compilation cache, so the seeds of one row compile once.
"""

import argparse
import json
import os
import shutil
import time

import jax
import numpy as np

from adam_face import host_memory
from benchmarks import machine as machine_lib

# Presets: fields of configs/lfw_dev.py's config to override. "cpu" is the config as it is (the
# budget benchmarks/README.md's table was measured with); "gpu" scales the same comparison to an
# accelerator.
PRESETS = {
    "cpu": {},
    "gpu": {
        "dataset.image_size": 112,
        "model.name": "iresnet50",
        "model.embedding_dim": 512,
        "global_batch_size": 512,
        "num_train_steps": 3_000,
        "compute_dtype": "bfloat16",
        "verification.eval_every_steps": 1_000,
    },
}


def run_config(row, seed, overrides):
  from adam_face import config_lib  # pylint: disable=g-import-not-at-top
  from configs import lfw_dev  # pylint: disable=g-import-not-at-top

  config = lfw_dev.get_config(row)
  config.seed = seed
  for path, value in overrides.items():
    config_lib.set_field(config, path, value)
  config.verification.eval_every_steps = config.num_train_steps  # Only the final evaluation.
  config.checkpoint_every_steps = config.num_train_steps
  return config


def train_row(row, seed, overrides, workdir):
  """Trains one (row, seed); returns its figures."""
  from adam_face import report, train  # pylint: disable=g-import-not-at-top

  config = run_config(row, seed, overrides)
  start = time.perf_counter()
  results = train.train_and_evaluate(config, workdir)
  seconds = time.perf_counter() - start
  (dev,) = results["metrics"].values()
  log = report.read_train_log(os.path.join(workdir, report.TRAIN_LOG))
  return {
      "row": row,
      "seed": seed,
      "accuracy": dev["accuracy"],
      "tar@far=1e-1": dev["tar@far=1e-1"],
      "tar@far=1e-2": dev["tar@far=1e-2"],
      "auc": dev["auc"],
      "final_margin": log[-1].get("margin", float("nan")),
      "final_acc_margin": log[-1]["acc_margin"],
      "seconds": seconds,
  }


def untrained_row(seed, overrides):
  """The initial network of `seed` (the same initialisation every row starts from), scored."""
  from adam_face import classifier, models, train, train_step, verification  # pylint: disable=g-import-not-at-top

  config = run_config("adam", seed, overrides)
  mesh = classifier.create_mesh()
  model = models.create_model(config.model.name, embedding_dim=config.model.embedding_dim)
  state, _ = train_step.create_train_state(config, model, mesh, (4,), 1)
  sets = train.load_verification_sets(config)
  result = verification.Evaluator(
      sets, batch_size=config.verification.batch_size, mesh=mesh, flip=config.verification.flip
  )(train_step.embed_fn_for(state))
  (dev,) = result.metrics.values()
  return {
      "row": "untrained",
      "seed": seed,
      "accuracy": dev["accuracy"],
      "tar@far=1e-1": dev["tar@far=1e-1"],
      "tar@far=1e-2": dev["tar@far=1e-2"],
      "auc": dev["auc"],
      "final_margin": float("nan"),
      "final_acc_margin": float("nan"),
      "seconds": 0.0,
  }


def summarise(runs, rows):
  """Markdown table: mean +- std over seeds of each row's figures."""
  lines = [
      "| row | accuracy % | TAR@FAR=1e-1 % | TAR@FAR=1e-2 % | AUC | final m | s / run |",
      "|---|---|---|---|---|---|---|",
  ]
  for row in rows:
    mine = [r for r in runs if r["row"] == row]
    if not mine:
      continue

    def stat(key, scale=100.0, digits=2):
      values = np.array([r[key] for r in mine], np.float64) * scale
      if np.all(np.isnan(values)):
        return "-"
      std = values.std(ddof=1) if len(values) > 1 else 0.0
      return f"{values.mean():.{digits}f} ± {std:.{digits}f}"

    lines.append(
        f"| {row} | {stat('accuracy')} | {stat('tar@far=1e-1')} | "
        f"{stat('tar@far=1e-2')} | {stat('auc', 1.0, 4)} | "
        f"{stat('final_margin', 1.0, 3)} | {stat('seconds', 1.0, 0)} |"
    )
  return "\n".join(lines)


def machine():
  return f"{machine_lib.cpu_model()}, {os.cpu_count()} cores, JAX {jax.__version__} on {jax.devices()[0].platform}"


def main():
  from configs import lfw_dev  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
      "--rows",
      default=",".join(lfw_dev.ROWS),
      help=f"comma-separated rows of configs/lfw_dev.py ({', '.join(lfw_dev.ROWS)})",
  )
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
  parser.add_argument("--steps", type=int, default=None, help="override the preset's steps")
  parser.add_argument("--workdir", default="/tmp/adam_face_real_faces")
  parser.add_argument("--out", default=None, help="write <out>.md and <out>.json")
  args = parser.parse_args()

  rows = [r for r in args.rows.split(",") if r]
  unknown = [r for r in rows if r not in lfw_dev.ROWS]
  if unknown:
    parser.error(f"unknown rows {unknown}; rows: {', '.join(lfw_dev.ROWS)}")
  if not (lfw_dev.LFW_DEV_DIR / "dev.bin").exists():
    parser.error(
        f"{lfw_dev.LFW_DEV_DIR}/dev.bin not found: put the lfw_dev data at "
        "../shared/data/lfw_dev beside the checkout or set $ADAM_FACE_LFW_DEV_DIR."
    )
  seeds = [int(s) for s in args.seeds.split(",")]
  overrides = dict(PRESETS[args.preset])
  if args.steps:
    overrides["num_train_steps"] = args.steps
  jax.config.update("jax_compilation_cache_dir", os.path.join(args.workdir, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

  started = time.perf_counter()
  runs = [untrained_row(seed, overrides) for seed in seeds]
  for row in rows:
    for seed in seeds:
      workdir = os.path.join(args.workdir, row, f"seed{seed}")
      shutil.rmtree(workdir, ignore_errors=True)  # A fresh run each time, timed whole.
      runs.append(train_row(row, seed, overrides, workdir))
      print(json.dumps(runs[-1]), flush=True)
  table = summarise(runs, ["untrained"] + rows)
  header = (
      f"preset {args.preset} ({overrides}), seeds {seeds}, "
      f"{time.perf_counter() - started:.0f} s in all, on {machine()}"
  )
  print(header)
  print(table)
  if args.out:
    with open(args.out + ".md", "w") as f:
      f.write(header + "\n\n" + table + "\n")
    with open(args.out + ".json", "w") as f:
      json.dump({"header": header, "runs": runs}, f, indent=2)


if __name__ == "__main__":
  host_memory.restart_with_huge_pages()  # Trains as adam_face.main does.
  main()
