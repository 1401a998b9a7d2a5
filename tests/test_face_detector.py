"""Tests of adam_face.face_detector (MTCNN on facenet-pytorch's weights) and of embed's use of it.

Real faces: the aligned LFW crops of ../shared/data/lfw_dev (conftest's lfw_dev_dir; the tests that
need them skip where it is absent), pasted into larger grey photos at a known place and scale.
Those crops were warped so that the landmarks facenet-pytorch's MTCNN found in the original photos
land on the ArcFace template, up to the least-squares fit's residual (2.8 px RMS at the median, 6.5
px at the 99th percentile, by the data's README), so the template, mapped into the photo, is where
the detector should put the landmarks, to within that residual.

The networks are compared with a PyTorch restatement of P-Net, R-Net and O-Net (written here from
their published layout: Caffe's ceil-mode pooling, PReLU, and the (W, H, C) flatten before the
dense layers) on the original weights where those can be read: $ADAM_FACE_FACENET_PYTORCH, a
facenet-pytorch wheel or its data folder, or an installed facenet_pytorch; otherwise on the
shipped weights turned back into PyTorch's layout. Both skip without torch.
"""

import importlib.util
import logging
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageOps

from adam_face import embed, face_detector
from fixtures_data import save_tiny_model
from datasets import alignment

GREY = (128, 128, 128)
CANVAS = (250, 250)
# (scale, top-left corner) of the pasted crops: 112 and 168 pixels, inside the 250x250 canvas.
PLACES = ((1.0, (60, 45)), (1.5, (40, 50)))
NUM_FACES = 20
# The landmark errors the tests accept, in pixels of the 112x112 crop, above what the test prints
# for these 20 faces (`pytest -s`: mean distance to the template 3.0 px at both scales, the largest
# 9.3 px, mean error -0.9 to -1.1 px in x and y). The crops themselves sit off the template by
# their least-squares fit's residual (the data's README), which bounds how close any detector can
# land.
MEAN_ERROR = 4.0
MAX_ERROR = 12.0
BIAS = 1.5
# Mirroring moves a landmark from x to width - x in pillow's coordinates: the test prints the mean
# offset on these 20 faces (0.15 px with `pytest -s`), where reading the landmarks as pixel centres
# would be 0.5 off.
MIRROR_ERROR = 0.3

IMAGE_SIZE = 32
BATCH_SIZE = 8  # One image a device of the 8-device mesh.


def _pasted(face: Image.Image, scale: float, corner, size=CANVAS) -> tuple[Image.Image, np.ndarray]:
  """(a grey photo with `face`, scaled, pasted at `corner`, where the template points lie in it).

  The template is in pixel-centre coordinates (OpenCV's, which aligned the crops): +0.5 gives
  pillow's, which scaling multiplies and pasting shifts.
  """
  photo = Image.new("RGB", size, GREY)
  side = round(face.width * scale)
  photo.paste(face if side == face.width else face.resize((side, side)), corner)
  return photo, (alignment.ARCFACE_TEMPLATE_112 + 0.5) * side / face.width + np.array(corner)


@pytest.fixture(scope="module")
def lfw_faces(lfw_dev_dir):
  """The first photo of each of the first NUM_FACES people, 112x112 aligned crops."""
  people = sorted(p for p in (lfw_dev_dir / "train").iterdir() if p.is_dir())[:NUM_FACES]
  return [Image.open(sorted(p.glob("*.jpg"))[0]).convert("RGB") for p in people]


@pytest.fixture(scope="module")
def detections(lfw_faces):
  """{(scale, mirrored): [(faces found, the template points in the photo, photo width)]}."""
  found = {}
  for face in lfw_faces:
    for scale, corner in PLACES:
      photo, points = _pasted(face, scale, corner)
      found.setdefault((scale, False), []).append(
          (face_detector.detect(photo), points, photo.width)
      )
      if scale == 1.0:
        found.setdefault((scale, True), []).append(
            (face_detector.detect(ImageOps.mirror(photo)), points, photo.width)
        )
  return found


