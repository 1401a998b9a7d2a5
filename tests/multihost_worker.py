"""One process of the two-process training run in test_multihost.py (not a test module itself).

Usage: python tests/multihost_worker.py PROCESS_ID PORT WORKDIR [NUM_TRAIN_STEPS]. Each process
owns 4 host-CPU devices; together they form one 8-device mesh through JAX's distributed runtime
(gloo collectives).
"""

import json
import os
import sys

from host_devices import force_host_devices  # This script's folder, tests/, is on sys.path.

process_id, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
num_train_steps = int(sys.argv[4]) if len(sys.argv) > 4 else 6
force_host_devices(4)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO_ROOT, os.path.join(REPO_ROOT, "tests")]

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(
    coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id
)

from adam_face import train  # noqa: E402
from tiny_config import tiny_demo_config  # noqa: E402

results = train.train_and_evaluate(tiny_demo_config(num_train_steps=num_train_steps), workdir)
print(
    "RESULT "
    + json.dumps(
        {
            "process": jax.process_index(),
            "devices": jax.device_count(),
            "step": results["step"],
            "metrics": results.get("metrics"),
            "preempted": results.get("preempted", False),
        },
        default=train.json_default,
    ),
    flush=True,
)
