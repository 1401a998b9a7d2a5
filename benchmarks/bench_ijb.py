"""Benchmark: IJB-C evaluation at its real sizes (adam_face/ijb.py, adam_face/template_metrics.py).

Two parts, each printed with the CPU model and the devices:

* Faces: --faces synthetic loose crops (250x250 JPEGs, a smooth random face-sized patch at a
  random place with its five landmarks) in insightface's IJB layout, aligned into the cache
  (faces/s, this machine's threads), then embedded by --model at 112x112 with the flip test on
  every host device (images/s). IJB-C's 469,375 faces take about 469,375 / rate seconds.
* Scoring, with random 512-d face embeddings at IJB-C's sizes: 469,375 faces in 23,124 templates
  (media of 1 to 8 frames), 15,658,489 template pairs (19,557 genuine, as IJB-C's 1:1 list), 1:N
  with galleries of 1,772 and 1,759 templates and 19,593 probe templates: the times of template
  pooling, pair scoring, the 1:1 metrics and the 1:N search and metrics. The issue's bar: seconds,
  not minutes, on this CPU.

  python -m benchmarks.bench_ijb [--faces 2000] [--model iresnet50] [--skip_faces]
"""

import argparse
import os
import tempfile
import time

import numpy as np

from benchmarks import machine

# IJB-C's sizes (insightface's IJB release meta files).
NUM_FACES = 469_375
NUM_TEMPLATES = 23_124
NUM_PAIRS = 15_658_489
NUM_GENUINE = 19_557
GALLERY_SIZES = {"G1": 1_772, "G2": 1_759}
NUM_PROBES = 19_593
DIM = 512


def _timed(label, fn, *args, **kwargs):
  started = time.perf_counter()
  out = fn(*args, **kwargs)
  print(f"  {label:<38} {time.perf_counter() - started:8.2f} s", flush=True)
  return out


