"""Host-CPU devices for the test session and its worker processes, set before jax is imported, and
an array sharded over them as the train step's batch is."""

import os


def force_host_devices(count: int) -> None:
  """`count` host-CPU devices on the CPU platform; any other XLA flags already set (those of
  tests/conftest.py, inherited by worker processes) stay."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
  os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={count}"])
  os.environ["JAX_PLATFORMS"] = "cpu"


def batch_sharded(x):
  """x with its leading (batch) axis sharded over every device, as the train step's batch is."""
  import jax  # pylint: disable=g-import-not-at-top  # Not at import: conftest imports this first.
  import numpy as np  # pylint: disable=g-import-not-at-top

  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  return jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
