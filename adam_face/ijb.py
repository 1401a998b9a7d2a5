"""IJB-B / IJB-C evaluation: faces aligned once (cached), embedded, pooled into templates, scored.

  python -m adam_face.evaluate --model=DIR --sets=lfw,cfp_fp,agedb_30,ijbc --ijb_root=/data/IJB

The set is read by datasets/ijb.py (insightface's IJB release layout); the metrics are
template_metrics' (1:1 TAR@FAR from 1e-6 to 1e-1, and, where the 1:N lists are there, open-set
1:N per gallery and their mean, plus insightface's ijb_1n.py figures of the galleries joined).

Faces, as insightface's eval_ijbc.py treats them (differences named):
  * each loose crop is warped onto the 112x112 ArcFace template by its five landmarks
    (datasets/alignment.py: PIL's bilinear affine warp, black outside the photo; insightface uses
    OpenCV's warpAffine, whose bilinear sampling rounds differently by at most a grey level or so);
  * the aligned faces are stored once in a cache, `<cache_dir>/<set>_aligned112_<fingerprint>.npy`
    (uint8 [N, 112, 112, 3], a memory map: 17.7 GB for IJB-C's 469,375 faces) with a JSON beside
    it listing the faces that could not be used; a second model, or a second run, reads the faces
    from there without decoding or aligning again. The fingerprint covers the face list and the
    landmarks, so a cache of other meta files is never reused. A killed run leaves only a
    `.partial` file, which the next run starts again;
  * they are embedded in batches sharded over the device mesh (embedding.compute_embeddings, the
    same normalisation and flip test as the verification sets: flip 'sum' is insightface's F2),
    streaming from the cache one chunk at a time, resized to the model's input size as the
    verification sets are when it is not 112;
  * each face's feature is its embedding weighted by its embedding norm (`norm_score`,
    insightface's N1) and its detector score (`detector_score`, D1), both on by default as in
    eval_ijbc.py, then pooled into templates (template_metrics.pool_templates).
A face whose photo is missing or cannot be decoded is counted, logged by name and left out of
its template; a template left with no face is reported and its pairs (and its 1:N role) are
left out of the scores, counted in 'num_unscored_pairs' (or 'num_unscored_probes'). Nothing is
dropped silently.

With several processes (multi-host), each aligns its share of the faces into the one cache, which
must then be on a file system all of them see (as the workdir is for checkpoints); the
embedding batches are sharded over the devices of every process; the scoring (seconds) is done
by every process on its own devices.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import tqdm

from adam_face import classifier
from adam_face import embedding
from adam_face import errors
from adam_face import report
from adam_face import template_metrics
from adam_face import verification
from datasets import alignment
from datasets import ijb
from datasets import images

ALIGNED_SIZE = 112  # The ArcFace template's side: faces are cached at it, whatever the model.
# Faces aligned (or embedded) per chunk: bounds memory to a few hundred MB while keeping every
# device busy; also the progress bar's step.
_CHUNK = 4096
_UNUSABLE = "unusable_faces"


@dataclasses.dataclass(frozen=True)
class IJBOptions:
  """How faces become template features (config.verification.ijb)."""

  root: str  # The folder holding IJBB/ and IJBC/ (insightface's IJB release).
  cache_dir: str  # Where the aligned faces are kept.
  detector_score: bool = True  # Weight each face by its detector score (insightface's D1).
  norm_score: bool = True  # Weight each face by its embedding's norm (insightface's N1).


class AlignedFaces:
  """The aligned faces of a protocol, from the cache (built on first use)."""

  def __init__(self, protocol: ijb.IJBProtocol, cache_dir: str):
    self.protocol = protocol
    self.path = os.path.join(
        cache_dir, f"{protocol.name}_aligned{ALIGNED_SIZE}_{_fingerprint(protocol)}.npy"
    )
    self.faces_per_second = None  # Of the alignment, when this run built the cache.
    if not os.path.exists(self.path):
      self._build()
    with open(self.path + ".json") as f:
      unusable = json.load(f)[_UNUSABLE]
    self.unusable = {int(i): reason for i, reason in unusable.items()}
    self.faces = np.load(self.path, mmap_mode="r")

  @property
  def usable(self) -> np.ndarray:
    mask = np.ones(self.protocol.num_faces, bool)
    mask[list(self.unusable)] = False
    return mask

  def _build(self):
    protocol, process, num_processes = self.protocol, jax.process_index(), jax.process_count()
    partial = self.path.removesuffix(".npy") + ".partial.npy"
    if process == 0:
      shape = (protocol.num_faces, ALIGNED_SIZE, ALIGNED_SIZE, 3)
      try:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=shape).flush()
      except OSError as e:
        raise errors.RunError(
            f"cannot write the aligned faces of {protocol.name} to {partial} ({e.strerror}); give "
            f"--ijb_cache a writable folder with {np.prod(shape) / 1e9:.1f} GB free."
        ) from e
    _sync("ijb_cache_created")
    faces = np.load(partial, mmap_mode="r+")
    chunks = range(process * _CHUNK, protocol.num_faces, num_processes * _CHUNK)
    unusable = np.zeros(protocol.num_faces, bool)
    reasons = {}
    started = time.perf_counter()
    logging.info("Aligning the %d faces of %s into %s.", protocol.num_faces, protocol.name, partial)
    with (
        concurrent.futures.ThreadPoolExecutor() as pool,
        tqdm.tqdm(total=protocol.num_faces, unit="face", desc="align", mininterval=10) as bar,
    ):
      for start in chunks:
        indices = range(start, min(start + _CHUNK, protocol.num_faces))
        for i, result in zip(indices, pool.map(self._aligned, indices)):
          if isinstance(result, str):
            unusable[i], reasons[i] = True, result
            logging.warning("IJB face %d left out: %s", i, result)
          else:
            faces[i] = result
        bar.update(len(indices) * num_processes)
    faces.flush()
    del faces
    if num_processes > 1:
      unusable = np.asarray(multihost_utils.process_allgather(unusable)).any(0)
    self.faces_per_second = protocol.num_faces / (time.perf_counter() - started)
    _sync("ijb_cache_written")
    if process == 0:
      reasons = {
          int(i): reasons.get(int(i), "could not be read (see the log of another process)")
          for i in np.flatnonzero(unusable)
      }
      with open(self.path + ".json", "w") as f:
        json.dump({"set": protocol.name, _UNUSABLE: reasons}, f, indent=1)
      os.replace(partial, self.path)  # Last: a complete cache or none.
    _sync("ijb_cache_done")

  def _aligned(self, i: int) -> np.ndarray | str:
    """Face i aligned, or why it cannot be."""
    protocol = self.protocol
    path = os.path.join(protocol.image_dir, str(protocol.face_names[i]))
    try:
      with open(path, "rb") as f:
        # Upright, as insightface's evaluation reads the photo it warps with these landmarks
        # (recognition/_evaluation_/ijb: cv2.imread, which applies EXIF orientation).
        image = images.upright(images.decode(f.read(), path))
      return alignment.align_face(image, protocol.landmarks[i], ALIGNED_SIZE)
    except OSError as e:
      return f"{path}: cannot read it ({e.strerror})"
    except images.UndecodableImageError as e:
      return str(e)  # It names the file.
    except ValueError as e:
      return f"{path}: {e}"


def _fingerprint(protocol: ijb.IJBProtocol) -> str:
  digest = hashlib.sha256()
  digest.update("\n".join(protocol.face_names.tolist()).encode())
  digest.update(np.ascontiguousarray(protocol.landmarks).tobytes())
  return digest.hexdigest()[:12]


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def face_features(
    faces: AlignedFaces,
    embed_fn: Callable[[jax.Array], jax.Array],
    *,
    image_size: int,
    batch_size: int,
    mesh: jax.sharding.Mesh,
    flip: str,
    options: IJBOptions,
) -> tuple[np.ndarray, np.ndarray, float]:
  """(unit embeddings float32 [N, D], weights float [N] (0 for unusable faces), images/s)."""
  usable = np.flatnonzero(faces.usable)
  embeddings, norms = [], []
  started = time.perf_counter()
  with tqdm.tqdm(total=len(usable), unit="face", desc="embed", mininterval=10) as bar:
    for start in range(0, len(usable), _CHUNK):
      chunk = np.asarray(faces.faces[usable[start : start + _CHUNK]])
      if image_size != ALIGNED_SIZE:
        chunk = _resized(chunk, image_size)
      emb, norm = embedding.compute_embeddings(
          embed_fn, chunk, batch_size=batch_size, mesh=mesh, flip=flip, return_norms=True
      )
      embeddings.append(emb)
      norms.append(norm)
      bar.update(len(chunk))
  images_per_second = len(usable) / (time.perf_counter() - started)
  protocol = faces.protocol
  dim = embeddings[0].shape[1]
  features = np.zeros((protocol.num_faces, dim), np.float32)
  features[usable] = np.concatenate(embeddings)
  weights = np.zeros(protocol.num_faces)
  weights[usable] = 1.0
  if options.norm_score:
    weights[usable] *= np.concatenate(norms)
  if options.detector_score:
    weights *= protocol.detector_scores
  return features, weights, images_per_second


def _resized(faces_uint8: np.ndarray, image_size: int) -> np.ndarray:
  """As the verification sets are resized (train_input.decode_image), rounded back to uint8."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  resized = tf.image.resize(faces_uint8, [image_size, image_size], antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8).numpy()