def bench_scoring(mesh):
  from adam_face import template_metrics  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  print(
      f"scoring at IJB-C's sizes: {NUM_FACES:,} faces, {NUM_TEMPLATES:,} templates, "
      f"{NUM_PAIRS:,} pairs, galleries {GALLERY_SIZES}, {NUM_PROBES:,} probes"
  )
  # Subjects own a few templates each; a template's faces share its subject's centre.
  subject_of_template = rng.integers(0, NUM_TEMPLATES // 6, NUM_TEMPLATES)
  templates = np.sort(rng.integers(0, NUM_TEMPLATES, NUM_FACES))
  templates[:NUM_TEMPLATES] = np.arange(NUM_TEMPLATES)  # Every template has a face.
  media = templates * 16 + rng.integers(0, 8, NUM_FACES)
  centres = rng.standard_normal((NUM_TEMPLATES // 6 + 1, DIM), dtype=np.float32)
  features = centres[subject_of_template[templates]]
  features += 2 * rng.standard_normal((NUM_FACES, DIM), dtype=np.float32)
  features /= np.linalg.norm(features, axis=1, keepdims=True)
  weights = rng.uniform(0.5, 1.0, NUM_FACES)

  first = rng.integers(0, NUM_TEMPLATES, NUM_PAIRS)
  second = rng.integers(0, NUM_TEMPLATES, NUM_PAIRS)
  same_subject = np.flatnonzero(subject_of_template[first] == subject_of_template[second])
  is_same = np.zeros(NUM_PAIRS, bool)
  is_same[same_subject[:NUM_GENUINE]] = True
  probes = rng.choice(NUM_TEMPLATES, NUM_PROBES, replace=False)
  galleries = {
      name: rng.choice(NUM_TEMPLATES, size, replace=False) for name, size in GALLERY_SIZES.items()
  }
  # The first pass includes compiling each program; the second is what a further evaluation costs.
  for attempt in ("first run, compiling", "second run"):
    print(f" {attempt}:")
    pooled = _timed(
        "pool 469,375 faces into templates",
        template_metrics.pool_templates,
        features,
        weights,
        templates,
        media,
    )
    scores = _timed(
        "score 15,658,489 template pairs", template_metrics.pair_scores, pooled, first, second, mesh
    )
    metrics, _ = _timed(
        "1:1 metrics (6 FARs, ROC, AUC)", template_metrics.one_to_one_metrics, scores, is_same
    )
    started = time.perf_counter()
    for gallery in galleries.values():
      row_of_subject = {s: i for i, s in enumerate(subject_of_template[gallery])}
      mated_row = np.array([row_of_subject.get(s, -1) for s in subject_of_template[probes]])
      result = template_metrics.search_gallery(
          pooled.features[probes], pooled.features[gallery], mated_row, mesh
      )
      template_metrics.one_to_n_metrics(result)
    print(
        f"  {'1:N search and metrics, both galleries':<38} {time.perf_counter() - started:8.2f} s"
    )
    started = time.perf_counter()
    joined = np.concatenate(list(galleries.values()))
    row_of_subject = {s: i for i, s in enumerate(subject_of_template[joined])}
    mated_row = np.array([row_of_subject.get(s, -1) for s in subject_of_template[probes]])
    template_metrics.insightface_identification(
        pooled.features[probes], pooled.features[joined], mated_row, mesh
    )
    print(f"  {'1:N, insightface (galleries joined)':<38} {time.perf_counter() - started:8.2f} s")
  print("  TAR@FAR=1e-4 of this random set:", f"{metrics['tar@far=1e-4']:.4f}")


def bench_faces(mesh, num_faces, model_name):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  from adam_face import ijb, models  # pylint: disable=g-import-not-at-top
  from datasets import alignment  # pylint: disable=g-import-not-at-top
  from datasets import ijb as ijb_layout  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(1)
  with tempfile.TemporaryDirectory() as root:
    crops, meta = os.path.join(root, "IJBC", "loose_crop"), os.path.join(root, "IJBC", "meta")
    os.makedirs(crops)
    os.makedirs(meta)
    face_rows, landmark_rows = [], []
    patch = Image.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8)).resize((112, 112))
    for i in range(num_faces):
      photo = Image.fromarray(np.full((250, 250, 3), 128, np.uint8))
      offset = rng.integers(0, 138, 2)
      photo.paste(patch, tuple(offset))
      photo.save(os.path.join(crops, f"{i}.jpg"), quality=90)
      points = alignment.ARCFACE_TEMPLATE_112 + offset
      face_rows.append(f"{i}.jpg {i // 4} {i // 2}")
      landmark_rows.append(f"{i}.jpg " + " ".join(f"{v:.2f}" for v in points.ravel()) + " 0.9")
    for name, rows in (("face_tid_mid", face_rows), ("name_5pts_score", landmark_rows)):
      with open(os.path.join(meta, f"ijbc_{name}.txt"), "w") as f:
        f.write("\n".join(rows) + "\n")
    with open(os.path.join(meta, "ijbc_template_pair_label.txt"), "w") as f:
      f.write("0 1 1\n")
    protocol = ijb_layout.read_protocol(root, "ijbc")

    print(f"faces: {num_faces} synthetic 250x250 loose crops")
    faces = ijb.AlignedFaces(protocol, os.path.join(root, "cache"))
    print(f"  align into the cache: {faces.faces_per_second:8.1f} faces/s")
    model = models.create_model(model_name, embedding_dim=DIM)
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(
        jnp.zeros((1, 112, 112, 3))
    )
    embed_fn = jax.tree_util.Partial(lambda v, x: model.apply(v, x, train=False), variables)
    options = ijb.IJBOptions(root=root, cache_dir="")
    batch = 8 * mesh.size
    # The first call compiles; the second is the one timed.
    ijb.face_features(
        faces, embed_fn, image_size=112, batch_size=batch, mesh=mesh, flip="sum", options=options
    )
    _, _, images_per_second = ijb.face_features(
        faces, embed_fn, image_size=112, batch_size=batch, mesh=mesh, flip="sum", options=options
    )
    print(f"  embed {model_name}, flip test:  {images_per_second:8.1f} images/s (batch {batch})")
    print(
        f"  IJB-C's {NUM_FACES:,} faces: align about {NUM_FACES / faces.faces_per_second / 60:.0f}"
        f" min, embed about {NUM_FACES / images_per_second / 60:.0f} min on this machine"
    )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--faces", type=int, default=2000)
  parser.add_argument("--model", default="iresnet50")
  parser.add_argument("--skip_faces", action="store_true")
  args = parser.parse_args()
  import jax  # pylint: disable=g-import-not-at-top

  from adam_face import classifier  # pylint: disable=g-import-not-at-top

  mesh = classifier.create_mesh()
  print(f"CPU: {machine.cpu_model()}, {os.cpu_count()} threads; devices: {jax.devices()}")
  bench_scoring(mesh)
  if not args.skip_faces:
    bench_faces(mesh, args.faces, args.model)


if __name__ == "__main__":
  main()
