"""The CPU model name that benchmark figures are printed next to (lscpu's "Model name")."""

import platform
import subprocess


def cpu_model() -> str:
  try:
    return next(
        line.split(":", 1)[1].strip()
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        if line.startswith("Model name")
    )
  except (OSError, StopIteration):
    return platform.processor() or "unknown CPU"
