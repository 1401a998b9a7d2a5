"""Starting and reading the two processes of tests/multihost_worker.py (test_multihost.py,
test_faults.py)."""

import json
import os
import socket
import subprocess
import sys

from fixtures_data import REPO_ROOT


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start_workers(tmp_path, *args):
  """Starts the two processes of multihost_worker.py (args follow its usage); (procs, workdir)."""
  port, workdir = str(free_port()), tmp_path / "work"
  env = dict(os.environ, TFDS_DATA_DIR=str(tmp_path / "tfds"))
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


def worker_results(procs):
  """Waits for the workers; each one's RESULT line, after checking it exited with status 0."""
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  return [
      json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])
      for out in outputs
  ]
