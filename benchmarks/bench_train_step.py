"""Full train step images/s: adam_face against an arcface_torch-style PyTorch step, same machine.

One step = backbone forward + normalised-FC ArcFace head (s=64, m=0.5) + cross-entropy + backward
+ SGD update (momentum 0.9, weight decay 5e-4, gradient norm of the backbone clipped at 5), on
random normalised images and labels that already lie on the device (no input pipeline).

  adam_face: `train_step.create_train_state` and `train_step.train_step`, jitted as
             adam_face/train.py jits them (mesh from `classifier.create_mesh()`, state shardings,
             donated state); the config is configs/default.py with the flags' model, batch and
             dtype. Every device of JAX's default backend is in the mesh.
  PyTorch:   written below in the layout of insightface's arcface_torch (iresnet.py: IBasicBlock
             BN-conv-BN-PReLU-conv-BN with a conv1x1+BN downsample, the "E" output head;
             mobilefacenet.py's conv/linear blocks, arranged as adam_face's MobileFaceNet), its
             PartialFC-style normalised FC and the arcface branch of CombinedMarginLoss, with
             torch.set_num_threads(os.cpu_count()). The layouts are read off the adam_face
             modules, and the trainable parameter counts of both sides are printed and compared.

PyTorch runs in a spawned child process (its own threads and allocator; a PyTorch crash is
reported, not fatal) that this process drives, so the timed steps run in alternating rounds
(adam_face, PyTorch; then PyTorch, adam_face; ...: the order reversed every other round) and a
change in the machine's load hits both sides alike; the table reports the median round. In every
round each side takes one untimed step before its timed ones: the first step of a side after
PyTorch's was slow (with --autodiff_batch_norm, whose side ran right after PyTorch's in every
other round, MobileFaceNet's "gain" printed 1.35-1.60x; with the untimed step 1.09x, as in a
process of the adam_face sides alone). Both use every CPU core: XLA's thread pool by default,
PyTorch by torch.set_num_threads(os.cpu_count()).
PyTorch's memory format (contiguous, channels_last) and OpenMP wait policy (as set, PASSIVE) are by
default chosen per model by timing each after the warm-up; --torch_compile adds torch.compile
(Inductor) to PyTorch's forward and loss. The 1-minute load average is printed: on a CPU shared
with other work the rates are noisy. Both sides run under the same glibc malloc setting: this
process restarts itself with transparent huge pages as adam_face.main does
(adam_face/host_memory.py) and PyTorch's child inherits its environment;
GLIBC_TUNABLES=glibc.malloc.hugetlb=0 runs both without.

  python -m benchmarks.bench_train_step                 # tiny + mobilefacenet, ~3 min, 2 cores
  python -m benchmarks.bench_train_step --quick         # smoke test, ~1 min
  python -m benchmarks.bench_train_step --models=tiny,mobilefacenet,iresnet50
  python -m benchmarks.bench_train_step --models=tiny,iresnet18 --xla_kernel_gradients
      # adam_face's step also with XLA:CPU's own kernel gradients, in the same rounds
      # (--patch_gradient_min_channels=1: patch_kernel_gradient in every layer, the stems too)
  python -m benchmarks.bench_train_step --autodiff_batch_norm
      # also with train-mode BatchNorm by autodiff of flax's formulas, in the same rounds
  python -m benchmarks.bench_train_step --dtype=bfloat16 --device=cuda --batch_size=256   # GPU
  python -m benchmarks.bench_train_step --models=iresnet50 --dtype=bfloat16 --device=cuda \
      --batch_size=128 --num_classes=2000000 --sample_rate=0.1   # GPU, WebFace42M-size Partial FC

PyTorch comes from benchmarks/requirements.txt. This module imports neither tensorflow nor clu, so
it runs where only jax, flax, optax, ml_collections and torch are installed.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import statistics
import time
from typing import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from adam_face import classifier, host_memory, models, train_step as ts
from adam_face.models import convolution, normalization
from adam_face.models.mobilefacenet import BOTTLENECKS, MobileFaceNet
from configs import default

ARCFACE_S, ARCFACE_M = 64.0, 0.5
# Per-model defaults that keep the default run to a few minutes on 2 CPU cores.
DEFAULT_BATCH = {"tiny": 64, "mobilefacenet": 16}
DEFAULT_BATCH_OTHER = 8
# The demo trains `tiny` with 128-d embeddings (configs/demo.py); the larger models use 512.
DEFAULT_EMBEDDING = {"tiny": 128}
DEFAULT_EMBEDDING_OTHER = 512


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
      "--models",
      default="tiny,mobilefacenet",
      help="comma-separated adam_face model names (tiny, iresnet*, mobilefacenet)",
  )
  parser.add_argument(
      "--batch_size",
      type=int,
      default=None,
      help=f"global batch of every model (default: {DEFAULT_BATCH}, others "
      f"{DEFAULT_BATCH_OTHER})",
  )
  parser.add_argument(
      "--embedding_dim",
      type=int,
      default=None,
      help=f"default: {DEFAULT_EMBEDDING}, others {DEFAULT_EMBEDDING_OTHER}",
  )
  parser.add_argument("--image_size", type=int, default=112)
  parser.add_argument("--num_classes", type=int, default=1000)
  parser.add_argument(
      "--sample_rate",
      type=float,
      default=1.0,
      help="Partial FC rate of both heads (adam_face's head.sample_rate; partial_fc_v2's)",
  )
  parser.add_argument(
      "--dtype",
      choices=("float32", "bfloat16"),
      default="float32",
      help="adam_face compute_dtype; PyTorch autocast to bfloat16",
  )
  parser.add_argument("--device", default="cpu", help="PyTorch device: cpu or cuda")
  parser.add_argument(
      "--warmup_steps",
      type=int,
      default=2,
      help="untimed steps per side (after adam_face's compilation)",
  )
  parser.add_argument("--steps_per_round", type=int, default=2)
  parser.add_argument(
      "--rounds", type=int, default=4, help="an even number puts each side first equally often"
  )
  parser.add_argument(
      "--torch_memory_format",
      choices=("best", "contiguous", "channels_last"),
      default="best",
      help="best: time both after the warm-up, keep the faster",
  )
  parser.add_argument(
      "--torch_omp_wait_policy",
      choices=("best", "default", "passive"),
      default="best",
      help="OpenMP wait policy of PyTorch's CPU threads (default: as the "
      "environment sets it; passive: OMP_WAIT_POLICY=PASSIVE); best: time both",
  )
  parser.add_argument(
      "--torch_compile",
      action="store_true",
      help="torch.compile the PyTorch forward+loss (slow to compile on a CPU)",
  )
  parser.add_argument(
      "--breakdown",
      action="store_true",
      help="also time forward-only and forward+backward (no update) on both sides",
  )
  parser.add_argument(
      "--xla_kernel_gradients",
      action="store_true",
      help="also time adam_face's step with XLA:CPU's own kernel gradients in every "
      "convolution (convolution.patch_kernel_gradient switched off), in the same rounds",
  )
  parser.add_argument(
      "--autodiff_batch_norm",
      action="store_true",
      help="also time adam_face's step with train-mode BatchNorm by autodiff of flax's "
      "formulas (normalization.batch_norm_prelu switched off), in the same rounds",
  )
  parser.add_argument(
      "--patch_gradient_min_channels",
      type=int,
      default=None,
      help="adam_face's convolution.PATCH_GRADIENT_MIN_CHANNELS for this run (default: "
      f"{convolution.PATCH_GRADIENT_MIN_CHANNELS}; 1: patch_kernel_gradient in every layer)",
  )
  parser.add_argument(
      "--quick",
      action="store_true",
      help="smoke test: batch 8, 1 warm-up step, 1 round of 1 step, PyTorch "
      "contiguous with a passive OpenMP wait policy only",
  )
  parser.add_argument("--out", default="/tmp/bench_train_step.json")
  args = parser.parse_args(argv)
  if args.quick:
    args.batch_size = args.batch_size or 8
    args.warmup_steps, args.steps_per_round, args.rounds = 1, 1, 1
    if args.torch_memory_format == "best":
      args.torch_memory_format = "contiguous"
    if args.torch_omp_wait_policy == "best":
      args.torch_omp_wait_policy = "passive"
  args.models = [name for name in args.models.split(",") if name]
  for name in args.models:
    if name not in models.MODEL_NAMES:
      parser.error(f"unknown model {name!r}; valid: {', '.join(models.MODEL_NAMES)}")
  return args


# ------------------------------------------------------------------------------ adam_face side


def train_config(
    model_name: str,
    *,
    batch_size: int | None = None,
    embedding_dim: int | None = None,
    image_size: int = 112,
    dtype: str = "float32",
    sample_rate: float = 1.0,
) -> ml_collections.ConfigDict:
  """configs/default.py (SGD 0.9, wd 5e-4, clip 5, ArcFace s=64 m=0.5) with the given sizes;
  batch_size and embedding_dim default to the model's DEFAULT_BATCH and DEFAULT_EMBEDDING."""
  config = default.get_config()
  config.head.sample_rate = sample_rate
  config.model.name = model_name
  config.model.embedding_dim = embedding_dim or DEFAULT_EMBEDDING.get(
      model_name, DEFAULT_EMBEDDING_OTHER
  )
  config.dataset.image_size = image_size
  config.global_batch_size = batch_size or DEFAULT_BATCH.get(model_name, DEFAULT_BATCH_OTHER)
  config.compute_dtype = dtype
  return config


