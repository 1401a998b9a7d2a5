"""Partial FC at WebFace42M scale: step time and peak memory of the class-sharded head.

One step is the head's part of `train_step.train_step`, run through that very function: Partial FC
draws each shard's rows, the sampled centres and their momentum are gathered, the ArcFace loss
(s=64, m=0.5) is differentiated with respect to the gathered block and the embeddings, SGD
(momentum 0.9, weight decay 5e-4) updates the block, and it is written back into the donated
state. The backbone is one Dense + BatchNorm layer on [B, D] random features, so nearly all the
work and memory is the head's. B = 512, D = 512, float32 master weights; --dtypes=bfloat16 casts
the sampled centres and the embeddings to bfloat16 for the matmul (compute_dtype).

Memory is the peak RSS of the timed steps (the process's VmHWM, reset after the warm-up step with
/proc/self/clear_refs, so the initialisation's peak does not count; what the process holds
between steps does) on a CPU, and JAX's peak_bytes_in_use on an accelerator. It is compared with
the floor, W + momentum (2 * C * D * 4 bytes), which any SGD-with-momentum training must hold.
On a CPU the note column splits the peak: the RSS between steps, the bytes of JAX's live arrays
then, the RSS once malloc_trim has handed back what the C allocator kept, and the compiled step's
temporaries per device.

The PyTorch rows are an insightface partial_fc_v2-style head on one process (its sampling:
positives plus torch.rand + topk negatives, `weight[index]`; the gradient of the parameter is then
dense [C, D] and torch.optim.SGD moves every row), at the sizes where it fits.

  python -m benchmarks.bench_partial_fc                                  # CPU, ~15 min on 2 cores
  python -m benchmarks.bench_partial_fc --classes=200000 --rates=0.1     # quick
  python -m benchmarks.bench_partial_fc --platform=gpu --classes=2000000,10000000 --device=cuda

On a CPU it uses 8 host devices (as a pod slice of 8 would shard W); on an accelerator, every
device. Each measurement runs in its own subprocess; one killed for memory is printed as such.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import sys
import time

from benchmarks import machine

B, D, S, M = 512, 512, 64.0, 0.5
MOMENTUM, WEIGHT_DECAY, LR = 0.9, 5e-4, 0.1


def _status_bytes(field: str) -> int:
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _peak_rss_bytes() -> int:
  return _status_bytes("VmHWM")


def _reset_peak_rss() -> None:
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


# ------------------------------------------------------------------------------ workers


def head_only_step(num_classes: int, rate: float, dtype: str, *, batch_size: int = B, dim: int = D):
  """train_step.train_step over a one-layer stand-in backbone and the class-sharded ArcFace head.

  Returns (step, init, batch): `step` jitted as train.py jits it (state donated), init(key) the
  state created in its sharded layout, `batch` [batch_size, dim] random features and labels on
  the devices of a mesh over every device.
  """
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import ml_collections
  import optax

  from adam_face import classifier, margins, train_step

  class Features(nn.Module):
    """The stand-in backbone: features -> Dense -> BatchNorm (batch_stats as a real one has)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
      return nn.BatchNorm(use_running_average=not train)(nn.Dense(dim)(x))

  mesh = classifier.create_mesh()
  model = Features()
  optimizer = ml_collections.ConfigDict(
      {
          "name": "sgd",
          "momentum": MOMENTUM,
          "weight_decay": WEIGHT_DECAY,
          "grad_clip_norm": 0.0,
          "backbone_lr_scale": 1.0,
          "freeze_backbone_steps": 0,
      }
  )
  learning_rate_fn = optax.constant_schedule(LR)
  tx = train_step.create_optimizer(
      ml_collections.ConfigDict({"optimizer": optimizer}), learning_rate_fn
  )
  margin = margins.ArcFace(s=S, m=M)
  head = train_step.Head("synthetic", num_classes, batch_size, margin)

  def init(rng):
    variables = model.init(rng, jnp.zeros((1, dim)))
    params = {
        "backbone": variables["params"],
        "head": ({"centers": classifier.random_centers(rng, num_classes, dim, mesh)},),
    }
    return train_step.TrainState.create(
        apply_fn=model.apply,
        params=params,
        tx=tx,
        batch_stats=variables["batch_stats"],
        margin_states=(margin.init_state(),),
        rng=rng,
        skipped_steps=jnp.zeros((), jnp.int32),
        heads=(head,),
        mesh=mesh,
        sample_rate=rate,
        compute_dtype=jnp.dtype(dtype),
        learning_rate_fn=learning_rate_fn,
    )

  shardings = train_step.state_shardings(jax.eval_shape(init, jax.random.key(0)), mesh)
  batch_sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(classifier.MESH_AXIS)
  )
  batch = {
      "image": jax.device_put(
          jax.random.normal(jax.random.key(1), (batch_size, dim)), batch_sharding
      ),
      "label": jax.device_put(
          jax.random.randint(jax.random.key(2), (batch_size,), 0, num_classes), batch_sharding
      ),
  }
  step = jax.jit(
      train_step.train_step,
      in_shardings=(shardings, batch_sharding),
      out_shardings=(shardings, None),
      donate_argnums=0,
  )
  return step, jax.jit(init, out_shardings=shardings), batch