@pytest.mark.parametrize("scale", [scale for scale, _ in PLACES])
def test_real_faces_are_found_once_with_their_landmarks_on_the_template(detections, scale):
  errors = []
  for faces, points, _ in detections[scale, False]:
    assert len(faces) == 1
    assert faces.scores[0] > 0.9
    errors.append((faces.landmarks[0] - points) / scale)  # In pixels of the crop.
  errors = np.array(errors)
  distances = np.linalg.norm(errors, axis=2)
  print(
      f"scale {scale}: mean error {errors.mean((0, 1)).round(2)} px, distance mean "
      f"{distances.mean():.2f} max {distances.max():.2f}, per landmark {distances.mean(0).round(2)}"
  )
  assert distances.mean() < MEAN_ERROR
  assert distances.max() < MAX_ERROR
  assert np.all(np.abs(errors.mean((0, 1))) < BIAS)
  # Boxes hold their landmarks.
  for faces, _, _ in detections[scale, False]:
    (x1, y1, x2, y2), points = faces.boxes[0], faces.landmarks[0]
    assert np.all((points >= [x1, y1]) & (points <= [x2, y2]))


def test_landmarks_are_in_pillows_coordinates_mirroring_maps_x_to_width_minus_x(detections):
  offsets = []
  for (faces, _, width), (mirrored, _, _) in zip(detections[1.0, False], detections[1.0, True]):
    assert len(mirrored) == 1
    # Mirrored, the left eye is the right one: swap the eyes and the mouth corners back.
    x, x_mirrored = faces.landmarks[0, :, 0], mirrored.landmarks[0, [1, 0, 2, 4, 3], 0]
    offsets.append((x + x_mirrored - width) / 2)
  print(f"mirror offset: mean {np.mean(offsets):.3f} px")
  assert abs(np.mean(offsets)) < MIRROR_ERROR


def test_a_blank_or_noise_image_has_no_face():
  rng = np.random.default_rng(0)
  for image in (
      np.full((*CANVAS, 3), 128, np.uint8),
      rng.integers(0, 256, (*CANVAS, 3), dtype=np.uint8),
      np.zeros((15, 40, 3), np.uint8),  # Smaller than the smallest face: no pyramid level.
  ):
    faces = face_detector.detect(image)
    assert len(faces) == 0
    assert faces.boxes.shape == (0, 4) and faces.landmarks.shape == (0, 5, 2)


def _two_faces(lfw_faces) -> Image.Image:
  """The first face at 1.25x on the left, the second at 0.85x on the right."""
  photo, _ = _pasted(lfw_faces[0], 1.25, (5, 55))
  small = lfw_faces[1].resize((95, 95))
  photo.paste(small, (150, 80))
  return photo


def test_two_faces_are_two_detections_and_the_largest_is_the_bigger(lfw_faces):
  faces = face_detector.detect(_two_faces(lfw_faces))
  assert len(faces) == 2
  centres_x = (faces.boxes[:, 0] + faces.boxes[:, 2]) / 2
  assert centres_x[faces.largest()] < 125 < centres_x[1 - faces.largest()]


def test_nms_keeps_the_best_of_overlapping_boxes():
  boxes = np.array([[0, 0, 9, 9], [1, 1, 10, 10], [20, 20, 29, 29], [0, 0, 4, 4]], np.float64)
  scores = np.array([0.9, 0.5, 0.8, 0.7])
  # The first two overlap by 81 pixels: IoU 81 / 119 = 0.68, 0.81 of the smaller; the last lies
  # inside the first: IoU 25 / 100, 1 of the smaller.
  np.testing.assert_array_equal(face_detector.nms(boxes, scores, 0.7), [0, 2, 3, 1])
  np.testing.assert_array_equal(face_detector.nms(boxes, scores, 0.5), [0, 2, 3])
  np.testing.assert_array_equal(face_detector.nms(boxes, scores, 0.7, mode="min"), [0, 2])