def count_params(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


class AdamFaceStep:
  """The jitted train step of adam_face/train.py on one fixed random batch already on device."""

  def __init__(
      self, config: ml_collections.ConfigDict, num_classes: int, total_steps: int = 10_000
  ):
    self.batch_size = config.global_batch_size
    self.mesh = classifier.create_mesh()
    self.model = models.create_model(
        config.model.name,
        embedding_dim=config.model.embedding_dim,
        dtype=jnp.dtype(config.compute_dtype),
        dropout_rate=config.model.dropout_rate,
    )
    self.state, state_shardings = ts.create_train_state(
        config, self.model, self.mesh, (num_classes,), total_steps
    )
    self.batch_sharding = batch_sharding = NamedSharding(self.mesh, P(classifier.MESH_AXIS))
    self.step_fn = jax.jit(
        ts.train_step,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, None),
        donate_argnums=0,
    )
    size = config.dataset.image_size
    rng = np.random.default_rng(0)
    self.batch = {
        "image": jax.device_put(
            rng.uniform(-1.0, 1.0, (self.batch_size, size, size, 3)).astype(np.float32),
            batch_sharding,
        ),
        "label": jax.device_put(
            rng.integers(0, num_classes, self.batch_size, dtype=np.int32), batch_sharding
        ),
    }
    backbone = count_params(self.state.params["backbone"])
    self.num_params = backbone + num_classes * config.model.embedding_dim  # Without class padding.
    self.num_backbone_params = backbone

  def compile(
      self, patch_gradient_min_channels: float | None = None, written_out_batch_norm: bool = True
  ) -> float:
    """Compiles the step ahead of its first call; returns the seconds that took.

    patch_gradient_min_channels, where given, replaces convolution.PATCH_GRADIENT_MIN_CHANNELS
    while the step is traced (math.inf: XLA:CPU's own kernel gradient in every convolution, the
    program adam_face ran before patch_kernel_gradient); written_out_batch_norm=False traces
    train-mode BatchNorm by autodiff of flax's formulas (normalization.WRITTEN_OUT_GRADIENT_ON_CPU
    off, the program adam_face ran before batch_norm_prelu).
    """
    start = time.perf_counter()
    saved = convolution.PATCH_GRADIENT_MIN_CHANNELS, normalization.WRITTEN_OUT_GRADIENT_ON_CPU
    if patch_gradient_min_channels is not None:
      convolution.PATCH_GRADIENT_MIN_CHANNELS = patch_gradient_min_channels
    normalization.WRITTEN_OUT_GRADIENT_ON_CPU = written_out_batch_norm
    try:
      self.step_fn = self.step_fn.lower(self.state, self.batch).compile()
    finally:
      convolution.PATCH_GRADIENT_MIN_CHANNELS, normalization.WRITTEN_OUT_GRADIENT_ON_CPU = saved
    return time.perf_counter() - start

  def run(self, steps: int, host_batches: Iterator[dict[str, np.ndarray]] | None = None) -> float:
    """Seconds for `steps` steps, waiting for the last one to finish.

    With `host_batches` (numpy batches, e.g. from train_input.create_train_iterator) every
    step takes the next one and puts it on the devices as train.py does; otherwise every step
    reuses the random batch already on the devices.
    """
    start = time.perf_counter()
    for _ in range(steps):
      batch = self.batch
      if host_batches is not None:
        batch = {
            k: jax.make_array_from_process_local_data(self.batch_sharding, v)
            for k, v in next(host_batches).items()
        }
      self.state, metrics = self.step_fn(self.state, batch)
    jax.block_until_ready((self.state, metrics))
    return time.perf_counter() - start

  def breakdown(self, steps: int) -> dict[str, float]:
    """Images/s of the train-mode forward alone and of forward+backward (no head, no update)."""
    variables = {"params": self.state.params["backbone"], "batch_stats": self.state.batch_stats}
    key = jax.random.key(0)

    def forward(variables, images):
      return self.model.apply(
          variables, images, train=True, mutable=["batch_stats"], rngs={"dropout": key}
      )[0]

    def loss(params, batch_stats, images):
      return jnp.mean(jnp.square(forward({"params": params, "batch_stats": batch_stats}, images)))

    fwd = jax.jit(forward)
    fwd_bwd = jax.jit(jax.grad(loss))
    images = self.batch["image"]
    rates = {}
    for name, fn in (
        ("forward", lambda: fwd(variables, images)),
        (
            "forward_backward",
            lambda: fwd_bwd(variables["params"], variables["batch_stats"], images),
        ),
    ):
      jax.block_until_ready(fn())
      start = time.perf_counter()
      for _ in range(steps):
        out = fn()
      jax.block_until_ready(out)
      rates[name] = steps * self.batch_size / (time.perf_counter() - start)
    return rates


