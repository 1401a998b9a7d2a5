"""Benchmark: the convolutions' backward pass on a CPU, XLA:CPU against PyTorch, layer by layer.

On a CPU adam_face's train step loses to PyTorch's in the backward pass (see "What limits the CPU
figures" in benchmarks/README.md). This times every convolution shape of a backbone (--layers:
the `tiny` iResNet's, batch 64 by default, or iresnet50's, batch 8; 112x112 float32 inputs)
several ways, each the median of --steps calls:

  xla fwd / xla bwd   lax.conv_general_dilated and its jax.vjp (input and kernel gradients)
  adam bwd            the same jax.vjp of adam_face.models.convolution.conv_general_dilated, the
                      backbones' convolution: a 1x1 kernel as a matrix product, a strided 3x3
                      kernel's input gradient by phases, the kernel gradient by
                      patch_kernel_gradient from PATCH_GRADIENT_MIN_CHANNELS input channels
                      (see that module), otherwise XLA's
  xla dw              the kernel gradient alone (what the train step needs of the stem)
  adam dw             convolution.patch_kernel_gradient alone, whatever the channels
  patches dw          the kernel gradient as one matmul of dy with the input's patches
                      (lax.conv_general_dilated_patches)
  shifted dw          ... as k*k matmuls of dy with strided windows of the padded input
  im2col dw           ... as one matmul of dy with those windows concatenated (an explicit im2col)
  torch bwd           PyTorch's conv2d backward (input and kernel gradients, oneDNN), same threads

and each XLA row again under XLA:CPU's experimental library flags for convolutions (a subprocess
per flag set). The kernel-gradient rewrites are what a custom VJP on the CPU backend could use;
their maximum relative difference to XLA's gradient is printed too (adam bwd's: to XLA's input
and kernel gradients).

  python -m benchmarks.bench_conv_backward [--layers tiny] [--batch 64] [--steps 5]
  python -m benchmarks.bench_conv_backward --layers iresnet50        # batch 8
"""

import argparse
import json
import os

from benchmarks import machine

# (input size, in channels, out channels, kernel, stride) of every distinct convolution of a
# backbone at 112x112 (the stem; each stage's first unit: 3x3 conv, strided 3x3 conv, strided 1x1
# shortcut; the stage's other units' 3x3), and the default batch of each.
LAYERS = {}
LAYERS["tiny"] = (
    (112, 3, 8, 3, 1),
    (112, 8, 8, 3, 1),
    (112, 8, 8, 3, 2),
    (112, 8, 8, 1, 2),
    (56, 8, 16, 3, 1),
    (56, 16, 16, 3, 2),
    (28, 16, 32, 3, 1),
    (28, 32, 32, 3, 2),
    (14, 32, 64, 3, 1),
    (14, 64, 64, 3, 2),
)
LAYERS["iresnet50"] = (
    (112, 3, 64, 3, 1),
    (112, 64, 64, 3, 1),
    (112, 64, 64, 3, 2),
    (112, 64, 64, 1, 2),
    (56, 64, 64, 3, 1),
    (56, 64, 128, 3, 1),
    (56, 128, 128, 3, 2),
    (56, 64, 128, 1, 2),
    (28, 128, 128, 3, 1),
    (28, 128, 256, 3, 1),
    (28, 256, 256, 3, 2),
    (28, 128, 256, 1, 2),
    (14, 256, 256, 3, 1),
    (14, 256, 512, 3, 1),
    (14, 512, 512, 3, 2),
    (14, 256, 512, 1, 2),
    (7, 512, 512, 3, 1),
)
DEFAULT_BATCH = {"tiny": 64, "iresnet50": 8}
FLAG_SETS = {
    "default": "",
    "onednn": "--xla_cpu_experimental_onednn_custom_call=true "
    "--xla_cpu_experimental_onednn_fusion_type=individual_convolution",
    "xnnpack": "--xla_cpu_experimental_xnn_fusion_type=individual_convolution",
    "ynnpack": "--xla_cpu_experimental_ynn_fusion_type=individual_convolution",
}
_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _windows(x, kernel, stride, out_size):
  """The k*k strided windows of the zero-padded input that meet each output pixel."""
  from jax import lax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  pad = kernel // 2
  padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  last = (out_size - 1) * stride + 1
  return [
      lax.slice(
          padded, (0, i, j, 0), (x.shape[0], i + last, j + last, x.shape[3]), (1, stride, stride, 1)
      )
      for i in range(kernel)
      for j in range(kernel)
  ]


