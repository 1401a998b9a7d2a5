"""Two processes, one 8-device mesh: the training program runs multi-host through
jax.distributed (gloo collectives on CPU), each process feeding its own share of the data."""

import json
import os
import socket
import subprocess
import sys

from conftest import REPO_ROOT


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_process_training_agrees_and_checkpoints(tmp_path):
  port, workdir = str(_free_port()), tmp_path / "work"
  env = dict(os.environ, TFDS_DATA_DIR=str(tmp_path / "tfds"))
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen([sys.executable, str(REPO_ROOT / "tests" / "multihost_worker.py"),
                             str(i), port, str(workdir)], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  results = [json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])
             for out in outputs]
  assert [r["process"] for r in results] == [0, 1]
  assert all(r["devices"] == 8 and r["step"] == 6 for r in results)
  assert results[0]["metrics"] == results[1]["metrics"], "every process sees the same evaluation"
  assert (workdir / "checkpoints" / "6").is_dir()
  assert (workdir / "results.json").exists()