# ------------------------------------------------------------------------------ PyTorch side


def _torch_reference():
  """The PyTorch modules, defined on first use so that importing this file needs no torch."""
  import torch
  from torch import nn
  import torch.nn.functional as F

  from benchmarks import torch_arcface

  class MobileFaceNet(nn.Module):
    """adam_face's MobileFaceNet (the paper's BOTTLENECKS) from arcface_torch's blocks."""

    def __init__(self, embedding_dim, image_size):
      super().__init__()
      conv_bn, depthwise_unit = torch_arcface.conv_bn, torch_arcface.depthwise_unit
      layers = [conv_bn(3, 64, 3, 2, 1), conv_bn(64, 64, 3, 1, 1, groups=64)]
      cin = 64
      for expansion, cout, repeats, stride in BOTTLENECKS:
        for repeat in range(repeats):
          layers.append(depthwise_unit(cin, cout, cin * expansion, stride if repeat == 0 else 1))
          cin = cout
      side = image_size
      for _ in range(4):  # The stem and three bottleneck groups halve the map, rounding up.
        side = (side + 1) // 2
      # The last is the global depthwise convolution.
      layers += [conv_bn(cin, 512), conv_bn(512, 512, side, groups=512, prelu=False)]
      self.body = nn.Sequential(*layers)
      self.fc = nn.Linear(512, embedding_dim, bias=False)
      self.features = nn.BatchNorm1d(embedding_dim, eps=1e-5)
      nn.init.constant_(self.features.weight, 1.0)
      self.features.weight.requires_grad = False

    def forward(self, x):
      return torch_arcface.float32_embedding(
          lambda y: self.features(self.fc(torch.flatten(y, 1))), self.body(x)
      )

  class ArcFaceHead(nn.Module):
    """partial_fc_v2-style normalised FC + CombinedMarginLoss arcface + CE (one rank)."""

    def __init__(self, embedding_dim, num_classes, sample_rate):
      super().__init__()
      self.weight = nn.Parameter(0.01 * torch.randn(num_classes, embedding_dim))
      self.num_sample = int(sample_rate * num_classes)
      self.cos_m, self.sin_m = math.cos(ARCFACE_M), math.sin(ARCFACE_M)
      self.theta = math.cos(math.pi - ARCFACE_M)
      self.sinmm = math.sin(math.pi - ARCFACE_M) * ARCFACE_M

    def forward(self, embeddings, labels):
      weight = self.weight
      if self.num_sample < weight.shape[0]:  # PartialFC_V2.sample: positives + random negatives.
        positive = torch.unique(labels, sorted=True)
        index = positive
        if self.num_sample >= positive.shape[0]:
          perm = torch.rand(weight.shape[0], device=labels.device)
          perm[positive] = 2.0
          index = torch.topk(perm, k=self.num_sample)[1].sort()[0]
        labels, weight = torch.searchsorted(index, labels), weight[index]
      logits = F.linear(F.normalize(embeddings), F.normalize(weight))
      logits = logits.float().clamp(-1, 1)
      rows = torch.arange(labels.shape[0], device=labels.device)
      target = logits[rows, labels]
      sin_theta = torch.sqrt((1.0 - target * target).clamp_min(1e-6))
      final = torch.where(
          target > self.theta, target * self.cos_m - sin_theta * self.sin_m, target - self.sinmm
      )
      logits = logits.index_put((rows, labels), final)
      return F.cross_entropy(logits * ARCFACE_S, labels)

  return torch, torch_arcface.IResNet, MobileFaceNet, ArcFaceHead


