"""Procedural face-like images: a fixed random template per identity, perturbed per image.

An identity is ~40 numbers (face and jaw shape, skin and hair colour, hairline, eye, brow, nose and
mouth geometry, beard, moles, a faint skin pattern). An image of it is drawn under a random
nuisance: in-plane rotation, scale, translation and yaw (inner features slide sideways by their
depth), expression (eye openness, smile), background, directional light, exposure, colour cast,
an occluding patch, and sensor noise. The nuisances move pixels far more than identity changes do,
so a network has to learn which cues are stable: an untrained one does poorly, a trained one well.

Everything is drawn in template coordinates, u right and v down in [-1, 1] across the image, so
rendering is resolution independent and needs no warping.
"""

import numpy as np

_SKIN_LIGHT = np.array([236.0, 204.0, 180.0])
_SKIN_DARK = np.array([105.0, 72.0, 52.0])
_HAIR_COLOURS = np.array(
    [[25.0, 20, 18], [85, 55, 35], [190, 160, 105], [150, 145, 140], [120, 45, 25]]
)
_IRIS_COLOURS = np.array([[70.0, 45, 25], [60, 90, 130], [70, 100, 60], [35, 30, 25]])


def sample_identity(rng: np.random.Generator) -> dict:
  """The fixed template parameters of one identity."""
  u = rng.uniform
  eye_y = u(-0.2, -0.05)
  nose_length = u(0.15, 0.28)
  hair_weights = rng.dirichlet(np.full(len(_HAIR_COLOURS), 0.3))
  return {
      "face_rx": u(0.5, 0.66),
      "face_ry": u(0.68, 0.84),
      "chin": u(0.7, 1.0),
      "skin": (_SKIN_LIGHT + u() * (_SKIN_DARK - _SKIN_LIGHT)) + rng.normal(0, 8, 3),
      "hair": hair_weights @ _HAIR_COLOURS,
      "hairline": u(-0.7, -0.35),
      "hair_volume": u(1.03, 1.25),
      "hair_length": u(-0.3, 0.6),
      "eye_y": eye_y,
      "eye_dx": u(0.19, 0.3),
      "eye_rx": u(0.07, 0.11),
      "eye_ry": u(0.035, 0.06),
      "iris": _IRIS_COLOURS[rng.integers(len(_IRIS_COLOURS))] + rng.normal(0, 10, 3),
      "brow_gap": u(0.07, 0.15),
      "brow_thickness": u(0.015, 0.045),
      "brow_tilt": u(-0.3, 0.3),
      "brow_length": u(0.09, 0.16),
      "nose_tip": eye_y + nose_length,
      "nose_width": u(0.05, 0.12),
      "nose_shadow": u(0.1, 0.35),
      "mouth_y": eye_y + nose_length + u(0.12, 0.22),
      "mouth_dx": u(0.09, 0.19),
      "lip": u(0.018, 0.045),
      "smile": u(-0.07, 0.07),
      "beard": u() < 0.25,
      "beard_density": u(0.4, 0.9),
      "moles": rng.uniform([-0.4, -0.3, 0.012], [0.4, 0.5, 0.03], size=(rng.integers(0, 4), 3)),
      # A faint skin pattern: a few low-frequency waves, unique to the identity.
      "pattern": np.concatenate(
          [
              rng.normal(0, 4.0, (4, 2)),
              rng.uniform(0, 2 * np.pi, (4, 1)),
              rng.uniform(4, 12, (4, 1)),
          ],
          axis=1,
      ),
  }


