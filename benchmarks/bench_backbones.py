"""Backbone cost and speed: parameters, MACs, XLA FLOPs and training throughput.

For every model in --models: trainable parameters (the 'params' collection; BatchNorm running
statistics are listed separately), multiply-accumulates of one forward pass at --image-size
counted from the traced program (adam_face.models.count_macs, the ptflops convention of the
published figures), and XLA's FLOPs from `jax.jit(forward).lower(x).compile().cost_analysis()`
at batch 1, compiled for the CPU on any backend. XLA skips kernel taps that fall on padding (a
large share of a 3x3 window on a 7x7 map) and counts elementwise work, so its FLOPs differ from
2 x MACs by several percent: below for the iResNets, above for MobileFaceNet, whose
convolutions are cheap.

For every model in --timed: images/s of a jitted forward+backward step (gradients of a scalar
loss of the embeddings with respect to the parameters, train-mode BatchNorm) after a warm-up,
on JAX's default device (one device; CPU here). The defaults take ~4 minutes on 2 busy cores.

  python -m benchmarks.bench_backbones --out /tmp/bench_backbones.json   # from the repo root
"""

import argparse
import json
import math
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from adam_face.models import MODEL_NAMES, count_macs, create_model


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
      "--models",
      nargs="+",
      default=list(MODEL_NAMES),
      choices=MODEL_NAMES,
      help="models whose parameters, MACs and FLOPs are reported",
  )
  parser.add_argument(
      "--timed",
      nargs="*",
      default=["tiny", "mobilefacenet", "iresnet18"],
      choices=MODEL_NAMES,
      help="models whose training throughput is measured",
  )
  parser.add_argument("--image-size", type=int, default=112)
  parser.add_argument(
      "--embedding-dim",
      type=int,
      default=512,
      help="embedding size (Chen et al. report MobileFaceNet at 128)",
  )
  parser.add_argument("--batch-size", type=int, default=16, help="batch of the timed steps")
  parser.add_argument("--warmup-steps", type=int, default=2)
  parser.add_argument("--timed-steps", type=int, default=5)
  parser.add_argument(
      "--dtype",
      choices=("float32", "bfloat16"),
      default="float32",
      help="compute dtype of the timed steps",
  )
  parser.add_argument("--out", default="/tmp/bench_backbones.json")
  return parser.parse_args()


def count(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def cost(name: str, args) -> dict:
  """Parameters, MACs and XLA FLOPs of one batch-1 forward pass; nothing is allocated.

  The FLOPs always come from a compilation for the CPU: XLA:GPU hands convolutions to cuDNN as
  custom calls, which its cost analysis does not count (an H200 run reported 0.075 GFLOPs for
  iresnet50).
  """
  model = create_model(name, embedding_dim=args.embedding_dim)
  on_cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  images = jax.ShapeDtypeStruct(
      (1, args.image_size, args.image_size, 3), jnp.float32, sharding=on_cpu
  )
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  variables = jax.tree_util.tree_map(
      lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=on_cpu), variables
  )
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
  analysis = forward.lower(variables, images).compile().cost_analysis()
  if isinstance(analysis, list):  # Older jax returns one dict per device.
    analysis = analysis[0]
  return {
      "params": count(variables["params"]),
      "batch_stats": count(variables["batch_stats"]),
      "macs": count_macs(model, images.shape),
      "xla_flops": float(analysis["flops"]),
  }


def throughput(name: str, args) -> float:
  """Images/s of jitted forward+backward steps at args.batch_size."""
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  model = create_model(name, embedding_dim=args.embedding_dim, dtype=dtype)
  shape = (args.batch_size, args.image_size, args.image_size, 3)
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, shape), jnp.float32)
  # rbg keys: XLA:CPU compiles threefry random initialisers slowly, and this is not timed.
  key = jax.random.key(0, impl="rbg")
  variables = jax.jit(lambda x: model.init(key, x, train=False))(images[:1])

  def loss_fn(params, batch_stats, x):
    embeddings, updates = model.apply(
        {"params": params, "batch_stats": batch_stats},
        x,
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": key},
    )
    return jnp.mean(jnp.square(embeddings)), updates["batch_stats"]

  step = jax.jit(jax.grad(loss_fn, has_aux=True))
  params, batch_stats = variables["params"], variables["batch_stats"]
  for _ in range(args.warmup_steps):
    grads, batch_stats = step(params, batch_stats, images)
  jax.block_until_ready(grads)
  start = time.perf_counter()
  for _ in range(args.timed_steps):
    grads, batch_stats = step(params, batch_stats, images)
  jax.block_until_ready(grads)
  return args.batch_size * args.timed_steps / (time.perf_counter() - start)


def main():
  args = parse_args()
  results = {}
  for name in dict.fromkeys(args.models + args.timed):
    results[name] = cost(name, args)
  for name in args.timed:
    results[name]["train_images_per_s"] = throughput(name, args)

  print(
      f"backend={jax.default_backend()} devices={jax.device_count()} cpus={os.cpu_count()} "
      f"image={args.image_size} embedding={args.embedding_dim} timed: batch={args.batch_size} dtype={args.dtype} "
      f"steps={args.timed_steps}"
  )
  print(
      f"{'model':<14}{'params (M)':>11}{'MACs (G)':>10}{'XLA:CPU FLOPs (G)':>19}"
      f"{'FLOPs/(2 MACs)':>16}{'train img/s':>13}"
  )
  for name, row in results.items():
    speed = row.get("train_images_per_s")
    print(
        f"{name:<14}{row['params'] / 1e6:>11.3f}{row['macs'] / 1e9:>10.3f}"
        f"{row['xla_flops'] / 1e9:>19.3f}{row['xla_flops'] / (2 * row['macs']):>16.3f}"
        f"{'-' if speed is None else f'{speed:.1f}':>13}"
    )

  report = {
      "settings": vars(args),
      "backend": jax.default_backend(),
      "devices": jax.device_count(),
      "cpu_count": os.cpu_count(),
      "machine": platform.machine(),
      "jax": jax.__version__,
      "results": results,
  }
  with open(args.out, "w") as f:
    json.dump(report, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
