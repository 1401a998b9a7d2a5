"""End to end: the training program trains, checkpoints, survives a crash and a SIGTERM, resumes
to bit-identical parameters, evaluates, and refuses bad configs before compiling anything."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from adam_face import checkpointing, config_lib, errors, evaluate, report, train, train_input
import ijb_fixture
from fixtures_data import REPO_ROOT
from tiny_config import TINY_DATA, tiny_demo_config

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _params(workdir):
  return checkpointing.restore_arrays(workdir)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  results = train.train_and_evaluate(tiny_demo_config(), workdir)
  return workdir, results


def test_training_writes_results_table_and_roc(uninterrupted):
  workdir, results = uninterrupted
  assert results["step"] == 8
  saved = json.load(open(os.path.join(workdir, "results.json")))
  assert "synthetic" in saved["metrics"] and 0.0 <= saved["metrics"]["synthetic"]["accuracy"] <= 1
  assert saved["table"].splitlines()[1].startswith("synthetic")
  assert os.path.getsize(os.path.join(workdir, "roc.png")) > 1000
  assert os.path.getsize(os.path.join(workdir, "margin.png")) > 1000
  logged = report.read_train_log(os.path.join(workdir, "train_log.jsonl"))
  assert [row["step"] for row in logged] == [4, 8] and "margin" in logged[0]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
  step, state = _params(workdir)
  assert step == 8
  assert "acc_margin_ema" in state["margin_states"][0], "the auto-margin state is checkpointed"


def test_crash_then_resume_gives_identical_parameters(uninterrupted, tmp_path, monkeypatch):
  """A run that dies mid-training (as under SIGKILL) resumes from its last checkpoint and ends with
  exactly the parameters, optimiser state and auto-margin of an uninterrupted run."""
  reference_dir, _ = uninterrupted
  workdir = str(tmp_path)
  real_iterator = train_input.create_train_iterator

  def dies_after_five_batches(*args, **kwargs):
    iterator = real_iterator(*args, **kwargs)
    for _ in range(5):
      yield next(iterator)
    raise RuntimeError("simulated crash")

  monkeypatch.setattr(train_input, "create_train_iterator", dies_after_five_batches)
  with pytest.raises(RuntimeError, match="simulated crash"):
    train.train_and_evaluate(tiny_demo_config(), workdir)
  assert _params(workdir)[0] == 3, "the checkpoint of step 3 survives; steps 4-5 are lost"
  monkeypatch.setattr(train_input, "create_train_iterator", real_iterator)
  train.train_and_evaluate(tiny_demo_config(), workdir)

  best = json.load(open(os.path.join(workdir, "best.json")))
  assert set(best) == {"synthetic/accuracy"}, "best-so-far survives the restart"
  (step_a, a), (step_b, b) = _params(reference_dir), _params(workdir)
  assert step_a == step_b == 8
  flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def test_evaluate_command_scores_a_saved_checkpoint(uninterrupted):
  workdir, results = uninterrupted
  source, result = evaluate.evaluate_model(workdir)
  assert source.endswith(" step 8")
  assert result.metrics["synthetic"]["accuracy"] == pytest.approx(
      results["metrics"]["synthetic"]["accuracy"]
  )
  assert os.path.exists(os.path.join(workdir, "eval_8.json"))


def test_evaluate_command_scores_pair_and_ijb_sets_in_one_table(uninterrupted, tmp_path):
  workdir, results = uninterrupted
  root = ijb_fixture.write_ijbc(tmp_path / "ijb")
  _, result = evaluate.evaluate_model(
      workdir, sets=["synthetic", "ijbc"], ijb_root=str(root), ijb_cache=str(tmp_path / "cache")
  )
  assert result.metrics["synthetic"]["accuracy"] == pytest.approx(
      results["metrics"]["synthetic"]["accuracy"]
  )
  table = report.format_table(result.metrics).splitlines()
  assert [line.split()[0] for line in table] == [
      "set",
      "synthetic",
      "set",
      "ijbc",
      "set",
      "ijbc_1n",
  ]
  assert 0 <= result.metrics["ijbc"]["tar@far=1e-1"] <= 1
  assert set(result.curves) == {"synthetic", "ijbc"}
  with pytest.raises(errors.RunError, match="IJB sets are scored after training"):
    train.load_verification_sets(tiny_demo_config(), ["synthetic", "ijbc"])


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
  workdir = tmp_path / "preempted"
  cmd = [
      sys.executable,
      "-m",
      "adam_face.main",
      "--config=configs/demo.py",
      f"--workdir={workdir}",
      "--config.num_train_steps=100000",
      "--config.checkpoint_every_steps=2",
      "--config.dataset.image_size=32",
      "--config.global_batch_size=16",
      "--config.verification.batch_size=16",
      "--config.dataset.shuffle_buffer=64",
      f"--config.dataset.builder_kwargs={json.dumps(TINY_DATA)}",
  ]
  proc = subprocess.Popen(
      cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )
  deadline = time.time() + 300
  checkpoints = workdir / "checkpoints"
  while time.time() < deadline and proc.poll() is None:
    if checkpoints.exists() and any(p.name.isdigit() for p in checkpoints.iterdir()):
      break
    time.sleep(0.2)
  assert proc.poll() is None, proc.stdout.read()[-3000:]
  proc.send_signal(signal.SIGTERM)
  output, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, output[-3000:]
  assert "SIGTERM received" in output and "Stopped at step" in output
  steps = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  assert 0 < steps[-1] < 100000


def test_unknown_config_key_is_one_clear_line():
  config = tiny_demo_config()
  config.unlock()
  config.loss.mm = 0.3
  with pytest.raises(
      ValueError,
      match=r"^Unknown field config.loss.mm for kind='adm'. Did "
      r"you mean 'm'\? Valid fields: auto_margin, kind, m, s. "
      r"\(Each kind has its own fields: to switch kinds, .*"
      r"--config=configs/demo.py:curricularface.\)$",
  ):
    config_lib.validate_config(config)
  config = tiny_demo_config()
  config.loss.auto_margin.traget = 0.5
  with pytest.raises(
      ValueError, match=r"config.loss.auto_margin.traget .* Did you mean " r"'auto_margin.target'"
  ):
    config_lib.validate_config(config)


def test_batch_not_divisible_by_devices_fails_before_compiling(tmp_path):
  config = tiny_demo_config(global_batch_size=12)
  with pytest.raises(ValueError, match=r"global_batch_size=12 is not divisible by the 8 devices"):
    train.train_and_evaluate(config, str(tmp_path))


def test_missing_dataset_says_how_to_prepare_it(tmp_path):
  config = tiny_demo_config(**{"dataset.name": "casia_webface"})
  config.dataset.builder_kwargs = {}
  with pytest.raises(FileNotFoundError, match="train.rec"):
    train.train_and_evaluate(config, str(tmp_path))
