"""Two processes, one 8-device mesh: the training program runs multi-host through
jax.distributed (gloo collectives on CPU), each process feeding its own share of the data."""

import logging
import signal
import time

import pytest

from adam_face import report, train
from multihost_launch import start_workers, worker_results
from tiny_config import tiny_demo_config

# Two processes each compile and run the training program: minutes on 2 CPU cores.
pytestmark = [pytest.mark.multihost, pytest.mark.e2e, pytest.mark.slow]


@pytest.mark.faults
def test_two_process_training_agrees_checkpoints_and_resumes_as_one(tmp_path, caplog):
  procs, workdir = start_workers(tmp_path)
  results = worker_results(procs)
  assert [r["process"] for r in results] == [0, 1]
  assert all(r["devices"] == 8 and r["step"] == 6 for r in results)
  assert results[0]["metrics"] == results[1]["metrics"], "every process sees the same evaluation"
  assert (workdir / "checkpoints" / "6").is_dir()
  assert (workdir / "results.json").exists()

  # The checkpoint the two processes wrote restores, verified, into this one process (8 devices),
  # which trains on to a longer schedule (a changed config, which the resume reports).
  caplog.set_level(logging.WARNING)
  resumed = train.train_and_evaluate(tiny_demo_config(num_train_steps=8), str(workdir))
  assert resumed["step"] == 8
  assert "num_train_steps: 6 -> 8" in caplog.text
  assert not (workdir / "corrupt_checkpoints").exists()
  logged = report.read_train_log(str(workdir / report.TRAIN_LOG))
  assert [row["step"] for row in logged] == [4, 6, 8], "steps 1-6 in two processes, 7-8 in one"


def test_sigterm_to_one_process_stops_both_at_one_step(tmp_path):
  """A preemption notice that reaches only process 1 still stops both, at the same step, with one
  checkpoint of that step (JAX's preemption service; a lone stop would hang the other)."""
  procs, workdir = start_workers(tmp_path, "100000")
  checkpoints = workdir / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and all(p.poll() is None for p in procs):
    if checkpoints.exists() and any(p.name.isdigit() for p in checkpoints.iterdir()):
      break
    time.sleep(0.2)
  assert all(p.poll() is None for p in procs), "the workers ended before the signal"
  procs[1].send_signal(signal.SIGTERM)
  results = worker_results(procs)
  assert all(r["preempted"] for r in results)
  assert results[0]["step"] == results[1]["step"] < 100000
  assert (checkpoints / str(results[0]["step"])).is_dir()
