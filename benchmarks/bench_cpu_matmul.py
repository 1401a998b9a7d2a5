"""Benchmark: the margin head's matrix product on a CPU, in each way of computing it in bfloat16.

The head's forward product is embeddings [B, D] x centres [C, D]^T (B = D = 512). With
compute_dtype bfloat16 adam_face casts both to bfloat16 and accumulates in float32. This prints its
time in the ways XLA:CPU can compute it, each under each set of XLA:CPU flags (a subprocess per
set, since XLA reads its flags once), beside PyTorch's float32 and bfloat16 products on the same
threads (oneDNN, which uses AMX tiles where the CPU has them):

  f32                 float32 operands (what compute_dtype float32 does)
  bf16->f32           bfloat16 operands cast inside the program, preferred_element_type float32
                      (what compute_dtype bfloat16 does)
  bf16 operands       the same with the operands already bfloat16 (no cast in the program)
  rounded f32         float32 product of bfloat16-rounded operands: the same products (a product
                      of two bfloat16 values is exact in float32), float32 accumulation

  python -m benchmarks.bench_cpu_matmul [--classes 100000] [--steps 5]
"""

import argparse
import json
import os

from benchmarks import machine

B, D = 512, 512
# XLA:CPU flag sets tried: the defaults, and the experimental library fusions of the dot.
FLAG_SETS = {
    "default": "",
    "onednn": "--xla_cpu_experimental_onednn_custom_call=true "
    "--xla_cpu_experimental_onednn_fusion_type=dot",
    "xnnpack": "--xla_cpu_experimental_xnn_fusion_type=dot",
    "ynnpack": "--xla_cpu_experimental_ynn_fusion_type=dot",
}


def jax_worker(classes, steps):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((B, D), dtype=np.float32))
  w = jnp.asarray(rng.standard_normal((classes, D), dtype=np.float32))
  bf16, f32 = jnp.bfloat16, jnp.float32
  variants = {
      "f32": (lambda x, w: x @ w.T, x, w),
      "bf16->f32": (
          lambda x, w: jnp.matmul(x.astype(bf16), w.astype(bf16).T, preferred_element_type=f32),
          x,
          w,
      ),
      "bf16 operands": (
          lambda x, w: jnp.matmul(x, w.T, preferred_element_type=f32),
          x.astype(bf16),
          w.astype(bf16),
      ),
      "rounded f32": (
          lambda x, w: x.astype(bf16).astype(f32) @ w.astype(bf16).astype(f32).T,
          x,
          w,
      ),
  }
  out = {}
  for name, (fn, a, b) in variants.items():
    jitted = jax.jit(fn)
    out[name] = machine.median_seconds(lambda: jitted(a, b).block_until_ready(), steps)
  return out


def torch_times(classes, steps):
  import torch  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(os.cpu_count())
  x, w = torch.randn(B, D), torch.randn(classes, D)
  out = {}
  for name, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
    a, b = x.to(dtype), w.to(dtype)
    out[name] = machine.median_seconds(lambda: a @ b.T, steps)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--classes", type=int, default=100_000)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(jax_worker(args.classes, args.steps)))
    return
  gflop = 2 * B * D * args.classes / 1e9
  print(
      f"[{B}, {D}] x [{args.classes}, {D}]^T ({gflop:.1f} GFLOP), median of {args.steps}; "
      f"{machine.cpu_model()}, {os.cpu_count()} threads"
  )
  print(f"{'XLA flags':<10} {'variant':<14} {'ms':>8} {'GFLOP/s':>8}")
  for flag_name, flags in FLAG_SETS.items():
    times, error = machine.run_worker(
        "benchmarks.bench_cpu_matmul", [f"--classes={args.classes}", f"--steps={args.steps}"], flags
    )
    if error:
      print(f"{flag_name:<10} failed: {error}")
      continue
    for variant, seconds in times.items():
      print(f"{flag_name:<10} {variant:<14} {1e3 * seconds:8.1f} {gflop / seconds:8.1f}")
  try:
    times = torch_times(args.classes, args.steps)
  except ImportError:
    print("PyTorch not installed: pip install -r benchmarks/requirements.txt for its rows")
    return
  for variant, seconds in times.items():
    print(f"{'PyTorch':<10} {variant:<14} {1e3 * seconds:8.1f} {gflop / seconds:8.1f}")


if __name__ == "__main__":
  main()