def jax_worker(layers, batch, steps):
  import jax  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from adam_face.models import convolution  # pylint: disable=g-import-not-at-top

  rows = []
  for size, cin, cout, kernel, stride in LAYERS[layers]:
    pad = kernel // 2

    def conv(x, w, stride=stride, pad=pad):
      return lax.conv_general_dilated(
          x, w, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=_DIMENSIONS
      )

    def adam_conv(x, w, stride=stride, pad=pad):
      return convolution.conv_general_dilated(
          x, w, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=_DIMENSIONS
      )

    def patches_dw(x, dy, kernel=kernel, stride=stride, pad=pad, cin=cin, cout=cout):
      patches = lax.conv_general_dilated_patches(
          x,
          (kernel, kernel),
          (stride, stride),
          ((pad, pad), (pad, pad)),
          dimension_numbers=_DIMENSIONS,
      )  # [B, H', W', cin * k * k], features ordered (cin, kh, kw).
      grad = jnp.einsum("bhwp,bhwo->po", patches, dy)
      return grad.reshape(cin, kernel, kernel, cout).transpose(1, 2, 0, 3)

    def shifted_dw(x, dy, kernel=kernel, stride=stride, cin=cin, cout=cout):
      taps = [
          jnp.einsum("bhwc,bhwo->co", window, dy)
          for window in _windows(x, kernel, stride, dy.shape[1])
      ]
      return jnp.stack(taps).reshape(kernel, kernel, cin, cout)

    def im2col_dw(x, dy, kernel=kernel, stride=stride, cin=cin, cout=cout):
      columns = jnp.concatenate(_windows(x, kernel, stride, dy.shape[1]), axis=-1)
      grad = columns.reshape(-1, kernel * kernel * cin).T @ dy.reshape(-1, cout)
      return grad.reshape(kernel, kernel, cin, cout)

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, size, size, cin), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((kernel, kernel, cin, cout), dtype=np.float32))
    forward = jax.jit(conv)
    dy = 0.1 * jnp.ones_like(forward(x, w))
    backward = jax.jit(lambda x, w, dy: jax.vjp(conv, x, w)[1](dy))
    adam_backward = jax.jit(lambda x, w, dy: jax.vjp(adam_conv, x, w)[1](dy))
    xla_dw = jax.jit(lambda x, w, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0])
    reference = xla_dw(x, w, dy)
    row = {
        "xla fwd": machine.median_seconds(lambda: forward(x, w).block_until_ready(), steps),
        "xla bwd": machine.median_seconds(lambda: jax.block_until_ready(backward(x, w, dy)), steps),
        "adam bwd": machine.median_seconds(
            lambda: jax.block_until_ready(adam_backward(x, w, dy)), steps
        ),
        "adam error": max(
            float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
            for a, b in zip(adam_backward(x, w, dy), backward(x, w, dy))
        ),
        "xla dw": machine.median_seconds(lambda: xla_dw(x, w, dy).block_until_ready(), steps),
    }

    def adam_dw(x, dy, kernel=kernel, stride=stride, pad=pad, cin=cin, cout=cout):
      return convolution.patch_kernel_gradient(
          x, dy, (kernel, kernel, cin, cout), (stride, stride), ((pad, pad), (pad, pad))
      )

    for name, rewrite in (
        ("adam", adam_dw),
        ("patches", patches_dw),
        ("shifted", shifted_dw),
        ("im2col", im2col_dw),
    ):
      jitted = jax.jit(rewrite)
      grad = jitted(x, dy)
      row[f"{name} dw"] = machine.median_seconds(
          lambda j=jitted: j(x, dy).block_until_ready(), steps
      )
      error = float(jnp.max(jnp.abs(grad - reference)) / jnp.max(jnp.abs(reference)))
      row[f"{name} error"] = max(row.get(f"{name} error", 0.0), error)
    rows.append(row)
  return rows