class IJBEvaluator:
  """Scores IJB sets with an embedding function, as verification.Evaluator scores pair sets."""

  def __init__(
      self,
      names: list[str],
      options: IJBOptions,
      *,
      image_size: int,
      batch_size: int,
      mesh: jax.sharding.Mesh,
      flip: str = "sum",
  ):
    if not options.root:
      raise errors.RunError(
          f"{', '.join(names)}: set --ijb_root (config.verification.ijb.root) to the folder that "
          "holds IJBB/ and IJBC/ as insightface's IJB release lays them out (README: IJB-B and "
          "IJB-C)."
      )
    if flip not in embedding.FLIP_MODES:
      raise ValueError(f"flip={flip!r} is not one of {embedding.FLIP_MODES}.")
    try:
      self._protocols = [ijb.read_protocol(options.root, name) for name in names]
    except ijb.IJBLayoutError as e:
      raise errors.RunError(str(e)) from e
    self._options = options
    self._image_size = image_size
    self._batch_size = batch_size
    self._mesh = mesh
    self._flip = flip
    self.faces_per_second = {}  # Of the alignment, for the sets whose cache this run built.

  def __call__(self, embed_fn) -> verification.EvaluationResult:
    metrics, curves = {}, {}
    # Scoring takes seconds: with several processes each scores on its own devices, every one
    # the same, rather than pass numpy arrays through programs that span processes.
    scoring_mesh = self._mesh
    if jax.process_count() > 1:
      scoring_mesh = classifier.create_mesh(jax.local_devices())
    for protocol in self._protocols:
      faces = AlignedFaces(protocol, self._options.cache_dir or self._options.root)
      features, weights, images_per_second = face_features(
          faces,
          embed_fn,
          image_size=self._image_size,
          batch_size=self._batch_size,
          mesh=self._mesh,
          flip=self._flip,
          options=self._options,
      )
      logging.info(
          "%s: embedded %d faces at %.1f images/s (flip %s).",
          protocol.name,
          int(faces.usable.sum()),
          images_per_second,
          self._flip,
      )
      if faces.faces_per_second is not None:
        self.faces_per_second[protocol.name] = faces.faces_per_second
      set_metrics, curve = score_protocol(protocol, features, weights, scoring_mesh)
      for key, value in set_metrics.items():
        metrics[key] = dict(value, num_unusable_faces=len(faces.unusable))
      curves[protocol.name] = curve
    return verification.EvaluationResult(metrics=metrics, curves=curves)


