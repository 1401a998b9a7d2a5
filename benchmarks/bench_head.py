"""Margin-softmax head: adam_face against a PyTorch arcface_torch-style head, same CPU threads.

The head is normalised FC + ArcFace margin (s=64, m=0.5) + cross-entropy, forward and backward
(gradients for W and the embeddings), parameter update excluded, at B=512, D=512. Every
measurement runs in its own subprocess so that peak memory (the rise of the process's peak RSS over
its RSS just before the first step) belongs to that measurement alone. Also printed:

  * the fraction of the machine's matrix-multiply peak reached, the peak being measured in the
    same run with plain matmuls of the head's FLOPs (6*B*D*C) in the same framework and dtype;
  * the class-sharded head at N = 1 and N = 8 devices (8 host-CPU devices on a CPU machine; use
    real accelerators for time scaling): step time and per-device bytes of W and its gradient from
    the compiled step's memory analysis, so the C/N scaling can be seen.

  python benchmarks/bench_head.py                      # C = 10k, 100k; ~5 min on 2 CPU cores
  python benchmarks/bench_head.py --classes=10000,100000,1000000 --out=/tmp/bench_head.json
  python benchmarks/bench_head.py --classes=100000 --chunk_columns=100000   # cosines kept, 1 chunk
  python benchmarks/bench_head.py --device=cuda --mesh_sizes=1 --classes=100000,1000000   # a GPU

On a GPU, memory is the device's peak allocation (JAX's peak_bytes_in_use, PyTorch's
max_memory_allocated) instead of the process's RSS. Both sides run with glibc's malloc on
transparent huge pages, as adam_face.main does (adam_face/host_memory.py;
GLIBC_TUNABLES=glibc.malloc.hugetlb=0 runs both without).

PyTorch comes from benchmarks/requirements.txt; without it the PyTorch rows are skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import sys
import time

if not __package__:  # Run as a script, python benchmarks/bench_head.py: the repository's root.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import machine  # pylint: disable=g-import-not-at-top,wrong-import-position

B, D, S, M = 512, 512, 64.0, 0.5


def _rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _time(fn, steps: int) -> float:
  fn()  # Warm-up (and compilation).
  start = time.perf_counter()
  for _ in range(steps):
    fn()
  return (time.perf_counter() - start) / steps


# ------------------------------------------------------------------------------ workers


def worker_jax(
    num_classes: int, dtype: str, num_devices: int, steps: int, chunk_columns: int | None
) -> dict:
  if num_devices > 1:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  import jax
  import jax.numpy as jnp
  from adam_face import classifier, margins

  mesh = classifier.create_mesh(jax.devices()[:num_devices])
  compute_dtype = jnp.dtype(dtype)
  centers = classifier.init_centers(jax.random.key(0), num_classes, D, mesh)
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  emb = jax.device_put(jax.random.normal(jax.random.key(1), (B, D)), batch_sharding)
  labels = jax.device_put(
      jax.random.randint(jax.random.key(2), (B,), 0, num_classes), batch_sharding
  )

  def loss(w, e):
    return classifier.margin_head_loss(
        w,
        e,
        labels,
        margins.ArcFace(s=S, m=M),
        {},
        mesh=mesh,
        num_classes=num_classes,
        compute_dtype=compute_dtype,
        chunk_columns=chunk_columns,
    )[0]

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  memory = step.lower(centers, emb).compile().memory_analysis()
  rss_before = _rss_bytes()
  seconds = _time(lambda: jax.block_until_ready(step(centers, emb)), steps)
  device_stats = jax.devices()[0].memory_stats() or {}
  peak = (
      device_stats["peak_bytes_in_use"]
      if jax.default_backend() != "cpu"
      else _peak_rss_bytes() - rss_before
  )
  result = {
      "seconds": seconds,
      "peak_bytes": peak,
      "backend": jax.default_backend(),
      "per_device_argument_bytes": memory.argument_size_in_bytes,
      "per_device_output_bytes": memory.output_size_in_bytes,
      "per_device_temp_bytes": memory.temp_size_in_bytes,
  }
  if num_devices == 1:
    a = jax.random.normal(jax.random.key(3), (B, D), compute_dtype)
    bmat = jax.random.normal(jax.random.key(4), (D, num_classes), compute_dtype)
    matmul = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    # 3 matmuls of 2*B*D*C FLOPs each = the head's 6*B*D*C.
    result["matmul_seconds"] = 3 * _time(lambda: jax.block_until_ready(matmul(a, bmat)), steps)
  return result


def worker_torch(num_classes: int, dtype: str, steps: int, device: str) -> dict:
  import torch
  import torch.nn.functional as F

  torch.manual_seed(0)
  torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 on both sides.
  tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  weight = (0.01 * torch.randn(num_classes, D, device=device)).requires_grad_()
  emb = torch.randn(B, D, device=device, requires_grad=True)
  labels = torch.randint(0, num_classes, (B,), device=device)
  cos_m, sin_m = math.cos(M), math.sin(M)
  theta_limit = math.cos(math.pi - M)
  sinmm = math.sin(math.pi - M) * M
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def step():
    weight.grad = emb.grad = None
    with torch.autocast(device, dtype=tdtype, enabled=tdtype != torch.float32):
      logits = F.linear(F.normalize(emb), F.normalize(weight))
    logits = logits.float().clamp(-1, 1)
    # arcface_torch CombinedMarginLoss, arcface branch (margins (1, 0.5, 0)).
    rows = torch.arange(B, device=device)
    target = logits[rows, labels]
    sin_theta = torch.sqrt(1.0 - target * target)
    cos_theta_m = target * cos_m - sin_theta * sin_m
    final = torch.where(target > theta_limit, cos_theta_m, target - sinmm)
    logits = logits.index_put((rows, labels), final) * S
    F.cross_entropy(logits, labels).backward()
    sync()

  rss_before = _rss_bytes()
  seconds = _time(step, steps)
  peak = torch.cuda.max_memory_allocated() if device == "cuda" else _peak_rss_bytes() - rss_before
  result = {"seconds": seconds, "peak_bytes": peak, "backend": device}
  a = torch.randn(B, D, dtype=tdtype, device=device)
  bmat = torch.randn(D, num_classes, dtype=tdtype, device=device)

  def matmul():
    a @ bmat
    sync()

  result["matmul_seconds"] = 3 * _time(matmul, steps)
  return result


# ------------------------------------------------------------------------------ driver


def _run_worker(args: list[str], options: list[str] = ()) -> dict | None:
  result, error = machine.run_worker(
      "benchmarks.bench_head", [*args, *options], xla_flags=None, platform_name=None
  )
  if error:
    print(f"worker {args} failed: {error}", file=sys.stderr)
  return result


def _torch_available() -> bool:
  return importlib.util.find_spec("torch") is not None


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--classes", default="10000,100000")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--device", default="cpu", help="PyTorch device: cpu or cuda")
  parser.add_argument(
      "--mesh_sizes", default="1,8", help="N of the scaling table (N > 1 uses host-CPU devices)"
  )
  parser.add_argument(
      "--chunk_columns",
      type=int,
      default=0,
      help="classes per chunk of adam_face's softmax (0: the head's own choice, "
      "classifier.chunk_columns_for; the number of classes: one chunk, the cosines kept)",
  )
  parser.add_argument("--out", default="/tmp/bench_head.json")
  parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    impl, num_classes, dtype, num_devices, device = args.worker
    result = (
        worker_jax(
            int(num_classes), dtype, int(num_devices), args.steps, args.chunk_columns or None
        )
        if impl == "jax"
        else worker_torch(int(num_classes), dtype, args.steps, device)
    )
    print(json.dumps(result))
    return

  threads = os.cpu_count()
  print(
      f"head: normalised FC + ArcFace (s={S}, m={M}) + CE, fwd+bwd, B={B}, D={D}, "
      f"{threads} CPU threads, PyTorch on {args.device}, adam_face's chunks: "
      f"{args.chunk_columns or 'chunk_columns_for'}"
  )
  chunks = [f"--chunk_columns={args.chunk_columns}"]
  rows = []
  header = (
      f"{'C':>8} {'dtype':>9} | {'adam_face s':>11} {'torch s':>9} {'speed-up':>8} | "
      f"{'jax MB':>8} {'torch MB':>8} | {'jax %peak':>9} {'torch %peak':>11}"
  )
  print(header)
  print("-" * len(header))
  for num_classes in (int(c) for c in args.classes.split(",")):
    flops = 6 * B * D * num_classes
    for dtype in args.dtypes.split(","):
      jax_r = _run_worker(["jax", str(num_classes), dtype, "1", args.device], chunks)
      torch_r = (
          _run_worker(["torch", str(num_classes), dtype, "1", args.device])
          if _torch_available()
          else None
      )
      if jax_r is None:
        continue
      row = {
          "num_classes": num_classes,
          "dtype": dtype,
          "flops": flops,
          "adam_face": jax_r,
          "torch": torch_r,
      }
      rows.append(row)
      pct = lambda r: 100 * r["matmul_seconds"] / r["seconds"]  # noqa: E731
      t = torch_r or {}
      print(
          f"{num_classes:>8} {dtype:>9} | {jax_r['seconds']:>11.4f} "
          f"{t.get('seconds', float('nan')):>9.4f} "
          f"{t.get('seconds', float('nan')) / jax_r['seconds']:>7.2f}x | "
          f"{jax_r['peak_bytes'] / 2**20:>8.0f} "
          f"{t.get('peak_bytes', float('nan')) / 2**20:>8.0f} | "
          f"{pct(jax_r):>8.1f}% {pct(t) if t else float('nan'):>10.1f}%"
      )

  print("\nclass-sharded head (float32): N host devices; per-device bytes from the compiled step")
  header = (
      f"{'C':>8} {'N':>3} | {'step s':>8} | {'args MB/dev':>11} {'temp MB/dev':>11} "
      f"{'W MB total':>10}"
  )
  print(header)
  print("-" * len(header))
  scaling = []
  for num_classes in (int(c) for c in args.classes.split(",")):
    for n in (int(n) for n in args.mesh_sizes.split(",")):
      r = _run_worker(["jax", str(num_classes), "float32", str(n), args.device], chunks)
      if r is None:
        continue
      scaling.append({"num_classes": num_classes, "num_devices": n, **r})
      print(
          f"{num_classes:>8} {n:>3} | {r['seconds']:>8.4f} | "
          f"{r['per_device_argument_bytes'] / 2**20:>11.2f} "
          f"{r['per_device_temp_bytes'] / 2**20:>11.2f} {num_classes * D * 4 / 2**20:>10.1f}"
      )
  with open(args.out, "w") as f:
    json.dump(
        {"batch": B, "dim": D, "threads": threads, "rows": rows, "scaling": scaling}, f, indent=2
    )
  print(f"\nwrote {args.out}")


if __name__ == "__main__":
  from adam_face import host_memory  # pylint: disable=g-import-not-at-top

  # As adam_face.main runs; the workers, PyTorch's too, inherit the environment.
  host_memory.restart_with_huge_pages()
  main()
