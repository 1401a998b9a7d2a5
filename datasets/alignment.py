"""5-point face alignment to the ArcFace 112x112 crop with a similarity transform."""

import numpy as np
from PIL import Image

# Where the left eye, right eye, nose tip and left and right mouth corners land in a 112x112 crop
# (the layout of the insightface aligned releases, so raw and RecordIO data look alike).
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    np.float64,
)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
  """Least-squares similarity (scale, rotation, translation; no reflection) taking src to dst.

  Args:
    src: [N, 2] points, N >= 2.
    dst: [N, 2] points.
  Returns:
    [2, 3] matrix M with dst ~= src @ M[:, :2].T + M[:, 2].
  """
  src = np.asarray(src, np.float64)
  dst = np.asarray(dst, np.float64)
  if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
    raise ValueError(f"expected two [N, 2] point sets with N >= 2, got {src.shape} and {dst.shape}")
  src_mean, dst_mean = src.mean(0), dst.mean(0)
  src_c, dst_c = src - src_mean, dst - dst_mean
  src_var = (src_c**2).sum(1).mean()
  if src_var == 0:
    raise ValueError("the source points all coincide; no transform is defined")
  # The rotation maximising the correlation of the centred sets comes from the SVD of their
  # cross-covariance; the sign correction keeps it a proper rotation when the best orthogonal
  # fit would be a reflection.
  u, singular_values, vt = np.linalg.svd(dst_c.T @ src_c / len(src))
  signs = np.array([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
  rotation = u @ np.diag(signs) @ vt
  scale = (singular_values * signs).sum() / src_var
  translation = dst_mean - scale * rotation @ src_mean
  return np.concatenate([scale * rotation, translation[:, None]], axis=1)


def align_face(image: Image.Image, landmarks: np.ndarray, image_size: int = 112) -> np.ndarray:
  """Warps `image` so its five landmarks land on the ArcFace template scaled to image_size.

  Args:
    image: a PIL image (any mode PIL can convert to RGB).
    landmarks: [5, 2] (x, y) pixel coordinates in `image`: left eye, right eye, nose, left and
      right mouth corners, as in VGGFace2's loose_landmark csv files.
    image_size: side of the square output.
  Returns:
    uint8 [image_size, image_size, 3].
  """
  landmarks = np.asarray(landmarks, np.float64)
  if landmarks.shape != (5, 2):
    raise ValueError(f"expected [5, 2] landmarks, got shape {landmarks.shape}")
  template = ARCFACE_TEMPLATE_112 * (image_size / 112.0)
  forward = similarity_transform(landmarks, template)
  # PIL asks, for each output pixel, where to sample the input: the inverse map.
  inverse = np.linalg.inv(np.vstack([forward, [0.0, 0.0, 1.0]]))[:2]
  aligned = image.convert("RGB").transform(
      (image_size, image_size),
      Image.Transform.AFFINE,
      data=tuple(inverse.ravel()),
      resample=Image.Resampling.BILINEAR,
  )
  return np.asarray(aligned, np.uint8)