# The networks against PyTorch.


def _weights_source() -> str | None:
  """facenet-pytorch's wheel or data folder, where one is at hand."""
  if os.environ.get("ADAM_FACE_FACENET_PYTORCH"):
    return os.environ["ADAM_FACE_FACENET_PYTORCH"]
  spec = importlib.util.find_spec("facenet_pytorch")
  if spec and spec.submodule_search_locations:
    return os.path.join(list(spec.submodule_search_locations)[0], "data")
  return None


@pytest.fixture(scope="module")
def torch_states():
  """{network: PyTorch state dict} of the original weights, or of the shipped ones turned back."""
  torch = pytest.importorskip("torch", reason="comparing with PyTorch needs torch")
  source = _weights_source()
  if source:
    states = face_detector.read_state_dicts(source)
  else:
    with np.load(face_detector.DEFAULT_WEIGHTS) as data:
      states = {}
      for key in data.files:
        network, _, layer, kind = key.split("/")
        value = data[key]
        if kind == "alpha":
          name = f"{layer}.weight"
        elif kind == "bias":
          name = f"{layer}.bias"
        else:
          name = f"{layer}.weight"
          value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        states.setdefault(network, {})[name] = value
  return {n: {k: torch.from_numpy(np.array(v)) for k, v in s.items()} for n, s in states.items()}


def _torch_forward(name: str, state: dict, x):
  """P-Net, R-Net or O-Net in PyTorch on NCHW input, from the published layout."""
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  def conv(x, layer):
    x = F.conv2d(x, state[f"{layer}.weight"], state[f"{layer}.bias"])
    return (
        F.prelu(x, state[f"prelu{layer[4:]}.weight"]) if f"prelu{layer[4:]}.weight" in state else x
    )

  def dense(x, layer, prelu=None):
    x = F.linear(x, state[f"{layer}.weight"], state[f"{layer}.bias"])
    return F.prelu(x, state[f"{prelu}.weight"]) if prelu else x

  def pool(x, size):
    return F.max_pool2d(x, size, 2, ceil_mode=True)

  if name == "pnet":
    x = conv(conv(pool(conv(x, "conv1"), 2), "conv2"), "conv3")
    probability = F.softmax(F.conv2d(x, state["conv4_1.weight"], state["conv4_1.bias"]), dim=1)
    offsets = F.conv2d(x, state["conv4_2.weight"], state["conv4_2.bias"])
    return probability[:, 1], offsets.permute(0, 2, 3, 1)
  if name == "rnet":
    x = conv(pool(conv(pool(conv(x, "conv1"), 3), "conv2"), 3), "conv3")
    x = dense(x.permute(0, 3, 2, 1).reshape(len(x), -1), "dense4", "prelu4")
    return F.softmax(dense(x, "dense5_1"), dim=1)[:, 1], dense(x, "dense5_2")
  x = pool(conv(pool(conv(pool(conv(x, "conv1"), 3), "conv2"), 3), "conv3"), 2)
  x = dense(conv(x, "conv4").permute(0, 3, 2, 1).reshape(len(x), -1), "dense5", "prelu5")
  return F.softmax(dense(x, "dense6_1"), dim=1)[:, 1], dense(x, "dense6_2"), dense(x, "dense6_3")


