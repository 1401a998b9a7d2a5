"""What every benchmark shares: the CPU model name its figures are printed next to (lscpu's "Model
name") and its timer."""

import platform
import subprocess
import time


def cpu_model() -> str:
  try:
    return next(
        line.split(":", 1)[1].strip()
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        if line.startswith("Model name")
    )
  except (OSError, StopIteration):
    return platform.processor() or "unknown CPU"


def median_seconds(fn, steps: int, warm_up: bool = True) -> float:
  """The median wall time of `steps` calls of fn (after one untimed call that compiles or warms
  the library up, unless warm_up is False)."""
  if warm_up:
    fn()
  times = []
  for _ in range(steps):
    started = time.perf_counter()
    fn()
    times.append(time.perf_counter() - started)
  return sorted(times)[len(times) // 2]