def worker_jax(num_classes: int, rate: float, dtype: str, steps: int, platform_name: str) -> dict:
  if platform_name == "cpu":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
  import jax

  from adam_face import classifier

  step, init, batch = head_only_step(num_classes, rate, dtype)
  state = init(jax.random.key(0))
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_seconds = time.perf_counter() - start
  state, metrics = compiled(state, batch)  # Warm-up.
  jax.block_until_ready(state)
  # What the process holds between steps (the state, the executable, the runtime): the peak
  # minus this is what the step itself adds.
  steady = _status_bytes("VmRSS") if platform_name == "cpu" else None
  if platform_name == "cpu":
    _reset_peak_rss()

  def one_step():
    nonlocal state, metrics
    state, metrics = compiled(state, batch)
    jax.block_until_ready(state)

  seconds = machine.median_seconds(one_step, steps, warm_up=False)
  live = sum(x.nbytes for x in jax.live_arrays())  # The state, the batch, the last metrics.
  trimmed = None
  if platform_name == "cpu":
    peak = _peak_rss_bytes()
    # What the C allocator still holds after XLA freed it: malloc_trim hands it back.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    trimmed = _status_bytes("VmRSS")
  else:
    peak = jax.devices()[0].memory_stats()["peak_bytes_in_use"]
  return {
      "seconds": seconds,
      "peak_bytes": peak,
      "steady_bytes": steady,
      "live_bytes": live,
      "trimmed_bytes": trimmed,
      "temp_bytes_per_device": compiled.memory_analysis().temp_size_in_bytes,
      "compile_seconds": compile_seconds,
      "loss": float(metrics["loss"]),
      "devices": f"{len(jax.devices())} x {jax.devices()[0].device_kind}",
      "num_sampled_per_shard": classifier.num_sampled_per_shard(
          num_classes, len(jax.devices()), B, rate
      ),
  }


