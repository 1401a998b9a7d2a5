"""Embeds face photos with a trained model into an .npz of L2-normalised embeddings.

  python -m adam_face.embed --model=/tmp/run --images=/data/faces --out=faces.npz
  python -m adam_face.embed --model=/tmp/r50 --images=list.txt --landmarks=points.txt --out=e.npz
  python -m adam_face.embed --model=/tmp/r50 --images=photos/ --faces=skip_multiple --out=e.npz

--model is a model path as model_dir.load takes it: a model directory, or a training workdir (its
latest checkpoint, or --step). --images, repeatable, is a folder (every image file under it, in
natural order: 's2' before 's10'), a list file (one image path a line, relative to the list's
folder) or an image file (any name ending in datasets/images.py's IMAGE_EXTENSIONS).

The network only knows aligned faces: the 112x112 ArcFace crop (datasets/alignment.py), read at
the model's input size. An image is used
  * with landmarks (--landmarks): warped onto the ArcFace template at 112x112, as the
    vggface2/folder builder aligns the raw VGGFace2 photos;
  * without, when it is 112x112 or the model's input size: as it is (an aligned crop);
  * without, of any other size: with --resize, resized whole as training resizes it (for crops
    aligned at another scale, or a model trained on unaligned faces such as ORL's); otherwise as a
    photo: the face detector (adam_face/face_detector.py: MTCNN, faces of 20 pixels or more) finds
    its faces with their five landmarks, and the face is warped onto the template as with
    --landmarks. A photo without a face is unusable; of several faces, --faces=largest (default)
    takes the one with the largest box and logs the file and the count, --faces=skip_multiple
    finds the photo unusable.

A photo is read as a viewer shows it, its EXIF orientation applied (datasets/images.py: upright;
as OpenCV's imread, which insightface reads photos with), and landmarks are in those coordinates.
Pixels are those of training and verification: pillow reads and checks each file and converts
what TensorFlow cannot decode as the dataset builders do (datasets/images.py), then the
verification sets' decoding (train_input.decode_image at the model's input size, rounded to
uint8) reads it, so a threshold found on a verification set applies to these embeddings.

--landmarks, in either of two formats:
  insightface's: a line per image, `path x1 y1 x2 y2 ... x5 y5` (left eye, right eye, nose tip,
    left and right mouth corners, in pixels), the path relative to the landmarks file's folder;
  VGGFace2's bb_landmark/loose_landmark_*.csv: the header NAME_ID,P1X,P1Y,...,P5X,P5Y, then rows
    named <folder>/<file name without extension> (n000002/0001_01), matched to each image's
    folder and stem.
An image without a row is treated as if no landmarks were given.

An unusable image (unreadable, undecodable, a photo without a face, or with several under
--faces=skip_multiple) is one line naming the file and the fix: --on_error=fail (default) stops
there; --on_error=skip logs it, leaves it out and lists it in the output's `skipped`.

The output (.npz): `embeddings` float32 [N, D] ([N, 2D] with --flip=concat), rows of unit norm;
`paths` str [N], the images embedded, in order (a list's entries joined to its folder);
`skipped` str [K], the images left out. The flip mode (--flip; default: the workdir config's
verification.flip, else sum) must match the one of any threshold these embeddings meet.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import sys
import time
from collections.abc import Callable, Sequence

from absl import app, flags, logging
import numpy as np
import tensorflow as tf
import tqdm

from adam_face import classifier
from adam_face import embedding
from adam_face import errors
from adam_face import face_detector
from adam_face import model_dir
from adam_face import verification_sets
from datasets import alignment
from datasets import face_identity
from datasets import images
from datasets import vggface2

FLAGS = flags.FLAGS
# The side of the aligned crops: the ArcFace template's and the insightface releases'.
ALIGNED_SIZE = face_identity.IMAGE_SIZE
# Batches read ahead and embedded at a time: bounds memory (a 112x112 image is 37 KB) while the
# next chunk is read during this one's embedding; also the progress bar's step.
_CHUNK_BATCHES = 8
_PER_DEVICE_BATCH = 32
# --faces: what a photo where the detector finds several faces gives.
FACE_CHOICES = ("largest", "skip_multiple")

Landmarks = Callable[[str], np.ndarray | None]


class UnusableImageError(errors.RunError):
  """An image that cannot be embedded; the message names the file and the fix."""


def load_model(path: str, step: int | None = None) -> model_dir.Model:
  """model_dir.load, with its errors (no model there, mismatched variables) as one line."""
  try:
    return model_dir.load(path, step)
  except (FileNotFoundError, ValueError) as e:
    raise errors.RunError(str(e)) from e


def recorded_flip(directory: str) -> str | None:
  """The flip mode of the verification runs of a training workdir (its config.json), or None
  where none is recorded (a model directory: evaluate scores those with the default, sum)."""
  config_path = os.path.join(directory, "config.json")
  if not os.path.exists(config_path):
    return None
  with open(config_path) as f:
    return json.load(f)["verification"]["flip"]


def list_images(entries: Sequence[str]) -> list[str]:
  """The image paths that --images entries name (see the module docstring), in order."""
  paths = []
  for entry in entries:
    if os.path.isdir(entry):
      found = [
          os.path.relpath(os.path.join(folder, name), entry)
          for folder, _, names in os.walk(entry)
          for name in names
          if images.is_image_file(name)
      ]
      if not found:
        raise errors.RunError(f"--images={entry} is a folder without image files in it.")
      found.sort(key=lambda p: images.natural_key(pathlib.Path(p).as_posix()))
      paths += [os.path.join(entry, p) for p in found]
    elif images.is_image_file(entry):
      if not os.path.isfile(entry):
        raise errors.RunError(f"--images={entry}: no such image file.")
      paths.append(entry)
    elif os.path.isfile(entry):
      with open(entry) as f:
        lines = [line.strip() for line in f]
      paths += [os.path.join(os.path.dirname(entry), line) for line in lines if line]
    else:
      raise errors.RunError(
          f"--images={entry}: no such folder or file; pass a folder, a list file or an image."
      )
  if not paths:
    raise errors.RunError(f"--images={','.join(entries)} names no images.")
  return paths


def read_landmarks(path: str) -> Landmarks:
  """A lookup image path -> [5, 2] (x, y) landmarks or None, from either --landmarks format."""
  if not os.path.isfile(path):
    raise errors.RunError(f"--landmarks={path}: no such file.")
  with open(path) as f:
    is_vggface2 = f.readline().startswith("NAME_ID")
  if is_vggface2:
    try:
      table = vggface2.LandmarkTable(pathlib.Path(path))
    except ValueError as e:
      raise errors.RunError(str(e)) from e

    def vggface2_lookup(image: str) -> np.ndarray | None:
      image = pathlib.Path(image)
      return table.get(f"{image.parent.name}/{image.stem}")

    return vggface2_lookup
  points = {}
  with open(path) as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      # The path may hold spaces; the ten coordinates close the line.
      fields = line.rsplit(maxsplit=10)
      try:
        coordinates = np.array([float(v) for v in fields[1:]], np.float64).reshape(5, 2)
      except ValueError as e:
        raise errors.RunError(
            f"{path}:{line_number}: expected `path x1 y1 ... x5 y5` (a path and 10 numbers), got "
            f"{line.strip()!r}."
        ) from e
      image = os.path.join(os.path.dirname(path), fields[0])
      points[os.path.abspath(image)] = coordinates
  return lambda image: points.get(os.path.abspath(image))


def detected_landmarks(path: str, image, image_size: int, faces: str = "largest") -> np.ndarray:
  """The [5, 2] landmarks of the face the detector finds in the photo `image` (of the file
  `path`): its only face, or by `faces` (FACE_CHOICES) the largest of several or none;
  UnusableImageError where there is no face to use."""
  found = face_detector.detect(image)
  if not len(found):
    width, height = image.size
    raise UnusableImageError(
        f"{path}: {width}x{height} is not an aligned face crop ({ALIGNED_SIZE}x{ALIGNED_SIZE} or "
        f"{image_size}x{image_size}) and has no landmarks, and no face found in it (faces of "
        f"{face_detector.MIN_FACE_SIZE} pixels or more); give its five landmarks with "
        "--landmarks, or --resize to use it resized whole."
    )
  if len(found) > 1:
    if faces == "skip_multiple":
      raise UnusableImageError(
          f"{path}: {len(found)} faces found (--faces=skip_multiple); crop it to one face, give "
          "that face's landmarks with --landmarks, or pass --faces=largest."
      )
    largest = found.largest()
    logging.warning(
        "%s: %d faces found; using the largest, box (%s).",
        path,
        len(found),
        ", ".join(f"{v:.0f}" for v in found.boxes[largest]),
    )
    return found.landmarks[largest]
  return found.landmarks[0]


def image_bytes(
    path: str,
    image_size: int,
    landmarks: Landmarks | None = None,
    resize: bool = False,
    faces: str = "largest",
) -> bytes:
  """The bytes train_input.decode_image reads for `path`: the file itself or a PNG of it, aligned
  with its landmarks when it has them, else with the detected ones when it is a photo (not an
  aligned crop, and no --resize); UnusableImageError if it cannot be used."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise UnusableImageError(f"{path}: cannot read it ({e.strerror}); fix the path.") from e
  try:
    image = images.upright(images.decode(data, path))
  except images.UndecodableImageError as e:
    raise UnusableImageError(f"{e}; replace the file or leave it out.") from e
  points = landmarks(path) if landmarks else None
  if points is None:
    if resize or image.size in ((ALIGNED_SIZE, ALIGNED_SIZE), (image_size, image_size)):
      return images.storable_bytes(data, image)
    points = detected_landmarks(path, image, image_size, faces)
  # Aligned at the template's own size, then resized by decode_image as training resizes the
  # aligned 112x112 crops to smaller inputs. PNG keeps the crop's pixels exactly.
  return images.encode_png(alignment.align_face(image, points, ALIGNED_SIZE))


