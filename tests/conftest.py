"""Test-wide set-up.

Eight host-CPU devices are forced before jax is imported anywhere, so every sharding code path
(the class-sharded head, the data-parallel backbone) runs on a real 8-device mesh in CI without
accelerators. TFDS is pointed at a per-session temporary folder so that no test reads or writes a
user's ~/tensorflow_datasets, and nothing may reach GCS; so is JAX's compilation cache.
"""

import atexit
import os
import pathlib
import shutil
import tempfile

from host_devices import force_host_devices

# TFDS reads TFDS_DATA_DIR once, when it is first imported (by test modules, before any fixture).
os.environ["TFDS_DATA_DIR"] = tempfile.mkdtemp(prefix="adam_face_tfds_")
atexit.register(shutil.rmtree, os.environ["TFDS_DATA_DIR"], ignore_errors=True)
# The tests' programs are tiny and each compiles once: XLA:CPU's expensive LLVM passes cost more
# compile time (a third of a tiny training run) than they save in run time. Subprocess workers
# inherit these flags and replace only the device count (host_devices.force_host_devices).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
).strip()
force_host_devices(8)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One compilation cache for the session, shared with the training subprocesses (they inherit the
# environment): the end-to-end and fault tests train the same tiny program many times, and a
# cache hit skips its compilation (most of each run's time on 2 cores).
os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="adam_face_jax_cache_")
atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import pytest  # noqa: E402

from fixtures_data import REPO_ROOT, SMALL_SYNTHETIC  # noqa: E402


@pytest.fixture(scope="session")
def orl_dir():
  """The ORL faces beside the checkout (or $ADAM_FACE_ORL_DIR); skips where absent."""
  path = pathlib.Path(
      os.environ.get("ADAM_FACE_ORL_DIR", REPO_ROOT.parent / "shared" / "data" / "orl_faces")
  )
  if not (path / "s1" / "1.pgm").exists():
    pytest.skip(f"ORL faces not found at {path} (set ADAM_FACE_ORL_DIR)")
  return path


@pytest.fixture(scope="session")
def lfw_dev_dir():
  """The aligned LFW dev data beside the checkout (or $ADAM_FACE_LFW_DEV_DIR); skips where
  absent. It is read in place, never copied into the repository."""
  path = pathlib.Path(
      os.environ.get("ADAM_FACE_LFW_DEV_DIR", REPO_ROOT.parent / "shared" / "data" / "lfw_dev")
  )
  if not (path / "dev.bin").exists() or not (path / "train").is_dir():
    pytest.skip(f"lfw_dev data not found at {path} (set ADAM_FACE_LFW_DEV_DIR)")
  return path


@pytest.fixture(scope="session")
def mesh8():
  """The training program's one-axis mesh (classifier.create_mesh) over the 8 forced devices."""
  # Imported on first use, not at the top: a broken adam_face module then fails only the tests
  # that need the mesh instead of the collection of every test.
  import jax  # pylint: disable=g-import-not-at-top
  from adam_face import classifier  # pylint: disable=g-import-not-at-top

  assert jax.device_count() == 8, "XLA_FLAGS above forces 8 host devices"
  return classifier.create_mesh()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def synthetic_config(data_dir):
  """A module's own small synthetic_faces build (SMALL_SYNTHETIC): 20 training images of 5
  identities at 20x20, read at 16x16 (so resizing is exercised)."""
  from adam_face import config_lib, data_builders  # pylint: disable=g-import-not-at-top

  config = config_lib.default_dataset_config(
      data_dir=data_dir, image_size=16, shuffle_buffer=8, builder_kwargs=SMALL_SYNTHETIC
  )
  data_builders.dataset_info(config)  # Prepares it once for the module.
  return config


def pytest_collection_modifyitems(config, items):
  """Test files holding a `slow` test run first (each file keeps its own order).

  `./run.sh test` hands whole files to 2 workers in collection order; a long file collected last
  would leave one worker idle while the other finishes it.
  """
  del config
  slow_files = {item.path for item in items if item.get_closest_marker("slow")}
  items.sort(key=lambda item: item.path not in slow_files)