class TorchStep:
  """arcface_torch's train step (SGD over backbone and head, backbone gradient clipped at 5)."""

  def __init__(
      self,
      layout: dict,
      *,
      embedding_dim: int,
      num_classes: int,
      sample_rate: float,
      batch_size: int,
      image_size: int,
      dtype: str,
      device: str,
      memory_format: str,
      compile_: bool,
  ):
    torch, IResNet, TorchMobileFaceNet, ArcFaceHead = _torch_reference()
    self.torch = torch
    torch.manual_seed(0)
    if device == "cpu":
      torch.set_num_threads(os.cpu_count())
    else:
      torch.backends.cudnn.benchmark = True
    self.device = torch.device(device)
    if layout["kind"] == "mobilefacenet":
      backbone = TorchMobileFaceNet(embedding_dim, image_size)
    else:
      backbone = IResNet(
          layout["stage_depths"], embedding_dim, layout["stage_widths"], image_size=image_size
      )
    self.memory_format = getattr(
        torch, "channels_last" if memory_format == "channels_last" else "contiguous_format"
    )
    self.backbone = backbone.to(self.device, memory_format=self.memory_format)
    self.head = ArcFaceHead(embedding_dim, num_classes, sample_rate).to(self.device)
    self.optimizer = torch.optim.SGD(
        [{"params": self.backbone.parameters()}, {"params": self.head.parameters()}],
        lr=0.1,
        momentum=0.9,
        weight_decay=5e-4,
    )
    self.autocast_dtype = torch.bfloat16 if dtype == "bfloat16" else None
    self.batch_size = batch_size
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch_size, 3, image_size, image_size, generator=generator) * 2 - 1
    self.images = images.to(self.device).contiguous(memory_format=self.memory_format)
    self.labels = torch.randint(0, num_classes, (batch_size,), generator=generator).to(self.device)
    self.loss_fn = torch.compile(self._loss) if compile_ else self._loss
    trainable = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    self.num_backbone_params = trainable(self.backbone)
    self.num_params = self.num_backbone_params + trainable(self.head)

  def _autocast(self):
    return self.torch.autocast(
        self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
    )

  def _loss(self, images, labels):
    with self._autocast():
      return self.head(self.backbone(images), labels)

  def _sync(self):
    if self.device.type == "cuda":
      self.torch.cuda.synchronize()

  def step(self):
    self.optimizer.zero_grad(set_to_none=True)
    self.loss_fn(self.images, self.labels).backward()
    self.torch.nn.utils.clip_grad_norm_(self.backbone.parameters(), max_norm=5.0)
    self.optimizer.step()

  def run(self, steps: int) -> float:
    """Seconds for `steps` steps, waiting for the last one to finish."""
    self._sync()
    start = time.perf_counter()
    for _ in range(steps):
      self.step()
    self._sync()
    return time.perf_counter() - start

  def breakdown(self, steps: int) -> dict[str, float]:
    """Images/s of the train-mode forward alone and of forward+backward (no head, no update)."""

    def forward():
      with self.torch.no_grad(), self._autocast():
        self.backbone(self.images)

    def forward_backward():
      self.backbone.zero_grad(set_to_none=True)
      with self._autocast():
        loss = self.backbone(self.images).float().square().mean()
      loss.backward()

    rates = {}
    for name, fn in (("forward", forward), ("forward_backward", forward_backward)):
      fn()
      self._sync()
      start = time.perf_counter()
      for _ in range(steps):
        fn()
      self._sync()
      rates[name] = steps * self.batch_size / (time.perf_counter() - start)
    return rates


