"""What transparent huge pages do for adam_face's CPU train step (adam_face/host_memory.py).

bench_train_step's adam_face step (train_step.train_step jitted as train.py jits it, on one random
batch already on the device) runs in fresh processes under GLIBC_TUNABLES=glibc.malloc.hugetlb=0
(glibc's default) and =1 (what adam_face.main sets), --rounds times each, in alternating order. Each
process compiles, takes 3 untimed steps, then times --steps steps and counts the minor page faults
and the system CPU time they cost (getrusage). Printed per model and setting: the compiled step's
temporaries (XLA's memory analysis: one block that every execution allocates and frees), the
median over the rounds of ms a step, page faults a step and system CPU seconds a step, and the
step time's ratio.

  python -m benchmarks.bench_huge_pages                      # tiny, mobilefacenet: ~3 min, 2 cores
  python -m benchmarks.bench_huge_pages --models=iresnet18 --rounds=1
"""

import argparse
import json
import os
import resource
import statistics
import time

import jax

from adam_face import host_memory
from benchmarks import bench_train_step
from benchmarks import machine

SETTINGS = {"4 KiB pages": "glibc.malloc.hugetlb=0", "huge pages": "glibc.malloc.hugetlb=1"}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default="tiny,mobilefacenet", type=lambda s: s.split(","))
  parser.add_argument("--steps", type=int, default=10, help="timed steps per process")
  parser.add_argument("--rounds", type=int, default=2, help="processes per model and setting")
  parser.add_argument("--worker", nargs=2, metavar=("MODEL", "STEPS"), help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def measure(model: str, steps: int) -> dict[str, float]:
  """The compiled step's temporaries (MiB, allocated and freed by every execution), and ms, minor
  page faults and system CPU seconds a step."""
  step = bench_train_step.AdamFaceStep(bench_train_step.train_config(model), num_classes=1000)
  step.compile()
  step.run(3)
  before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  step.run(steps)
  seconds, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
  return {
      "temp_mb": step.step_fn.memory_analysis().temp_size_in_bytes / 2**20,
      "ms": seconds / steps * 1e3,
      "faults": (after.ru_minflt - before.ru_minflt) / steps,
      "system_s": (after.ru_stime - before.ru_stime) / steps,
  }


def main(argv=None):
  args = parse_args(argv)
  if args.worker:
    model, steps = args.worker
    print(json.dumps(measure(model, int(steps))))
    return
  thp_mode = (host_memory.system_facts()[1] or "unknown").strip()
  print(
      f"{machine.cpu_model()}, jax {jax.__version__}, {args.rounds} process(es) per setting, "
      f"{args.steps} timed steps each; transparent huge pages: {thp_mode}",
      flush=True,
  )
  header = (
      f"{'model':<14}{'setting':<13}{'temp MiB':>9}{'ms/step':>9}{'faults/step':>13}"
      f"{'system s/step':>15}{'speed-up':>10}"
  )
  print(header)
  print("-" * len(header))
  for model in args.models:
    results = {name: [] for name in SETTINGS}
    for round_index in range(args.rounds):
      order = list(SETTINGS.items())[:: -1 if round_index % 2 else 1]  # Each first equally often.
      for name, tunable in order:
        result, error = machine.run_worker(
            "benchmarks.bench_huge_pages",
            [model, str(args.steps)],
            xla_flags=os.environ.get("XLA_FLAGS", ""),
            environment={"GLIBC_TUNABLES": tunable},
        )
        if error:
          raise SystemExit(f"{model} under {tunable} failed: {error}")
        results[name].append(result)
    medians = {
        name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        for name, runs in results.items()
    }
    base = medians["4 KiB pages"]["ms"]
    for name, m in medians.items():
      print(
          f"{model:<14}{name:<13}{m['temp_mb']:>9.0f}{m['ms']:>9.1f}{m['faults']:>13,.0f}"
          f"{m['system_s']:>15.3f}{base / m['ms']:>9.2f}x",
          flush=True,
      )


if __name__ == "__main__":
  main()