def score_protocol(
    protocol: ijb.IJBProtocol, features: np.ndarray, weights: np.ndarray, mesh: jax.sharding.Mesh
) -> tuple[dict[str, dict], tuple[np.ndarray, np.ndarray]]:
  """({'<set>': 1:1 metrics, '<set>_1n': 1:N metrics where the lists are there}, 1:1 ROC)."""
  templates = template_metrics.pool_templates(features, weights, protocol.templates, protocol.media)
  empty = templates.ids[templates.is_empty]
  if empty.size:
    logging.warning(
        "%s: %d templates have no usable face (first: %d); their pairs are not scored.",
        protocol.name,
        empty.size,
        empty[0],
    )
  first, second, is_same = protocol.pairs
  scored = ~(np.isin(first, empty) | np.isin(second, empty))
  scores = template_metrics.pair_scores(templates, first[scored], second[scored], mesh)
  one_to_one, (far, tar) = template_metrics.one_to_one_metrics(scores, is_same[scored])
  one_to_one["num_empty_templates"] = int(empty.size)
  one_to_one["num_unscored_pairs"] = int((~scored).sum())
  metrics = {protocol.name: one_to_one}
  if protocol.probes is not None:
    metrics[f"{protocol.name}_1n"] = _identification(protocol, templates, empty, mesh)
  return metrics, report.thinned_roc(far, tar)


