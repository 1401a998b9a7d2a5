"""Test-wide set-up.

Eight host-CPU devices are forced before jax is imported anywhere, so every sharding code path
(the class-sharded head, the data-parallel backbone) runs on a real 8-device mesh in CI without
accelerators. TFDS is pointed at a per-session temporary folder so that no test reads or writes a
user's ~/tensorflow_datasets, and nothing may reach GCS.
"""

import atexit
import os
import pathlib
import shutil
import tempfile

# TFDS reads TFDS_DATA_DIR once, when it is first imported (by test modules, before any fixture).
os.environ["TFDS_DATA_DIR"] = tempfile.mkdtemp(prefix="adam_face_tfds_")
atexit.register(shutil.rmtree, os.environ["TFDS_DATA_DIR"], ignore_errors=True)
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["JAX_PLATFORMS"] = "cpu"

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def orl_dir():
  """The ORL faces beside the checkout (or $ADAM_FACE_ORL_DIR); skips where absent."""
  path = pathlib.Path(
    os.environ.get("ADAM_FACE_ORL_DIR", REPO_ROOT.parent / "shared" / "data" / "orl_faces")
  )
  if not (path / "s1" / "1.pgm").exists():
    pytest.skip(f"ORL faces not found at {path} (set ADAM_FACE_ORL_DIR)")
  return path