def sample_nuisance(rng: np.random.Generator) -> dict:
  """Per-image pose, expression, background, light, occlusion and noise."""
  u = rng.uniform
  return {
      "angle": u(-0.3, 0.3),
      "scale": u(0.85, 1.15),
      "shift": u(-0.1, 0.1, 2),
      "yaw": u(-0.35, 0.35),
      "eye_open": u(0.4, 1.0),
      "smile": rng.normal(0, 0.03),
      "background": u(0, 255, 3),
      "background_gradient": u(-60, 60, (2, 3)),
      "light_direction": u(0, 2 * np.pi),
      "light_strength": u(0.0, 0.5),
      "exposure": u(0.6, 1.3),
      "colour_cast": rng.normal(1.0, 0.07, 3),
      "occluder": (u(-1, 1, 2), u(0.1, 0.45, 2), u(0, 255, 3)) if u() < 0.2 else None,
      "noise": u(2.0, 12.0),
      "noise_seed": rng.integers(2**31),
  }


def _soft(distance: np.ndarray, edge: float) -> np.ndarray:
  """1 inside (distance < 0), 0 outside, with a linear ramp `edge` wide."""
  return np.clip(0.5 - distance / edge, 0.0, 1.0)


def _ellipse(u, v, cu, cv, rx, ry):
  """Approximate signed distance to an axis-aligned ellipse."""
  return (np.sqrt(((u - cu) / rx) ** 2 + ((v - cv) / ry) ** 2) - 1.0) * min(rx, ry)


def _paint(image, mask, colour):
  """Blends `colour` into `image` by `mask`, touching only the mask's bounding box."""
  rows = np.flatnonzero(mask.any(axis=1))
  if rows.size == 0:
    return
  cols = np.flatnonzero(mask.any(axis=0))
  window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
  region = image[window]
  region += mask[window][..., None] * (np.asarray(colour, np.float32) - region)