def _identification(protocol, templates, empty, mesh) -> dict:
  """Open-set 1:N metrics of each gallery ('<gallery>/<metric>') and their mean ('<metric>'), and
  insightface's ijb_1n.py figures of the galleries joined ('insightface/<metric>')."""
  probes = protocol.probes
  probe_kept = ~np.isin(probes.templates, empty)
  probe_features = templates.features[templates.rows(probes.templates[probe_kept])]
  probe_subjects = probes.subjects[probe_kept]
  per_gallery, joined_templates = {}, []
  for name, gallery in protocol.galleries.items():
    kept = ~np.isin(gallery.templates, empty)
    if not kept.any():
      raise errors.RunError(f"{protocol.name} gallery {name} has no template with a usable face.")
    mated_row = _mated_rows(gallery.subjects[kept], probe_subjects)
    if mated_row is None:
      raise errors.RunError(
          f"{protocol.name} gallery {name} holds two templates of one subject; a 1:N gallery "
          "holds one template a subject."
      )
    gallery_features = templates.features[templates.rows(gallery.templates[kept])]
    result = template_metrics.search_gallery(probe_features, gallery_features, mated_row, mesh)
    per_gallery[name] = template_metrics.one_to_n_metrics(result)
    joined_templates.append((gallery.templates[kept], gallery.subjects[kept]))
  metrics = {
      key: float(np.mean([m[key] for m in per_gallery.values()]))
      for key in next(iter(per_gallery.values()))
      if key.startswith(("rank-", "tpir@"))
  }
  for name, gallery_metrics in per_gallery.items():
    metrics.update({f"{name}/{key}": value for key, value in gallery_metrics.items()})
  joined, joined_subjects = (np.concatenate(column) for column in zip(*joined_templates))
  mated_row = _mated_rows(joined_subjects, probe_subjects)
  if mated_row is None:
    logging.warning(
        "%s: a subject has templates in two galleries, so insightface's joined-gallery 1:N "
        "figures (ijb_1n.py) are not computed.",
        protocol.name,
    )
  else:
    insightface = template_metrics.insightface_identification(
        probe_features, templates.features[templates.rows(joined)], mated_row, mesh
    )
    metrics.update({f"insightface/{key}": value for key, value in insightface.items()})
  metrics["num_unscored_probes"] = int((~probe_kept).sum())
  return metrics


def _mated_rows(gallery_subjects: np.ndarray, probe_subjects: np.ndarray) -> np.ndarray | None:
  """Per probe, the gallery row of its subject, -1 where the gallery has none; None where the
  gallery holds a subject twice."""
  order = np.argsort(gallery_subjects, kind="stable")
  if np.any(np.diff(gallery_subjects[order]) == 0):
    return None
  position = np.minimum(np.searchsorted(gallery_subjects[order], probe_subjects), len(order) - 1)
  mated = gallery_subjects[order][position] == probe_subjects
  return np.where(mated, order[position], -1)