def test_the_flax_networks_compute_the_pytorch_ones(torch_states):
  import torch  # pylint: disable=g-import-not-at-top

  variables = face_detector.default_variables()
  rng = np.random.default_rng(0)
  # Odd sizes, so that the ceil-mode pooling has partial windows.
  for name, shape in (("pnet", (2, 41, 30, 3)), ("rnet", (5, 24, 24, 3)), ("onet", (5, 48, 48, 3))):
    x = rng.normal(size=shape).astype(np.float32)
    ours = face_detector.NETWORKS[name].apply(variables[name], jnp.asarray(x))
    with torch.no_grad():
      theirs = _torch_forward(name, torch_states[name], torch.from_numpy(x).permute(0, 3, 1, 2))
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
      np.testing.assert_allclose(np.asarray(a), b.numpy(), atol=1e-5, err_msg=name)

  # P-Net on an image padded below and right, told the image's size: the same outputs.
  x = rng.normal(size=(1, 41, 30, 3)).astype(np.float32)
  padded = np.zeros((1, 64, 64, 3), np.float32)
  padded[:, :41, :30] = x
  probability, offsets = face_detector.NETWORKS["pnet"].apply(
      variables["pnet"], jnp.asarray(padded), jnp.array([41, 30])
  )
  with torch.no_grad():
    expected = _torch_forward("pnet", torch_states["pnet"], torch.from_numpy(x).permute(0, 3, 1, 2))
  rows, cols = expected[0].shape[1:]
  np.testing.assert_allclose(probability[:, :rows, :cols], expected[0].numpy(), atol=1e-5)
  np.testing.assert_allclose(offsets[:, :rows, :cols], expected[1].numpy(), atol=1e-5)


def test_conversion_writes_the_shipped_weights(tmp_path):
  pytest.importorskip("torch", reason="converting needs torch")
  source = _weights_source()
  if not source:
    pytest.skip("no facenet-pytorch weights at hand (set ADAM_FACE_FACENET_PYTORCH to its wheel)")
  out = tmp_path / "mtcnn.npz"
  face_detector.main(["--convert_from", source, "--out", str(out)])
  with open(face_detector.DEFAULT_WEIGHTS, "rb") as f:
    assert out.read_bytes() == f.read()


# Photos through embed.


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
  """A tiny random model (32x32 input), as tests/test_embed.py makes one."""
  return save_tiny_model(str(tmp_path_factory.mktemp("model")), IMAGE_SIZE)


def _save(image: Image.Image, path) -> str:
  image.save(path)
  return str(path)


def test_a_raw_photo_embeds_as_its_aligned_crop(model_path, lfw_faces, mesh8, tmp_path):
  """Crops padded into 250x250 photos, their border pixels repeated (so that re-aligning them
  brings in no grey), are found and warped back onto the template. The crops' own landmarks sit
  off the template by the fit's residual, so the re-aligned crop moves by a pixel or two, which the
  random 32x32 model feels. The test prints the cosines to the crop and those of the photo resized
  whole, unaligned (--resize), which every aligned one must beat (`pytest -s`)."""
  crops = [_save(face, tmp_path / f"crop{i}.png") for i, face in enumerate(lfw_faces[:8])]
  margins = ((45, CANVAS[1] - 45 - 112), (60, CANVAS[0] - 60 - 112), (0, 0))
  photos = [
      _save(Image.fromarray(np.pad(np.asarray(face), margins, mode="edge")), tmp_path / f"{i}.png")
      for i, face in enumerate(lfw_faces[:8])
  ]
  written = embed.embed_to_file(
      model_path, crops + photos, str(tmp_path / "out.npz"), batch_size=BATCH_SIZE
  )
  assert list(written["paths"]) == crops + photos
  cosines = np.sum(written["embeddings"][:8] * written["embeddings"][8:], axis=1)
  resized = embed.embed_to_file(
      model_path, photos, str(tmp_path / "resized.npz"), batch_size=BATCH_SIZE, resize=True
  )
  unaligned = np.sum(written["embeddings"][:8] * resized["embeddings"], axis=1)
  print(f"cosines of photo and crop: {cosines.round(4)}; resized whole: {unaligned.round(3)}")
  assert np.median(cosines) >= 0.99
  assert cosines.min() >= 0.97
  assert unaligned.max() < cosines.min()


# How a camera stores a photo whose EXIF orientation is the key, given the photo as shown: the
# inverse of what a viewer (PIL's ImageOps.exif_transpose) then does to it.
STORED_FOR_ORIENTATION = {
    3: Image.Transpose.ROTATE_180,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    8: Image.Transpose.ROTATE_270,
}