def render_face(identity: dict, nuisance: dict, image_size: int) -> np.ndarray:
  """uint8 [image_size, image_size, 3]: `identity` seen under `nuisance`."""
  ident, nu = identity, nuisance
  x = ((np.arange(image_size) + 0.5) / image_size * 2.0 - 1.0).astype(np.float32)
  x, y = np.meshgrid(x, x)
  edge = 3.0 / image_size / nu["scale"]  # About 1.5 pixels, in template units.

  # Pose: map each pixel back into the template frame.
  cos, sin = np.cos(nu["angle"]), np.sin(nu["angle"])
  px, py = x - nu["shift"][0], y - nu["shift"][1]
  u = (cos * px + sin * py) / nu["scale"]
  v = (-sin * px + cos * py) / nu["scale"]
  yaw = nu["yaw"]

  image = (
      nu["background"]
      + x[..., None] * nu["background_gradient"][0]
      + (y[..., None] * nu["background_gradient"][1])
  ).astype(np.float32)

  # Head: hair behind, then the face, whose outline narrows when turned and towards the chin.
  face_rx = ident["face_rx"] * (1.0 - 0.3 * abs(yaw))
  jaw = np.where(v > 0.05, 1.0 - (1.0 - ident["chin"]) * np.clip((v - 0.05) / 0.8, 0, 1), 1.0)
  face = _soft(_ellipse(u / jaw, v, -0.05 * yaw, 0.05, face_rx, ident["face_ry"]), edge)
  hair = _soft(
      _ellipse(
          u,
          v,
          -0.08 * yaw,
          0.0,
          face_rx * ident["hair_volume"],
          ident["face_ry"] * ident["hair_volume"],
      ),
      edge,
  )
  hair *= _soft(v - ident["hair_length"], edge) * np.maximum(
      1.0 - face, _soft(v - ident["hairline"], edge)
  )
  _paint(image, hair, ident["hair"])
  k1, k2, phase, freq = np.moveaxis(ident["pattern"], 1, 0)
  pattern = sum(
      a * np.cos(freq_i * (np.cos(k) * u + np.sin(k) * v) + p)
      for a, k, p, freq_i in zip(k1, k2, phase, freq)
  )
  _paint(image, face * (1.0 - hair), ident["skin"])
  image += (face * (1.0 - hair) * pattern)[..., None]

  def feature_u(depth):  # Inner features slide sideways with yaw, the nearer the more.
    return u + yaw * depth

  if ident["beard"]:
    beard = face * _soft(ident["mouth_y"] - 0.12 - v, edge * 4) * ident["beard_density"]
    _paint(image, beard, ident["hair"])

  # Eyes and brows, mirrored about the (yawed) midline.
  fu = feature_u(0.12)
  for side in (-1.0, 1.0):
    cu = side * ident["eye_dx"]
    eye_ry = ident["eye_ry"] * nu["eye_open"]
    sclera = _soft(_ellipse(fu, v, cu, ident["eye_y"], ident["eye_rx"], eye_ry), edge)
    _paint(image, sclera, (235.0, 232.0, 225.0))
    iris = sclera * _soft(_ellipse(fu, v, cu, ident["eye_y"], eye_ry * 1.2, eye_ry * 1.2), edge)
    _paint(image, iris, ident["iris"])
    _paint(
        image,
        iris * _soft(_ellipse(fu, v, cu, ident["eye_y"], eye_ry * 0.5, eye_ry * 0.5), edge),
        (10.0, 10.0, 10.0),
    )
    brow_v = ident["eye_y"] - ident["brow_gap"] - side * ident["brow_tilt"] * (fu - cu)
    brow = _soft(
        np.maximum(
            np.abs(v - brow_v) - ident["brow_thickness"], np.abs(fu - cu) - ident["brow_length"]
        ),
        edge,
    )
    _paint(image, brow * 0.85, ident["hair"] * 0.8)

  # Nose: a shaded ridge down to the tip, and two nostrils.
  fu = feature_u(0.25)
  ridge = np.clip((v - ident["eye_y"]) / (ident["nose_tip"] - ident["eye_y"]), 0, 1) * _soft(
      v - ident["nose_tip"], edge
  )
  side_shadow = _soft(
      np.abs(fu - 0.5 * ident["nose_width"] * np.sign(yaw or 1.0)) - 0.015, edge * 3
  )
  image *= (1.0 - ident["nose_shadow"] * ridge * side_shadow * face)[..., None]
  for side in (-1.0, 1.0):
    nostril = _soft(
        _ellipse(
            fu,
            v,
            side * ident["nose_width"] * 0.6,
            ident["nose_tip"],
            ident["nose_width"] * 0.35,
            0.018,
        ),
        edge,
    )
    _paint(image, nostril * 0.7, ident["skin"] * 0.35)

  # Mouth: a curved lip band.
  fu = feature_u(0.15)
  smile = ident["smile"] + nu["smile"]
  mouth_v = ident["mouth_y"] - smile * (1.0 - (fu / ident["mouth_dx"]) ** 2)
  mouth = _soft(
      np.maximum(np.abs(v - mouth_v) - ident["lip"], np.abs(fu) - ident["mouth_dx"]), edge
  )
  _paint(image, mouth, ident["skin"] * np.array([0.75, 0.45, 0.45]))

  for mu, mv, radius in ident["moles"]:
    _paint(
        image,
        face * _soft(_ellipse(feature_u(0.1), v, mu, mv, radius, radius), edge),
        ident["skin"] * 0.45,
    )

  # Light: a directional gradient over the head, exposure and colour cast over everything.
  direction = np.cos(nu["light_direction"]) * x + np.sin(nu["light_direction"]) * y
  image *= (1.0 + nu["light_strength"] * direction * np.maximum(face, hair))[..., None]
  image *= nu["exposure"] * nu["colour_cast"]

  if nu["occluder"] is not None:
    centre, half, colour = nu["occluder"]
    block = _soft(
        np.maximum(np.abs(x - centre[0]) - half[0], np.abs(y - centre[1]) - half[1]), edge
    )
    _paint(image, block, colour)

  noise_rng = np.random.default_rng(nu["noise_seed"])
  image += noise_rng.standard_normal(image.shape, dtype=np.float32) * np.float32(nu["noise"])
  return np.clip(np.rint(image), 0, 255).astype(np.uint8)
