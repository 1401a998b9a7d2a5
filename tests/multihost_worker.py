"""One process of the two-process training run in test_multihost.py (not a test module itself).

Usage: python tests/multihost_worker.py PROCESS_ID PORT WORKDIR [NUM_TRAIN_STEPS | ijb=ROOT].
Each process owns 4 host-CPU devices; together they form one 8-device mesh through JAX's
distributed runtime (gloo collectives). With ijb=ROOT, instead of training, the two processes
score the IJB-C folder at ROOT (tests/ijb_fixture.py) with its toy model, caching the aligned
faces in WORKDIR (test_ijb.py).
"""

import json
import os
import sys

from host_devices import force_host_devices  # This script's folder, tests/, is on sys.path.

process_id, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
job = sys.argv[4] if len(sys.argv) > 4 else "6"
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

if job.startswith("ijb="):
  from adam_face import classifier, ijb  # noqa: E402  pylint: disable=g-import-not-at-top
  import ijb_fixture  # noqa: E402  pylint: disable=g-import-not-at-top

  evaluator = ijb.IJBEvaluator(
      ["ijbc"],
      ijb.IJBOptions(root=job.removeprefix("ijb="), cache_dir=workdir),
      image_size=ijb_fixture.EMBED_SIZE,
      batch_size=16,
      mesh=classifier.create_mesh(),
  )
  results = {"step": None, "metrics": evaluator(ijb_fixture.toy_embed_fn()[0]).metrics}
else:
  results = train.train_and_evaluate(tiny_demo_config(num_train_steps=int(job)), workdir)
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