def torch_layout(flax_model) -> dict:
  """What the PyTorch reference needs to rebuild the adam_face backbone's layout."""
  if isinstance(flax_model, MobileFaceNet):
    return {"kind": "mobilefacenet"}
  return {
      "kind": "iresnet",
      "stage_depths": list(flax_model.stage_depths),
      "stage_widths": list(flax_model.stage_widths),
  }


def _torch_worker(conn, layout: dict, options: dict) -> None:
  """Serves TorchStep calls ('run', steps) / ('breakdown', steps) over a pipe until 'stop'."""
  step = TorchStep(layout, **options)
  conn.send({"num_params": step.num_params, "num_backbone_params": step.num_backbone_params})
  while (request := conn.recv())[0] != "stop":
    method, steps = request
    conn.send(getattr(step, method)(steps))


class TorchCrashed(RuntimeError):
  """PyTorch's child process died (e.g. a segfault inside PyTorch)."""


class TorchProcess:
  """A TorchStep in a child process, driven a batch of steps at a time from this one.

  The child keeps PyTorch's threads, allocator and oneDNN out of the JAX process, and a crash
  inside PyTorch ends only the child: torch 2.13's CPU build segfaults in the backward of the tiny
  model's 8->16-channel 1x1 stride-2 shortcut convolution in channels_last.
  """

  def __init__(self, layout: dict, *, env: dict[str, str], **options):
    context = multiprocessing.get_context("spawn")  # Not forked: this process has JAX threads.
    self._conn, child_conn = context.Pipe()
    self._process = context.Process(
        target=_torch_worker, args=(child_conn, layout, options), daemon=True
    )
    saved = dict(os.environ)
    os.environ.update(env)  # The spawned child starts with this process's environment.
    try:
      self._process.start()
    finally:
      os.environ.clear()
      os.environ.update(saved)
    child_conn.close()
    info = self._receive()
    self.num_params, self.num_backbone_params = info["num_params"], info["num_backbone_params"]

  def _receive(self):
    try:
      return self._conn.recv()
    except EOFError:
      self._process.join()
      raise TorchCrashed(f"PyTorch's process died (exit code {self._process.exitcode})") from None

  def run(self, steps: int) -> float:
    self._conn.send(("run", steps))
    return self._receive()

  def breakdown(self, steps: int) -> dict[str, float]:
    self._conn.send(("breakdown", steps))
    return self._receive()

  def close(self) -> None:
    if self._process.is_alive():
      self._conn.send(("stop", 0))
    self._process.join()


