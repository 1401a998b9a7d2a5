"""The training command's flags: a mistyped --config field is one line naming the valid ones, and
an open dictionary (dataset.builder_kwargs) takes new keys from the command line."""

import os
import subprocess
import sys

import pytest

from adam_face import config_lib
from fixtures_data import REPO_ROOT

_ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu"}


def _python(*args):
  return subprocess.run(
      [sys.executable, *args], cwd=REPO_ROOT, env=_ENV, capture_output=True, text=True, timeout=300
  )


def test_a_mistyped_field_is_one_line_naming_the_valid_ones(tmp_path):
  run = _python(
      "-m",
      "adam_face.main",
      "--config=configs/demo.py",
      f"--workdir={tmp_path}",
      "--config.optimizer.learnin_rate=0.3",
  )
  assert run.returncode != 0
  assert run.stderr.strip().splitlines()[-1] == (
      "FATAL Flags parsing error: --config.optimizer.learnin_rate: config.optimizer has no field "
      "'learnin_rate'. Did you mean 'optimizer.learning_rate'? Valid fields: backbone_lr_scale, "
      "freeze_backbone_steps, grad_clip_norm, learning_rate, momentum, name, polynomial_power, "
      "schedule, step_boundaries, warmup_steps, weight_decay."
  )
  assert "Traceback" not in run.stderr
  assert not any(tmp_path.iterdir()), "nothing ran"


def test_builder_kwargs_take_new_keys_from_the_command_line():
  script = (
      "import sys\n"
      "from adam_face import main\n"
      "main.parse_flags(sys.argv)\n"
      "config = main.FLAGS.config\n"
      "print(sorted(config.dataset.builder_kwargs.items()), config.loss.s)\n"
  )
  run = _python(
      "-c",
      script,
      "--config=configs/demo.py",
      "--workdir=/unused",
      "--config.dataset.builder_kwargs.num_identities=40",
      "--config.dataset.builder_kwargs.image_size",
      "48",
      "--config.loss.s=16",
  )
  assert run.returncode == 0, run.stderr[-2000:]
  assert run.stdout.strip().splitlines()[-1] == "[('image_size', 48), ('num_identities', 40)] 16.0"


def test_overrides_are_checked_against_the_loaded_config():
  config = config_lib.load_config_file("configs/demo.py:curricularface")
  assert not config_lib.check_override(config, "loss.t_alpha")
  with pytest.raises(
      ValueError,
      match=r"config.loss has no field 'auto_margin'\. Valid fields: " r"kind, m, s, t_alpha\.",
  ):
    config_lib.check_override(config, "loss.auto_margin.target")
  with pytest.raises(ValueError, match=r"config.seed has no field 'x'\. Valid fields: \(none"):
    config_lib.check_override(config, "seed.x")
  assert config_lib.check_override(config, "dataset.builder_kwargs.new_key")
  assert config_lib.command_line_overrides(
      ["--config=c.py:a", "--config.x=1", "--config.y", "2", "--workdir=w"]
  ) == ("c.py:a", [("x", "1"), ("y", "2")])
