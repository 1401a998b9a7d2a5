"""Exports a model for serving outside JAX: a TF SavedModel, a TFLite model or an ONNX model.

  python -m adam_face.export --model=/tmp/r50 --format=saved_model --out=/tmp/r50_saved_model
  python -m adam_face.export --model=/tmp/run --format=tflite --out=/tmp/run.tflite
  python -m adam_face.export --model=/tmp/r50 --format=onnx --out=/tmp/r50.onnx

--model is anything model_dir.load takes: a model directory, or a training workdir (its latest
checkpoint, or --step). Every format has one signature, `serving_default`: `images`, uint8
[N, S, S, 3] aligned RGB faces (S the model's image_size, N any) -> `embeddings`, float32 [N, D]
of unit L2 norm. pixels.normalize and the L2 normalisation are inside the graph, so a caller
feeds raw pixels; the backbone runs in inference mode (BatchNorm running statistics, no dropout)
in float32. The command prints where it wrote the model and that signature.

How each format is made:
  * saved_model: jax2tf in native serialization, its only mode in this jax (`enable_xla=False`,
    the old lowering to plain TF ops, is ignored with a deprecation warning). The whole function
    is one XlaCallModule op holding its StableHLO, lowered for cpu, cuda and tpu so that TF can
    serve it on any of them; the batch axis is shape-polymorphic and the variables are
    tf.Variables beside it.
  * tflite: TFLiteConverter.from_saved_model of that SavedModel. The converter legalises the
    StableHLO to TFLite builtin ops; only builtins are allowed (no Flex ops, so the plain
    interpreter runs it) and nothing is quantised.
  * onnx: tf2onnx of that .tflite. tf2onnx cannot read an XlaCallModule op, so it cannot take the
    SavedModel; the .tflite holds builtin ops only, which it converts. Needs the packages of
    requirements-export.txt.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

from absl import app, flags
import jax
from jax.experimental import jax2tf
import jax.numpy as jnp
import tensorflow as tf

from adam_face import classifier, model_dir, pixels

FLAGS = flags.FLAGS
FORMATS = ("saved_model", "tflite", "onnx")
SIGNATURE_KEY = "serving_default"
INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
# Every platform TF serves on. jax branches on the platform only where a lowering differs, which
# in these models is nowhere (the .tflite made from it is the same as from a cpu-only lowering).
PLATFORMS = ("cpu", "cuda", "tpu")
# Runs on every onnxruntime since 1.12 and on most other ONNX runtimes.
ONNX_OPSET = 17


@dataclasses.dataclass(frozen=True)
class Signature:
  """The exported model's one signature."""

  image_size: int
  embedding_dim: int

  def __str__(self) -> str:
    s = self.image_size
    return (
        f"{SIGNATURE_KEY}: {INPUT_NAME} uint8 [N, {s}, {s}, 3] (aligned RGB faces) -> "
        f"{OUTPUT_NAME} float32 [N, {self.embedding_dim}] (L2-normalised)"
    )


def serving_fn(model: model_dir.Model):
  """(variables, uint8 images [N, S, S, 3]) -> L2-normalised float32 embeddings [N, D]."""
  apply = model.apply

  def serve(variables, images):
    embeddings = apply(variables, pixels.normalize(images.astype(jnp.float32)))
    return classifier.l2_normalize(embeddings)  # A zero embedding stays zero, not NaN.

  return serve


def signature(model: model_dir.Model) -> Signature:
  s = model.image_size
  images = jax.ShapeDtypeStruct((1, s, s, 3), jnp.uint8)
  out = jax.eval_shape(serving_fn(model), model.variables, images)
  return Signature(s, out.shape[-1])


