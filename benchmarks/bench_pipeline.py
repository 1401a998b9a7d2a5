"""How many training images per second the input pipeline delivers, and whether it keeps up.

Default: synthetic_faces (built first if needed) at the demo's batch (64) and image size (64), with
random flips; a second row adds colour jitter, and the ratio of the two rates is reported from the
same run.

In the same run, the train step of configs/demo.py (tiny backbone, the demo's loss, optimiser and
dataset, at --batch_size and --image_size; adam_face's jitted step from
benchmarks/bench_train_step.py) is timed on a batch already on the device (the rate it consumes
images at), then fed by the demo's pipeline as train.py feeds it, both sharing the CPU as in
training. The pipeline keeps up when the fed step runs at >= 90% of the step alone; the ratio
pipeline / step says by how much the pipeline alone out- or under-runs the step alone.

  python benchmarks/bench_pipeline.py [--batch_size 64] [--image_size 64] [--out /tmp/...json]
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adam_face import config_lib, data_builders, train_input  # noqa: E402
from benchmarks.bench_train_step import AdamFaceStep  # noqa: E402
from configs import demo  # noqa: E402

KEEPS_UP_FRACTION = 0.9  # Fed step rate / step-alone rate at or above which the pipeline keeps up.


def measure_pipeline_rate(
    dataset_config,
    *,
    global_batch_size: int,
    num_batches: int = 100,
    warmup_batches: int = 10,
    seed: int = 0,
) -> dict:
  """Images per second from create_train_iterator, after warmup_batches (which also fill the
  shuffle buffer and start the prefetching threads).

  Returns:
    {'images_per_second', 'seconds', 'num_batches', 'global_batch_size'}.
  """
  iterator = train_input.create_train_iterator(
      dataset_config, global_batch_size=global_batch_size, seed=seed
  )
  for _ in range(warmup_batches):
    next(iterator)
  start = time.perf_counter()
  for _ in range(num_batches):
    next(iterator)
  seconds = time.perf_counter() - start
  return {
      "images_per_second": num_batches * global_batch_size / seconds,
      "seconds": seconds,
      "num_batches": num_batches,
      "global_batch_size": global_batch_size,
  }


def measure_step_rates(config, *, steps: int = 5, rounds: int = 3) -> dict:
  """Images/s of `config`'s train step alone, then fed by its pipeline (median of the rounds).

  All rounds alone come first: once the pipeline exists, its threads refill their prefetch
  buffers during any step, which would be counted against the step "alone". One untimed step
  of each kind (the first also compiles) comes before its rounds.
  """
  batch_size = config.global_batch_size
  num_classes = data_builders.dataset_info(config.dataset)["num_classes"]
  step = AdamFaceStep(config, num_classes)
  compile_seconds = step.compile()
  step.run(1)
  alone = [steps * batch_size / step.run(steps) for _ in range(rounds)]
  batches = train_input.create_train_iterator(
      config.dataset, global_batch_size=batch_size, seed=config.seed
  )
  step.run(1, batches)  # Also fills the shuffle buffer.
  fed = [steps * batch_size / step.run(steps, batches) for _ in range(rounds)]
  return {
      "model": config.model.name,
      "loss": config.loss.kind,
      "num_classes": num_classes,
      "global_batch_size": batch_size,
      "image_size": config.dataset.image_size,
      "steps_per_round": steps,
      "compile_seconds": compile_seconds,
      "step_images_per_second": statistics.median(alone),
      "fed_step_images_per_second": statistics.median(fed),
      "step_rounds": alone,
      "fed_step_rounds": fed,
  }


def main() -> None:
  demo_config = demo.get_config()
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dataset", default=demo_config.dataset.name)
  parser.add_argument("--data_dir", default=None, help="TFDS data dir (default: TFDS's)")
  parser.add_argument("--image_size", type=int, default=demo_config.dataset.image_size)
  parser.add_argument("--batch_size", type=int, default=demo_config.global_batch_size)
  parser.add_argument("--num_batches", type=int, default=100)
  parser.add_argument(
      "--step_rounds",
      type=int,
      default=3,
      help="rounds of the train step alone, and as many fed by the pipeline",
  )
  parser.add_argument("--steps_per_round", type=int, default=5)
  parser.add_argument("--out", default="/tmp/bench_pipeline.json")
  args = parser.parse_args()

  variants = {
      "flip": {"flip": True, "brightness": 0.0, "contrast": 0.0, "saturation": 0.0},
      "flip+colour": {"flip": True, "brightness": 0.2, "contrast": 0.2, "saturation": 0.2},
  }
  rows = []
  for augmentation, augment in variants.items():
    config = config_lib.default_dataset_config(
        name=args.dataset, data_dir=args.data_dir, image_size=args.image_size, augment=augment
    )
    result = measure_pipeline_rate(
        config, global_batch_size=args.batch_size, num_batches=args.num_batches
    )
    rows.append(
        {
            "dataset": args.dataset,
            "image_size": args.image_size,
            "augmentation": augmentation,
            **result,
        }
    )
  ratio = rows[1]["images_per_second"] / rows[0]["images_per_second"]

  demo_config.dataset.name = args.dataset
  demo_config.dataset.data_dir = args.data_dir or ""
  demo_config.dataset.image_size = args.image_size
  demo_config.global_batch_size = args.batch_size
  step = measure_step_rates(demo_config, steps=args.steps_per_round, rounds=args.step_rounds)
  # The demo trains with flips only: the first row is the pipeline it runs.
  step["pipeline_to_step"] = rows[0]["images_per_second"] / step["step_images_per_second"]
  step["fed_to_alone"] = step["fed_step_images_per_second"] / step["step_images_per_second"]
  step["keeps_up"] = step["fed_to_alone"] >= KEEPS_UP_FRACTION

  print(
      f"{'dataset':<18}{'size':>6}{'batch':>7}  {'augmentation':<13}{'images/s':>10}"
      f"{'ms/batch':>10}"
  )
  for row in rows:
    print(
        f"{row['dataset']:<18}{row['image_size']:>6}{row['global_batch_size']:>7}  "
        f"{row['augmentation']:<13}{row['images_per_second']:>10.0f}"
        f"{1000 * row['seconds'] / row['num_batches']:>10.1f}"
    )
  print(f"rate with colour jitter / flip only: {ratio:.2f}")
  print(
      f"train step of configs/demo.py ({step['model']}, {step['loss']}, {step['num_classes']} "
      f"classes, batch {args.batch_size}, {args.image_size}x{args.image_size}; median of "
      f"{args.step_rounds} rounds of {args.steps_per_round} steps):"
  )
  print(
      f"  consumes {step['step_images_per_second']:.0f} images/s on a batch already on device; "
      f"pipeline (flip) / step = {step['pipeline_to_step']:.2f}"
  )
  print(
      f"  fed by the pipeline: {step['fed_step_images_per_second']:.0f} images/s = "
      f"{100 * step['fed_to_alone']:.0f}% of the step alone -> the input pipeline "
      + ("keeps up" if step["keeps_up"] else "does NOT keep up (the step waits for data)")
  )
  report = {
      "machine": platform.platform(),
      "processor": platform.processor(),
      "cpu_count": os.cpu_count(),
      "rows": rows,
      "ratio_colour_to_flip": ratio,
      "train_step": step,
  }
  with open(args.out, "w") as f:
    json.dump(report, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
