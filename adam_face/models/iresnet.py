"""iResNet face-recognition backbones in the insightface layout.

The "IR" residual unit (BN-Conv3x3-BN-PReLU-Conv3x3-BN plus shortcut) and the "E" embedding
head (BN-Dropout-Flatten-Dense-BN) are those of Deng et al., "ArcFace: Additive Angular Margin
Loss for Deep Face Recognition", CVPR 2019 (the LResNetxxE-IR networks), as laid out in
insightface's arcface_torch iresnet: a stride-1 3x3 stem keeps the full 112x112 resolution,
the first unit of every stage halves it (112 -> 56 -> 28 -> 14 -> 7), so the head flattens a
7x7x512 map into a dense layer. That dense layer is what adapts to other input sizes: its
input width is taken from the feature map at initialisation.

Mixed precision: parameters are float32; convolutions, BatchNorm outputs and PReLUs of the body
compute in `dtype`; BatchNorm statistics are reduced and stored in float32
(normalization.BatchNorm); the embedding projection (dense + BN) runs in float32 and returns
float32, as insightface does for its fp16 training (it casts to float before the final fc).
"""

from collections.abc import Sequence
import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from adam_face.models import convolution
from adam_face.models.normalization import PReLU, batch_norm

# He-normal initialisation for convolutions, suited to the PReLU/ReLU-like nonlinearities that
# follow them. fan_in rather than torchvision's fan_out: for a depthwise kernel [h, w, 1, C] the
# fan_out that flax (and PyTorch) computes is h*w*C instead of h*w, which would shrink
# MobileFaceNet's activations ~sqrt(C)-fold at every depthwise layer before BN statistics exist.
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def conv_layer(dtype: Any) -> functools.partial:
  """Bias-free nn.Conv in `dtype`, He-initialised, computed by convolution.conv_general_dilated:
  the same parameters and values, with the CPU rewrites of the strided and 1x1 layers."""
  return functools.partial(
      nn.Conv,
      use_bias=False,
      dtype=dtype,
      kernel_init=CONV_INIT,
      conv_general_dilated=convolution.conv_general_dilated,
  )


def check_images(images) -> None:
  """Rejects inputs that are not normalised float images [B, H, W, C] with a clear message."""
  if images.ndim != 4:
    raise ValueError(
        f"Expected images of shape [batch, height, width, channels], got shape {images.shape}; "
        "add a batch axis for a single image."
    )
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(
        f"Expected float images normalised as (x - 127.5) / 127.5, got dtype {images.dtype}; "
        "normalise the images before calling the model."
    )


class IRUnit(nn.Module):
  """The "IR" residual unit: BN-Conv3x3-BN-PReLU-Conv3x3(stride)-BN, plus a shortcut.

  The shortcut is the identity, or conv1x1(stride) + BN where the shape changes. The stride is
  on the second convolution, as in insightface, so the first one runs at the input resolution.
  """

  features: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    conv = conv_layer(self.dtype)
    norm = batch_norm(train, self.dtype)
    # Explicit 1-pixel padding (as PyTorch's padding=1): with 'SAME', flax pads an even-sized
    # input only at the end for stride 2, which would misalign the 3x3 windows with the 1x1
    # stride-2 shortcut (both must sample pixels 0, 2, 4, ...).
    y = norm(name="bn1")(x)
    y = conv(self.features, (3, 3), padding=1, name="conv1")(y)
    y = norm(name="bn2")(y, prelu=PReLU(name="prelu"))
    y = conv(self.features, (3, 3), strides=self.strides, padding=1, name="conv2")(y)
    y = norm(name="bn3")(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = conv(self.features, (1, 1), strides=self.strides, padding=0, name="shortcut_conv")(x)
      x = norm(name="shortcut_bn")(x)
    return x + y


class EmbeddingHead(nn.Module):
  """The "E" output block: BN - Dropout - Flatten - Dense(embedding_dim) - BN.

  The final BN has no scale (insightface fixes its weight at 1 and does not train it); its
  bias is trained. The dense layer keeps its bias, as insightface's fc does. Flatten, dense and
  the final BN run in float32 whatever the body's dtype.
  """

  embedding_dim: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = batch_norm(train, self.dtype)(name="bn")(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = x.reshape(x.shape[0], -1).astype(jnp.float32)
    x = nn.Dense(self.embedding_dim, dtype=jnp.float32, param_dtype=jnp.float32, name="fc")(x)
    return batch_norm(train, jnp.float32, use_scale=False)(name="features_bn")(x)


class IResNet(nn.Module):
  """iResNet: 3x3 stem, stages of IR units (stride 2 first), "E" embedding head.

  Attributes:
    stage_depths: number of IR units per stage, e.g. (3, 4, 14, 3) for iresnet50.
    stage_widths: channels per stage; the stem has the first stage's width (64 in insightface).
    embedding_dim: size of the returned (not L2-normalised) embedding.
    dropout_rate: dropout before the dense projection (insightface's default is 0).
    dtype: compute dtype of the body (jnp.float32 or jnp.bfloat16); parameters stay float32.
  """

  stage_depths: Sequence[int]
  stage_widths: Sequence[int] = (64, 128, 256, 512)
  embedding_dim: int = 512
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    check_images(images)
    if len(self.stage_depths) != len(self.stage_widths):
      raise ValueError(
          f"stage_depths {tuple(self.stage_depths)} and stage_widths {tuple(self.stage_widths)} "
          "must have one entry per stage."
      )
    if min(self.stage_depths) < 1:
      raise ValueError(f"Every stage needs at least one unit, got depths {self.stage_depths}.")
    x = images.astype(self.dtype)
    x = conv_layer(self.dtype)(self.stage_widths[0], (3, 3), padding=1, name="stem_conv")(x)
    x = batch_norm(train, self.dtype)(name="stem_bn")(x, prelu=PReLU(name="stem_prelu"))
    for stage, (depth, width) in enumerate(zip(self.stage_depths, self.stage_widths), start=1):
      for unit in range(1, depth + 1):
        x = IRUnit(
            width, strides=2 if unit == 1 else 1, dtype=self.dtype, name=f"stage{stage}_unit{unit}"
        )(x, train)
    return EmbeddingHead(self.embedding_dim, self.dropout_rate, self.dtype, name="head")(x, train)
