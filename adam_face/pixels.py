"""The model's input scale: the one definition of how uint8 pixels become a network's input.

Plain arithmetic without TensorFlow, so that the training pipeline (tf.data), embedding and export
(jax), the converter and model directories (numpy) share it.
"""

# arcface_torch's torchvision Normalize(0.5, 0.5) on [0, 1] pixels, in training and in its
# eval/verification.py: (x / 255 - 0.5) / 0.5 = (x - 127.5) / 127.5, inputs in [-1, 1].
PIXEL_MEAN = 127.5
PIXEL_SCALE = 127.5


def normalize(image):
  """(x - 127.5) / 127.5 of pixels in [0, 255], as arcface_torch takes them.

  insightface's MXNet models took (x - 127.5) / 128 (x 0.0078125, inputs 0.4 % smaller), and so
  did adam_face until 2026-12-01. The converter folds that scale into the first convolution of a
  graph that says so (convert.py); model directories and training workdirs record the scale their
  variables were made for, and model_dir.Model.apply feeds each its own.
  """
  return (image - PIXEL_MEAN) / PIXEL_SCALE