def fastest_torch_process(layout: dict, args, *, embedding_dim: int, batch_size: int):
  """Starts PyTorch in each setting the flags leave open and keeps the fastest one running.

  Every candidate runs the warm-up steps and is then timed on one step. The OpenMP wait policy
  is tried because it decides PyTorch's speed on a CPU shared with other work (spinning threads
  that lose their core stall every barrier); the policies are tried in the first memory format,
  the other memory format with the better policy.

  Returns:
    (TorchProcess, name of the chosen setting, {setting: img/s, or why it failed}); the first
    two are None when PyTorch failed in every setting.
  """
  formats = (
      ["contiguous", "channels_last"]
      if args.torch_memory_format == "best"
      else [args.torch_memory_format]
  )
  policies = [args.torch_omp_wait_policy]
  if args.torch_omp_wait_policy == "best":
    policies = ["default", "passive"] if args.device == "cpu" else ["default"]
  trials, candidates = {}, {}

  def attempt(memory_format, policy):
    setting = f"{memory_format}/omp_{policy}"
    try:
      process = TorchProcess(
          layout,
          env={"OMP_WAIT_POLICY": "PASSIVE"} if policy == "passive" else {},
          embedding_dim=embedding_dim,
          num_classes=args.num_classes,
          sample_rate=args.sample_rate,
          batch_size=batch_size,
          image_size=args.image_size,
          dtype=args.dtype,
          device=args.device,
          memory_format=memory_format,
          compile_=args.torch_compile,
      )
      process.run(args.warmup_steps)
      trials[setting] = batch_size / process.run(1)
      candidates[setting] = (process, policy)
    except TorchCrashed as crash:
      trials[setting] = str(crash)

  for policy in policies:
    attempt(formats[0], policy)
  best_policy = candidates[max(candidates, key=trials.get)][1] if candidates else policies[0]
  for memory_format in formats[1:]:
    attempt(memory_format, best_policy)
  if not candidates:
    return None, None, trials
  chosen = max(candidates, key=trials.get)
  for setting, (process, _) in candidates.items():
    if setting != chosen:
      process.close()
  return candidates[chosen][0], chosen, trials


