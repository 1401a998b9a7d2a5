"""What every benchmark shares: the CPU model name its figures are printed next to (lscpu's "Model
name"), its timer, and its workers in subprocesses."""

import json
import os
import platform
import subprocess
import sys
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


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_worker(
    module: str,
    args: list[str],
    xla_flags: str | None = "",
    environment: dict[str, str] | None = None,
    platform_name: str | None = "cpu",
) -> tuple[object, str | None]:
  """Runs `python -m MODULE --worker ARGS` from the repository root, with XLA_FLAGS set to
  xla_flags (None: this process's), JAX_PLATFORMS to platform_name (None: this process's; a
  worker that picks its own device, e.g. a GPU) and the variables of `environment` set.

  A process per measurement: XLA reads its flags once, when jax starts, and a process's peak
  memory is then the measurement's own.

  Returns:
    (the JSON value the worker printed on its last line, None), or (None, why it failed: the
    last line of its error output, or that it was killed).
  """
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  if xla_flags is not None:
    env["XLA_FLAGS"] = xla_flags
  if platform_name is not None:
    env["JAX_PLATFORMS"] = platform_name
  env.update(environment or {})
  done = subprocess.run(
      [sys.executable, "-m", module, "--worker", *args],
      env=env,
      cwd=REPO,
      capture_output=True,
      text=True,
      check=False,
  )
  if done.returncode in (-9, 137):
    return None, "killed by SIGKILL (the kernel's out-of-memory killer, most likely)"
  if done.returncode:
    return None, (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
  return json.loads(done.stdout.strip().splitlines()[-1]), None