def torch_worker(layers, batch, steps):
  import torch  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(os.cpu_count())
  rows = []
  for size, cin, cout, kernel, stride in LAYERS[layers]:
    x = torch.randn(batch, cin, size, size, requires_grad=True)
    w = torch.randn(cout, cin, kernel, kernel, requires_grad=True)
    y = torch.nn.functional.conv2d(x, w, stride=stride, padding=kernel // 2)
    dy = torch.full_like(y, 0.1)
    rows.append(
        {
            "torch bwd": machine.median_seconds(
                lambda y=y, x=x, w=w, dy=dy: torch.autograd.grad(y, (x, w), dy, retain_graph=True),
                steps,
            )
        }
    )
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--layers", choices=sorted(LAYERS), default="tiny")
  parser.add_argument("--batch", type=int, default=None, help=f"default: {DEFAULT_BATCH}")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
  parser.add_argument("--out", default="/tmp/bench_conv_backward.json")
  args = parser.parse_args()
  args.batch = args.batch or DEFAULT_BATCH[args.layers]
  if args.worker:
    worker = jax_worker if args.worker == "jax" else torch_worker
    print(json.dumps(worker(args.layers, args.batch, args.steps)))
    return

  worker_args = ["--layers", args.layers, "--batch", str(args.batch), "--steps", str(args.steps)]
  print(
      f"convolution backward, {args.layers} shapes, batch {args.batch}, float32, "
      f"{machine.cpu_model()}, {os.cpu_count()} threads; ms, median of {args.steps}"
  )
  results = {}
  for name, flags in FLAG_SETS.items():
    rows, error = machine.run_worker("benchmarks.bench_conv_backward", ["jax", *worker_args], flags)
    if error and name == "default":
      raise SystemExit(f"the JAX worker failed: {error}")
    if error:
      print(f"(XLA flag set {name} failed: {error})")
      continue
    results[name] = rows
  rows, error = machine.run_worker("benchmarks.bench_conv_backward", ["torch", *worker_args])
  if error:
    print(f"(no torch column: {error})")
  else:
    results["torch"] = rows
  default = results["default"]
  columns = [
      "xla fwd",
      "xla bwd",
      "adam bwd",
      "xla dw",
      "adam dw",
      "patches dw",
      "shifted dw",
      "im2col dw",
  ]
  header = f"{'layer':<18}" + "".join(f"{c:>12}" for c in columns) + f"{'torch bwd':>12}"
  print(header)
  print("-" * len(header))
  totals = dict.fromkeys(columns + ["torch bwd"], 0.0)
  for i, (size, cin, cout, kernel, stride) in enumerate(LAYERS[args.layers]):
    cells = {c: default[i][c] for c in columns}
    if "torch" in results:
      cells["torch bwd"] = results["torch"][i]["torch bwd"]
    for c, v in cells.items():
      totals[c] += v
    print(
        f"{size:>3} {cin:>3}->{cout:<3} k{kernel} s{stride}"
        + "".join(f"{1e3 * cells[c]:>12.2f}" for c in columns)
        + (f"{1e3 * cells['torch bwd']:>12.2f}" if "torch bwd" in cells else "")
    )
  print(f"{'total':<18}" + "".join(f"{1e3 * totals[c]:>12.1f}" for c in totals if totals[c]))
  worst = {
      name: max(row[f"{name} error"] for row in default)
      for name in ("adam", "patches", "shifted", "im2col")
  }
  print(
      "largest relative difference to XLA's gradients: "
      + ", ".join(f"{name} {error:.1e}" for name, error in worst.items())
  )
  print("\nXLA:CPU flag sets (totals over the layers, ms):")
  for name, rows in results.items():
    if name != "torch":
      print(
          f"  {name:<8} fwd {1e3 * sum(r['xla fwd'] for r in rows):7.1f}   "
          f"bwd {1e3 * sum(r['xla bwd'] for r in rows):7.1f}   "
          f"adam bwd {1e3 * sum(r['adam bwd'] for r in rows):7.1f}   "
          f"dw {1e3 * sum(r['xla dw'] for r in rows):7.1f}"
      )
  with open(args.out, "w") as f:
    json.dump({"cpu": machine.cpu_model(), "batch": args.batch, "results": results}, f, indent=2)
  print(f"\nwrote {args.out}")


if __name__ == "__main__":
  main()