def test_a_photo_is_read_upright_as_its_exif_orientation_says(
    model_path, lfw_faces, mesh8, tmp_path
):
  """A phone's portrait photo is stored sideways with an EXIF orientation tag; read as stored,
  the detector would look for a face lying on its side."""
  margins = ((45, CANVAS[1] - 45 - 112), (60, CANVAS[0] - 60 - 112), (0, 0))
  upright, tagged = [], []
  for (orientation, stored), face in zip(STORED_FOR_ORIENTATION.items(), lfw_faces):
    photo = Image.fromarray(np.pad(np.asarray(face), margins, mode="edge"))
    upright.append(_save(photo, tmp_path / f"upright{orientation}.png"))
    exif = Image.Exif()
    exif[0x0112] = orientation
    tagged.append(str(tmp_path / f"tagged{orientation}.png"))
    photo.transpose(stored).save(tagged[-1], exif=exif)
  written = embed.embed_to_file(
      model_path, upright + tagged, str(tmp_path / "out.npz"), batch_size=BATCH_SIZE
  )
  n = len(upright)
  np.testing.assert_allclose(written["embeddings"][n:], written["embeddings"][:n], atol=1e-6)
  # detect() takes a PIL image as shown too: its landmarks are in the upright photo's pixels.
  found = face_detector.detect(Image.open(tagged[-1]))
  np.testing.assert_array_equal(
      found.landmarks, face_detector.detect(Image.open(upright[-1])).landmarks
  )
  assert len(found.landmarks) == 1


def test_a_photo_without_a_face_is_unusable_and_named(model_path, mesh8, tmp_path):
  noise = np.random.default_rng(1).integers(0, 256, (*CANVAS, 3), dtype=np.uint8)
  blank = _save(Image.fromarray(noise), tmp_path / "noise.png")
  good = _save(Image.fromarray(noise[:112, :112]), tmp_path / "aligned.png")  # Used as it is.
  out = str(tmp_path / "out.npz")
  with pytest.raises(
      embed.UnusableImageError,
      match=f"^{re.escape(blank)}: 250x250 is not an aligned face crop .* no face found in it",
  ):
    embed.embed_to_file(model_path, [blank], out, batch_size=BATCH_SIZE)
  written = embed.embed_to_file(
      model_path, [blank, good], out, batch_size=BATCH_SIZE, on_error="skip"
  )
  assert list(written["paths"]) == [good] and list(written["skipped"]) == [blank]


def test_a_photo_with_two_faces_uses_the_largest_or_is_unusable(
    model_path, lfw_faces, mesh8, tmp_path, caplog
):
  two = _save(_two_faces(lfw_faces), tmp_path / "two faces.png")
  out = str(tmp_path / "out.npz")
  with pytest.raises(
      embed.UnusableImageError,
      match=f"^{re.escape(two)}: 2 faces found \\(--faces=skip_multiple\\)",
  ):
    embed.embed_to_file(model_path, [two], out, batch_size=BATCH_SIZE, faces="skip_multiple")

  caplog.set_level(logging.WARNING)
  written = embed.embed_to_file(model_path, [two], out, batch_size=BATCH_SIZE)
  assert list(written["paths"]) == [two]
  assert f"{two}: 2 faces found; using the largest" in caplog.text
  # The largest face, aligned as with its landmarks given.
  faces = face_detector.detect(Image.open(two))
  landmarks = tmp_path / "landmarks.txt"
  coordinates = " ".join(repr(float(v)) for v in faces.landmarks[faces.largest()].ravel())
  landmarks.write_text(f"two faces.png {coordinates}\n")
  given = embed.embed_to_file(
      model_path, [two], out, batch_size=BATCH_SIZE, landmarks_path=str(landmarks)
  )
  np.testing.assert_allclose(written["embeddings"], given["embeddings"], atol=1e-6)