def export(model: model_dir.Model, fmt: str, out: str) -> Signature:
  """Writes `model` to `out` in format `fmt` (one of FORMATS); returns its signature."""
  if fmt not in FORMATS:
    raise ValueError(f"format {fmt!r} is not one of {FORMATS}.")
  if fmt == "onnx":
    _onnx_modules()  # Before the slow part: a missing package is told at once.
  if fmt == "saved_model":
    _write_saved_model(model, out)
    return signature(model)
  with tempfile.TemporaryDirectory() as tmp:
    saved_model = os.path.join(tmp, "saved_model")
    _write_saved_model(model, saved_model)
    tflite_path = out if fmt == "tflite" else os.path.join(tmp, "model.tflite")
    _write_file(tflite_path, _tflite_bytes(saved_model))
    if fmt == "onnx":
      _write_onnx(tflite_path, out)
  return signature(model)


def _write_saved_model(model: model_dir.Model, out: str) -> None:
  s = model.image_size
  serve = jax2tf.convert(
      serving_fn(model),
      polymorphic_shapes=[None, "(N, ...)"],
      with_gradient=False,
      native_serialization_platforms=PLATFORMS,
  )
  variables = jax.tree_util.tree_map_with_path(
      lambda path, x: tf.Variable(
          x, trainable=False, name=jax.tree_util.keystr(path, simple=True, separator="/")
      ),
      model.variables,
  )

  @tf.function(
      input_signature=[tf.TensorSpec([None, s, s, 3], tf.uint8, name=INPUT_NAME)],
      autograph=False,
  )
  def serving_default(images):
    return {OUTPUT_NAME: serve(variables, images)}

  holder = tf.Module()
  holder.weights = variables  # Tracked, so the SavedModel stores them.
  holder.serving_default = serving_default
  tf.saved_model.save(holder, out, signatures={SIGNATURE_KEY: serving_default})


def _tflite_bytes(saved_model: str) -> bytes:
  converter = tf.lite.TFLiteConverter.from_saved_model(saved_model, signature_keys=[SIGNATURE_KEY])
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
  return converter.convert()


def _onnx_modules():
  try:
    import onnx  # pylint: disable=g-import-not-at-top
    import tf2onnx  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"ONNX export needs onnx and tf2onnx ({e}); install them with "
        "pip install -r requirements-export.txt."
    ) from e
  return onnx, tf2onnx


def _write_onnx(tflite_path: str, out: str) -> None:
  onnx, tf2onnx = _onnx_modules()
  model_proto, _ = tf2onnx.convert.from_tflite(tflite_path, opset=ONNX_OPSET)
  graph = model_proto.graph
  # tf2onnx keeps going past an op it cannot convert and leaves it in the graph as it was.
  unconverted = sorted({n.op_type for n in graph.node if not onnx.defs.has(n.op_type, n.domain)})
  if unconverted:
    raise ValueError(
        f"tf2onnx could not convert the TFLite ops {unconverted} to ONNX opset {ONNX_OPSET}; "
        "export to tflite or saved_model instead."
    )
  # tf2onnx names the ends after TFLite's tensors; the other formats' names are kept instead.
  renamed = {graph.input[0].name: INPUT_NAME, graph.output[0].name: OUTPUT_NAME}
  for value in [*graph.input, *graph.output, *graph.value_info]:
    value.name = renamed.get(value.name, value.name)
  for node in graph.node:
    node.input[:] = [renamed.get(name, name) for name in node.input]
    node.output[:] = [renamed.get(name, name) for name in node.output]
  for value in (graph.input[0], graph.output[0]):
    value.type.tensor_type.shape.dim[0].dim_param = "N"
  onnx.checker.check_model(model_proto)
  _write_file(out, model_proto.SerializeToString())


def _write_file(path: str, data: bytes) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)


def _define_flags() -> None:
  flags.DEFINE_enum("format", None, FORMATS, "What to write.")
  flags.DEFINE_string(
      "out", None, "Where: a directory for saved_model, a file for tflite and onnx (overwritten)."
  )
  flags.mark_flags_as_required(["format", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  model = model_dir.load(FLAGS.model, FLAGS.step)
  exported = export(model, FLAGS.format, FLAGS.out)
  print(f"Wrote {FLAGS.format} of {FLAGS.model} ({model.source}) to {os.path.abspath(FLAGS.out)}")
  print(exported)


if __name__ == "__main__":
  model_dir.define_model_flags()
  _define_flags()
  app.run(main)
