"""Two processes, one 8-device mesh: the training program runs multi-host through
jax.distributed (gloo collectives on CPU), each process feeding its own share of the data."""

import json
import os
import socket
import signal
import subprocess
import sys
import time

import pytest

from fixtures_data import REPO_ROOT

# Two processes each compile and run the training program: minutes on 2 CPU cores.
pytestmark = [pytest.mark.multihost, pytest.mark.e2e, pytest.mark.slow]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start_workers(tmp_path, *args):
  port, workdir = str(_free_port()), tmp_path / "work"
  env = dict(os.environ, TFDS_DATA_DIR=str(tmp_path / "tfds"))
  env.pop("XLA_FLAGS", None)
  procs = [
      subprocess.Popen(
          [
              sys.executable,
              str(REPO_ROOT / "tests" / "multihost_worker.py"),
              str(i),
              port,
              str(workdir),
              *args,
          ],
          cwd=REPO_ROOT,
          env=env,
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
      )
      for i in range(2)
  ]
  return procs, workdir


def _results(procs):
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  return [
      json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])
      for out in outputs
  ]


def test_two_process_training_agrees_and_checkpoints(tmp_path):
  procs, workdir = _start_workers(tmp_path)
  results = _results(procs)
  assert [r["process"] for r in results] == [0, 1]
  assert all(r["devices"] == 8 and r["step"] == 6 for r in results)
  assert results[0]["metrics"] == results[1]["metrics"], "every process sees the same evaluation"
  assert (workdir / "checkpoints" / "6").is_dir()
  assert (workdir / "results.json").exists()


def test_sigterm_to_one_process_stops_both_at_one_step(tmp_path):
  """A preemption notice that reaches only process 1 still stops both, at the same step, with one
  checkpoint of that step (JAX's preemption service; a lone stop would hang the other)."""
  procs, workdir = _start_workers(tmp_path, "100000")
  checkpoints = workdir / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and all(p.poll() is None for p in procs):
    if checkpoints.exists() and any(p.name.isdigit() for p in checkpoints.iterdir()):
      break
    time.sleep(0.2)
  assert all(p.poll() is None for p in procs), "the workers ended before the signal"
  procs[1].send_signal(signal.SIGTERM)
  results = _results(procs)
  assert all(r["preempted"] for r in results)
  assert results[0]["step"] == results[1]["step"] < 100000
  assert (checkpoints / str(results[0]["step"])).is_dir()