# ------------------------------------------------------------------------------ driver

# adam_face's step as it was before one of its CPU rewrites, timed in the same rounds when the
# flag of that name is given: AdamFaceStep.compile's options, then the gain table's two column
# titles (adam_face's step, the variant's) and what differs.
VARIANTS = {
    "xla_kernel_gradients": (
        {"patch_gradient_min_channels": math.inf},
        "patch dw img/s",
        "XLA dw img/s",
        "kernel gradients by patch_kernel_gradient or XLA's own",
    ),
    "autodiff_batch_norm": (
        {"written_out_batch_norm": False},
        "written img/s",
        "autodiff img/s",
        "train-mode BatchNorm by batch_norm_prelu or autodiff of flax's formulas",
    ),
}


def benchmark_model(name: str, args) -> dict:
  config = train_config(
      name,
      batch_size=args.batch_size,
      embedding_dim=args.embedding_dim,
      image_size=args.image_size,
      dtype=args.dtype,
      sample_rate=args.sample_rate,
  )
  batch_size, embedding_dim = config.global_batch_size, config.model.embedding_dim
  jax_step = AdamFaceStep(config, args.num_classes)
  row = {
      "model": name,
      "batch_size": batch_size,
      "embedding_dim": embedding_dim,
      "params": jax_step.num_params,
      "backbone_params": jax_step.num_backbone_params,
      "adam_face_compile_seconds": jax_step.compile(args.patch_gradient_min_channels),
  }
  jax_step.run(args.warmup_steps)
  torch_step, row["torch_setting"], row["torch_setting_trials"] = fastest_torch_process(
      torch_layout(jax_step.model), args, embedding_dim=embedding_dim, batch_size=batch_size
  )
  sides = {"adam_face": jax_step}
  for variant, (compile_options, *_) in VARIANTS.items():
    if getattr(args, variant):
      step = sides[f"adam_face_{variant}"] = AdamFaceStep(config, args.num_classes)
      step.compile(**compile_options)
      step.run(args.warmup_steps)
  if torch_step is not None:
    sides["torch"] = torch_step
  try:
    if torch_step is not None and torch_step.num_params != jax_step.num_params:
      raise RuntimeError(
          f"{name}: adam_face has {jax_step.num_params} trainable parameters, the "
          f"PyTorch reference {torch_step.num_params}; the layouts differ."
      )
    rates = {side: [] for side in sides}
    for round_index in range(args.rounds):
      # Every other round in the reverse order: which side runs first in a round changed the
      # rates by up to 8% (two compilations of the very same program, --xla_kernel_gradients on
      # MobileFaceNet, whose layers all keep XLA's kernel gradient, printed a "gain" of 1.02-1.08
      # in one order).
      order = list(sides.items())
      for side, step in order[:: -1 if round_index % 2 else 1]:
        step.run(1)  # Untimed: the first step after another side's is slow (module docstring).
        rates[side].append(args.steps_per_round * batch_size / step.run(args.steps_per_round))
    for side, step in sides.items():
      row[f"{side}_images_per_s"] = statistics.median(rates[side])
      row[f"{side}_rounds"] = rates[side]
      if args.breakdown and side in ("adam_face", "torch"):
        row[f"{side}_breakdown"] = step.breakdown(args.steps_per_round)
  finally:
    if torch_step is not None:
      torch_step.close()
  row.setdefault("torch_images_per_s", None)
  row["ratio"] = (
      row["adam_face_images_per_s"] / row["torch_images_per_s"]
      if row["torch_images_per_s"]
      else None
  )
  return row