def worker_torch(num_classes: int, rate: float, dtype: str, steps: int, device: str) -> dict:
  import math

  import torch
  import torch.nn.functional as F

  torch.manual_seed(0)
  torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 on both sides.
  weight = torch.nn.Parameter(0.01 * torch.randn(num_classes, D, device=device))
  optimizer = torch.optim.SGD([weight], lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
  features = torch.randn(B, D, device=device, requires_grad=True)
  labels = torch.randint(0, num_classes, (B,), device=device)
  num_sample = int(rate * num_classes)  # partial_fc_v2's num_sample (one rank: num_local = C).
  cos_m, sin_m = math.cos(M), math.sin(M)
  theta, sinmm = math.cos(math.pi - M), math.sin(math.pi - M) * M
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def step():
    optimizer.zero_grad(set_to_none=True)
    features.grad = None
    if num_sample < num_classes:  # partial_fc_v2.PartialFC_V2.sample
      positive = torch.unique(labels, sorted=True)
      if num_sample >= positive.shape[0]:
        perm = torch.rand(num_classes, device=device)
        perm[positive] = 2.0
        index = torch.topk(perm, k=num_sample)[1].sort()[0]
      else:
        index = positive
      local_labels = torch.searchsorted(index, labels)
      centers = weight[index]
    else:
      local_labels, centers = labels, weight
    with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
      logits = F.linear(F.normalize(features), F.normalize(centers))
    logits = logits.float().clamp(-1, 1)
    rows = torch.arange(B, device=device)
    target = logits[rows, local_labels]
    sin_theta = torch.sqrt(1.0 - target * target)
    final = torch.where(target > theta, target * cos_m - sin_theta * sin_m, target - sinmm)
    logits = logits.index_put((rows, local_labels), final) * S
    F.cross_entropy(logits, local_labels).backward()
    optimizer.step()
    sync()

  step()  # Warm-up: allocates the momentum buffer.
  steady = None
  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  else:
    steady = _status_bytes("VmRSS")
    _reset_peak_rss()
  seconds = machine.median_seconds(step, steps, warm_up=False)
  peak = torch.cuda.max_memory_allocated() if device == "cuda" else _peak_rss_bytes()
  return {"seconds": seconds, "peak_bytes": peak, "steady_bytes": steady}


# ------------------------------------------------------------------------------ driver


def _run_worker(args: list[str]) -> dict:
  """The worker's result, or {"error": why it failed}."""
  result, error = machine.run_worker(
      "benchmarks.bench_partial_fc", args, xla_flags=None, platform_name=None
  )
  return {"error": error[:120]} if error else result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--classes", default="200000,1000000,2000000,4000000")
  parser.add_argument("--rates", default="0.1,1.0")
  parser.add_argument("--dtypes", default="float32")
  parser.add_argument("--steps", type=int, default=3, help="timed steps (the median is shown)")
  parser.add_argument("--platform", default="cpu", choices=("cpu", "gpu", "tpu"))
  parser.add_argument("--device", default="cpu", help="PyTorch device: cpu or cuda")
  parser.add_argument(
      "--torch_max_classes",
      type=int,
      default=2_000_000,
      help="largest C of the PyTorch rows (it holds W, a dense gradient and momentum)",
  )
  parser.add_argument(
      "--jax_max_full_classes",
      type=int,
      default=1_000_000,
      help="largest C run at sample rate 1 (whose [B, C] logits and dense gradient grow with C)",
  )
  parser.add_argument("--out", default="/tmp/bench_partial_fc.json")
  parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    impl, num_classes, rate, dtype, where = args.worker
    run = worker_jax if impl == "jax" else worker_torch
    print(json.dumps(run(int(num_classes), float(rate), dtype, args.steps, where)))
    return
  torch_available = importlib.util.find_spec("torch") is not None
  print(
      f"Partial FC step: B={B}, D={D}, ArcFace s={S} m={M}, SGD momentum {MOMENTUM} wd "
      f"{WEIGHT_DECAY}, state donated; {os.cpu_count()} CPU threads, {machine.cpu_model()}; "
      f"adam_face on {args.platform}, PyTorch on {args.device}"
  )
  header = (
      f"{'C':>9} {'rate':>5} {'dtype':>9} {'impl':>9} | {'step s':>8} {'peak GB':>8} "
      f"{'floor GB':>8} {'peak/floor':>10} | note"
  )
  print(header)
  print("-" * len(header))
  rows = []
  for num_classes in (int(c) for c in args.classes.split(",")):
    floor = 2 * num_classes * D * 4  # W + momentum, float32.
    for rate in (float(r) for r in args.rates.split(",")):
      for dtype in args.dtypes.split(","):
        impls = []
        if rate < 1.0 or num_classes <= args.jax_max_full_classes:
          impls.append(("adam_face", ["jax", str(num_classes), str(rate), dtype, args.platform]))
        if torch_available and num_classes <= args.torch_max_classes:
          impls.append(("pytorch", ["torch", str(num_classes), str(rate), dtype, args.device]))
        for name, worker_args in impls:
          result = _run_worker(worker_args)
          rows.append(
              {
                  "num_classes": num_classes,
                  "rate": rate,
                  "dtype": dtype,
                  "impl": name,
                  "floor_bytes": floor,
                  **result,
              }
          )
          if "error" in result:
            print(f"{num_classes:>9} {rate:>5} {dtype:>9} {name:>9} | {result['error']}")
            continue
          print(
              f"{num_classes:>9} {rate:>5} {dtype:>9} {name:>9} | {result['seconds']:>8.3f} "
              f"{result['peak_bytes'] / 1e9:>8.2f} {floor / 1e9:>8.2f} "
              f"{result['peak_bytes'] / floor:>9.2f}x | "
              + (
                  f"between steps {result['steady_bytes'] / 1e9:.2f} GB"
                  if result.get("steady_bytes")
                  else ""
              )
              + (  # JAX's own split of what the process holds between steps.
                  f" (live arrays {result['live_bytes'] / 1e9:.2f}, after malloc_trim "
                  f"{result['trimmed_bytes'] / 1e9:.2f})"
                  if result.get("trimmed_bytes")
                  else ""
              )
              + ("; " if result.get("steady_bytes") else "")
              + (
                  f"step temporaries {result['temp_bytes_per_device'] / 1e6:.0f} MB/device; "
                  if "temp_bytes_per_device" in result
                  else ""
              )
              + (
                  f"compile {result['compile_seconds']:.0f} s"
                  if "compile_seconds" in result
                  else ""
              )
          )
        sys.stdout.flush()
  with open(args.out, "w") as f:
    json.dump({"batch": B, "dim": D, "cpu": machine.cpu_model(), "rows": rows}, f, indent=2)
  print(f"\nwrote {args.out}")


if __name__ == "__main__":
  from adam_face import host_memory  # pylint: disable=g-import-not-at-top

  # As adam_face.main runs; the workers, PyTorch's too, inherit the environment.
  host_memory.restart_with_huge_pages()
  main()
