"""Where adam_face's CPU train step spends its time: by layer, by kind of XLA operation and by
operation, from a jax.profiler trace of bench_train_step's compiled step.

  python -m benchmarks.profile_train_step --model=tiny
  python -m benchmarks.profile_train_step --model=tiny --patch_gradient_min_channels=inf
      # XLA:CPU's own kernel gradient in every convolution (bench_train_step's "XLA dw" side)

The step is bench_train_step's (`AdamFaceStep`: train_step.train_step jitted as train.py jits it,
on one random batch already on the device). Its operations' trace events are summed per HLO
instruction of the compiled program and attributed to the flax module whose name path appears in
the instruction's op_name ("fwd" for the forward pass, "bwd" for its transpose), to the kind of
operation (the instruction's name without its number: a fusion's kind, a ynn_fusion, a dot ...),
and listed one by one.

The attribution is only as good as the trace. With jax 0.10 on the CPU, XLA runs the program's
operations one after another on its thread pool, each with its own event (convolutions and
reductions as YNNPACK thunks, "ynn_fusion"), and their events add up to the executor's time, which
the first line prints beside them: where they fall well short of it, operations ran unseen (as
asynchronous convolutions did with earlier XLA:CPU versions, whose events ended before their
work). Tracing adds a little to the step's time.
"""

import argparse
import collections
import pathlib
import re
import tempfile

import jax

from adam_face import host_memory
from benchmarks import bench_train_step
from benchmarks import machine

# A compiled HLO instruction's name and its result's type.
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_EXECUTOR = "ThunkExecutor::Execute"


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="tiny", help="an adam_face model name")
  parser.add_argument("--batch_size", type=int, help="default: bench_train_step's for the model")
  parser.add_argument("--steps", type=int, default=5, help="traced steps (after 3 untimed)")
  parser.add_argument("--top", type=int, default=25, help="rows of each table")
  parser.add_argument(
      "--patch_gradient_min_channels",
      type=float,
      help="convolution.PATCH_GRADIENT_MIN_CHANNELS for this run (inf: XLA's kernel gradients)",
  )
  return parser.parse_args(argv)


def module_paths(tree, prefix=()) -> set[tuple[str, ...]]:
  """Every flax module's name path in a variable tree (the dicts above its arrays)."""
  paths = set()
  for name, value in tree.items():
    if isinstance(value, dict):
      paths.add((*prefix, name))
      paths |= module_paths(value, (*prefix, name))
  return paths


def layer_of(op_name: str, paths: set[tuple[str, ...]]) -> str:
  """'fwd stage1_unit1/bn1' for an op_name like jit(train_step)/jvp(IResNet)/stage1_unit1/bn1/sub:
  the longest module path in it, after the model's jvp (the forward pass) or its transpose (the
  backward pass); 'other' where the op_name names no module (the head, the loss and the optimiser,
  and operations that XLA made without an op_name)."""
  parts = op_name.split("/")
  marker = next(
      (i for i, part in enumerate(parts) if part.startswith(("jvp(", "transpose("))), None
  )
  if marker is None:
    return "other"
  side = "bwd" if parts[marker].startswith("transpose(") else "fwd"
  names = parts[marker + 1 :]
  for length in range(len(names), 0, -1):
    for start in range(len(names) - length + 1):
      if tuple(names[start : start + length]) in paths:
        return f"{side} {'/'.join(names[start : start + length])}"
  return f"{side} other"


def event_milliseconds(trace_dir: str, steps: int) -> dict[str, float]:
  """Milliseconds a step of each event name on XLA:CPU's thread-pool threads, summed over them."""
  trace = next(pathlib.Path(trace_dir).rglob("*.xplane.pb"), None)
  if trace is None:
    raise SystemExit(f"jax.profiler wrote no trace (*.xplane.pb) under {trace_dir}.")
  totals = collections.defaultdict(float)
  for plane in jax.profiler.ProfileData.from_file(str(trace)).planes:
    for line in plane.lines:
      if line.name.startswith("tf_XLAEigen"):
        for event in line.events:
          totals[event.name] += event.duration_ns / 1e6 / steps
  if _EXECUTOR not in totals:
    raise SystemExit(
        "The trace holds no XLA:CPU thread-pool events: this profile reads the CPU backend's; "
        "run it with JAX_PLATFORMS=cpu."
    )
  return totals


def print_table(title: str, rows: dict[str, float], top: int) -> None:
  print(f"\n{title:<90}{'ms/step':>10}")
  for name, ms in sorted(rows.items(), key=lambda row: -row[1])[:top]:
    print(f"{name[:90]:<90}{ms:>10.2f}")


def main(argv=None):
  args = parse_args(argv)
  config = bench_train_step.train_config(args.model, batch_size=args.batch_size)
  step = bench_train_step.AdamFaceStep(config, num_classes=1000)
  step.compile(args.patch_gradient_min_channels)
  step.run(3)
  instructions = {}  # name: (the line, the result's type)
  for line in step.step_fn.as_text().splitlines():
    match = _INSTRUCTION.match(line)
    if match:
      instructions.setdefault(match.group(1), (line, match.group(2)))
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    seconds = step.run(args.steps)
    jax.profiler.stop_trace()
    events = event_milliseconds(trace_dir, args.steps)

  paths = module_paths(step.state.params["backbone"]) | module_paths(step.state.batch_stats)
  by_layer, by_kind, by_instruction = (collections.defaultdict(float) for _ in range(3))
  for name, ms in events.items():
    if name not in instructions:
      continue
    line, result_type = instructions[name]
    op_name = _OP_NAME.search(line)
    layer = layer_of(op_name.group(1), paths) if op_name else "other"
    by_layer[layer] += ms
    by_kind[re.sub(r"\.\d+$", "", name)] += ms
    by_instruction[f"{name} {result_type} ({layer})"] += ms
  traced = sum(by_kind.values())
  print(
      f"{args.model}, batch {config.global_batch_size}, {machine.cpu_model()}, "
      f"jax {jax.__version__}, "
      f"PATCH_GRADIENT_MIN_CHANNELS {args.patch_gradient_min_channels or 'default'}: "
      f"{seconds / args.steps * 1e3:.1f} ms a traced step, executor {events[_EXECUTOR]:.1f} ms, "
      f"operations' events {traced:.1f} ms"
  )
  print_table("layer (fwd: forward pass, bwd: its transpose)", by_layer, args.top)
  print_table("kind of operation", by_kind, args.top)
  print_table("operation", by_instruction, args.top)


if __name__ == "__main__":
  host_memory.restart_with_huge_pages()  # As adam_face.main runs, for both sides.
  main()