def main(argv=None):
  args = parse_args(argv)
  # On a GPU, JAX would take 75% of its memory before PyTorch's process starts; leave it room.
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
  import torch  # Fails early, before any compilation, when PyTorch is missing.

  load_before = os.getloadavg()[0]
  print(
      f"jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} device(s)), "
      f"torch {torch.__version__} ({args.device}), {os.cpu_count()} CPU threads, "
      f"load average {load_before:.1f}; dtype={args.dtype}, classes={args.num_classes}, "
      f"sample_rate={args.sample_rate}, "
      f"image={args.image_size}, ArcFace s={ARCFACE_S} m={ARCFACE_M}, SGD 0.9 wd 5e-4 clip 5; "
      f"median of {args.rounds} round(s) of {args.steps_per_round} step(s) after "
      f"{args.warmup_steps} warm-up; GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES') or 'unset'} "
      "(both sides)",
      flush=True,
  )
  rows = []
  for name in args.models:
    row = benchmark_model(name, args)
    rows.append(row)
    trials = ", ".join(
        f"{k} {v:.1f}" if isinstance(v, float) else f"{k}: {v}"
        for k, v in row["torch_setting_trials"].items()
    )
    sides = "both sides" if row["torch_setting"] else "adam_face"
    print(
        f"  {name}: {row['params']:,} trainable parameters on {sides} "
        f"({row['backbone_params']:,} in the backbone); adam_face compiled in "
        f"{row['adam_face_compile_seconds']:.1f} s; torch {row['torch_setting'] or 'failed'} "
        f"(img/s after warm-up: {trials})",
        flush=True,
    )
  load_after = os.getloadavg()[0]

  header = (
      f"{'model':<14}{'batch':>6}{'emb':>5}{'params (M)':>11}{'adam_face img/s':>16}"
      f"{'torch img/s':>12}{'ratio':>7}"
  )
  print(header)
  print("-" * len(header))
  for row in rows:
    torch_rate = "failed" if row["ratio"] is None else f"{row['torch_images_per_s']:.1f}"
    ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
    print(
        f"{row['model']:<14}{row['batch_size']:>6}{row['embedding_dim']:>5}"
        f"{row['params'] / 1e6:>11.3f}{row['adam_face_images_per_s']:>16.1f}"
        f"{torch_rate:>12}{ratio:>7}"
    )
  print(
      f"ratio = adam_face / torch (> 1: adam_face faster); load average {load_after:.1f} at "
      "the end"
      + (
          " (the CPU was shared: treat the rates as noisy)"
          if max(load_before, load_after) > 1.5 * os.cpu_count()
          else ""
      )
  )
  for variant, (_, ours, theirs, what) in VARIANTS.items():
    if not getattr(args, variant):
      continue
    print(f"\n{'model':<14}{ours:>15}{theirs:>15}{'gain':>7}   (adam_face, {what})")
    for row in rows:
      # The median of the rounds' ratios: both ran in every round, under the same load.
      gain = statistics.median(
          a / b for a, b in zip(row["adam_face_rounds"], row[f"adam_face_{variant}_rounds"])
      )
      print(
          f"{row['model']:<14}{row['adam_face_images_per_s']:>15.1f}"
          f"{row[f'adam_face_{variant}_images_per_s']:>15.1f}{gain:>6.2f}x"
      )
  if args.breakdown:
    print(
        f"\n{'model':<14}{'side':<10}{'fwd img/s':>10}{'fwd+bwd img/s':>14}"
        f"{'full step img/s':>16}"
    )
    for row in rows:
      for side in ("adam_face", "torch"):
        if f"{side}_breakdown" not in row:
          continue
        b = row[f"{side}_breakdown"]
        print(
            f"{row['model']:<14}{side:<10}{b['forward']:>10.1f}{b['forward_backward']:>14.1f}"
            f"{row[f'{side}_images_per_s']:>16.1f}"
        )

  report = {
      "settings": vars(args),
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "devices": jax.device_count(),
      "torch": torch.__version__,
      "cpu_count": os.cpu_count(),
      "machine": platform.machine(),
      "processor": platform.processor(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
      "load_average": [load_before, load_after],
      "rows": rows,
  }
  with open(args.out, "w") as f:
    json.dump(report, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  host_memory.restart_with_huge_pages()  # As adam_face.main runs, for both sides.
  main()
