"""How many training images per second the input pipeline delivers on this machine.

Default: synthetic_faces (built first if needed), 112x112, batch 64, with random flips; a second
row adds colour jitter, and the ratio of the two rates is reported from the same run. The lead's
train-step benchmark compares measure_pipeline_rate() against the rate the train step consumes.

  python benchmarks/bench_pipeline.py [--batch_size 64] [--image_size 112] [--out /tmp/...json]
"""

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adam_face import input_pipeline  # noqa: E402


def measure_pipeline_rate(dataset_config, *, global_batch_size: int, num_batches: int = 100,
                          warmup_batches: int = 10, seed: int = 0) -> dict:
    """Images per second from create_train_iterator, after warmup_batches (which also fill the
    shuffle buffer and start the prefetching threads).

    Returns:
      {'images_per_second', 'seconds', 'num_batches', 'global_batch_size'}.
    """
    iterator = input_pipeline.create_train_iterator(dataset_config,
                                                    global_batch_size=global_batch_size, seed=seed)
    for _ in range(warmup_batches):
        next(iterator)
    start = time.perf_counter()
    for _ in range(num_batches):
        next(iterator)
    seconds = time.perf_counter() - start
    return {"images_per_second": num_batches * global_batch_size / seconds, "seconds": seconds,
            "num_batches": num_batches, "global_batch_size": global_batch_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="synthetic_faces")
    parser.add_argument("--data_dir", default=None, help="TFDS data dir (default: TFDS's)")
    parser.add_argument("--image_size", type=int, default=112)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_batches", type=int, default=100)
    parser.add_argument("--out", default="/tmp/bench_pipeline.json")
    args = parser.parse_args()

    variants = {
        "flip": {"flip": True, "brightness": 0.0, "contrast": 0.0, "saturation": 0.0},
        "flip+colour": {"flip": True, "brightness": 0.2, "contrast": 0.2, "saturation": 0.2},
    }
    rows = []
    for augmentation, augment in variants.items():
        config = input_pipeline.default_dataset_config(
            name=args.dataset, data_dir=args.data_dir, image_size=args.image_size, augment=augment)
        result = measure_pipeline_rate(config, global_batch_size=args.batch_size,
                                       num_batches=args.num_batches)
        rows.append({"dataset": args.dataset, "image_size": args.image_size,
                     "augmentation": augmentation, **result})

    ratio = rows[1]["images_per_second"] / rows[0]["images_per_second"]
    print(f"{'dataset':<18}{'size':>6}{'batch':>7}  {'augmentation':<13}{'images/s':>10}"
          f"{'ms/batch':>10}")
    for row in rows:
        print(f"{row['dataset']:<18}{row['image_size']:>6}{row['global_batch_size']:>7}  "
              f"{row['augmentation']:<13}{row['images_per_second']:>10.0f}"
              f"{1000 * row['seconds'] / row['num_batches']:>10.1f}")
    print(f"rate with colour jitter / flip only: {ratio:.2f}")
    report = {"machine": platform.platform(), "processor": platform.processor(),
              "cpu_count": os.cpu_count(), "rows": rows, "ratio_colour_to_flip": ratio}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