def decode_uint8(encoded: Sequence[bytes], image_size: int) -> np.ndarray:
  """uint8 [N, S, S, 3] of image_bytes' outputs, exactly as the verification sets decode."""
  ds = tf.data.Dataset.from_tensor_slices({"image": tf.constant(list(encoded), tf.string)})
  # The verification sets' own decoding, so their thresholds hold for these images.
  decoded = verification_sets.decoded_uint8(ds, ("image",), image_size, ())
  return decoded["image"]


def embed_images(
    model: model_dir.Model,
    paths: Sequence[str],
    *,
    flip: str,
    batch_size: int | None = None,
    landmarks: Landmarks | None = None,
    resize: bool = False,
    faces: str = "largest",
    on_error: str = "fail",
) -> tuple[np.ndarray, list[str], list[str]]:
  """(embeddings float32 [N, D], the N paths embedded, the paths skipped) of the images at
  `paths`, read by image_bytes and embedded by embedding.compute_embeddings over every device.

  on_error: 'fail' raises the first UnusableImageError; 'skip' logs and skips each.
  """
  mesh = classifier.create_mesh()
  # By default no more than the images need: verify's two fill one row a device.
  batch_size = batch_size or mesh.size * min(_PER_DEVICE_BATCH, -(-len(paths) // mesh.size))
  if batch_size <= 0 or batch_size % mesh.size:
    raise errors.RunError(
        f"--batch_size={batch_size} must be a positive multiple of the {mesh.size} devices."
    )
  chunk = batch_size * _CHUNK_BATCHES
  chunks = [paths[start : start + chunk] for start in range(0, len(paths), chunk)]

  def read(path):
    try:
      return image_bytes(path, model.image_size, landmarks, resize, faces)
    except UnusableImageError as e:
      return e

  # Taken once: each access makes a new function, which jit would compile again.
  embed_fn = model.embed_fn
  outputs, kept, skipped = [], [], []
  started = time.perf_counter()
  with (
      concurrent.futures.ThreadPoolExecutor() as pool,
      tqdm.tqdm(total=len(paths), unit="image", disable=len(chunks) == 1) as progress,
  ):
    pending = pool.map(read, chunks[0])
    for i, chunk_paths in enumerate(chunks):
      read_chunk = list(pending)
      if i + 1 < len(chunks):  # Read the next chunk while this one is embedded.
        pending = pool.map(read, chunks[i + 1])
      encoded = []
      for path, result in zip(chunk_paths, read_chunk):
        if isinstance(result, UnusableImageError):
          if on_error == "fail":
            raise result
          logging.warning("Skipping an unusable image: %s", result)
          skipped.append(path)
        else:
          encoded.append(result)
          kept.append(path)
      if encoded:
        outputs.append(
            embedding.compute_embeddings(
                embed_fn,
                decode_uint8(encoded, model.image_size),
                batch_size=batch_size,
                mesh=mesh,
                flip=flip,
            )
        )
      progress.update(len(chunk_paths))
  if not kept:
    raise errors.RunError(
        f"none of the {len(paths)} images could be used (first: {skipped[0]}); see the log."
    )
  logging.info(
      "Embedded %d images (%d skipped) in %.1f s.",
      len(kept),
      len(skipped),
      time.perf_counter() - started,
  )
  return np.concatenate(outputs), kept, skipped


def embed_to_file(
    model_path: str,
    image_entries: Sequence[str],
    out: str,
    *,
    step: int | None = None,
    landmarks_path: str | None = None,
    flip: str | None = None,
    resize: bool = False,
    faces: str = "largest",
    on_error: str = "fail",
    batch_size: int | None = None,
) -> dict[str, np.ndarray]:
  """What `python -m adam_face.embed` does (see the module docstring); returns what it wrote."""
  model = load_model(model_path, step)
  embeddings, kept, skipped = embed_images(
      model,
      list_images(image_entries),
      flip=flip or recorded_flip(model_path) or "sum",
      batch_size=batch_size,
      landmarks=read_landmarks(landmarks_path) if landmarks_path else None,
      resize=resize,
      faces=faces,
      on_error=on_error,
  )
  # str arrays, even when empty: np.load reads them back without pickle.
  written = {
      "embeddings": embeddings,
      "paths": np.array(kept, dtype=str),
      "skipped": np.array(skipped, dtype=str),
  }
  np.savez(out, **written)
  if skipped:
    logging.warning(
        "Skipped %d unusable images (listed in %s under 'skipped'; the log says why).",
        len(skipped),
        out,
    )
  return written


def define_image_flags() -> None:
  """The flags of how images are read, which verify.py shares."""
  flags.DEFINE_string(
      "landmarks",
      None,
      "Five landmarks per image: lines `path x1 y1 ... x5 y5`, or a VGGFace2 loose_landmark csv.",
  )
  flags.DEFINE_enum(
      "flip",
      None,
      embedding.FLIP_MODES,
      "Flip test; default: the workdir config's verification.flip, else sum.",
  )
  flags.DEFINE_bool(
      "resize",
      False,
      "Resize images of any size to the model's input, not only 112x112 ones (aspect not kept).",
  )
  flags.DEFINE_enum(
      "faces",
      "largest",
      FACE_CHOICES,
      "A photo in which the face detector finds several faces: use the largest, or skip it.",
  )


def define_embed_flags():
  flags.DEFINE_multi_string(
      "images", None, "A folder, a list file (a path a line) or an image file; repeatable."
  )
  flags.DEFINE_string("out", None, "The .npz to write: embeddings, paths, skipped.")
  flags.DEFINE_enum(
      "on_error", "fail", ["fail", "skip"], "An unusable image: stop, or skip and list it."
  )
  flags.DEFINE_integer(
      "batch_size",
      None,
      "Images per batch, a multiple of the device count; default <= 32 a device.",
  )
  flags.mark_flags_as_required(["images", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    written = embed_to_file(
        FLAGS.model,
        FLAGS.images,
        FLAGS.out,
        step=FLAGS.step,
        landmarks_path=FLAGS.landmarks,
        flip=FLAGS.flip,
        resize=FLAGS.resize,
        faces=FLAGS.faces,
        on_error=FLAGS.on_error,
        batch_size=FLAGS.batch_size,
    )
  except UnusableImageError as e:
    sys.exit(f"FATAL: {e} Or pass --on_error=skip to leave such images out.")
  except errors.RunError as e:
    sys.exit(f"FATAL: {e}")
  print(f"{FLAGS.out}: {len(written['paths'])} embeddings, {len(written['skipped'])} skipped")


if __name__ == "__main__":
  model_dir.define_model_flags()
  define_image_flags()
  define_embed_flags()
  app.run(main)
