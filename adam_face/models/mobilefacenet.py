"""MobileFaceNet: a ~1 M-parameter face-recognition backbone.

Chen, Liu, Gao and Han, "MobileFaceNets: Efficient CNNs for Accurate Real-Time Face
Verification on Mobile Devices", CCBR 2018 (arXiv:1804.07573). Table 1 of the paper gives the
layout reproduced here: a 3x3 stride-2 convolution and a 3x3 depthwise convolution, MobileNetV2
linear bottlenecks (expand 1x1 - depthwise 3x3 - linear project 1x1, residual where the shape is
kept), a 1x1 convolution to 512 channels, a *global depthwise convolution* (GDConv: a linear
depthwise convolution whose kernel covers the whole 7x7 map, so every spatial position gets its
own learned weight, unlike global average pooling) and a linear 1x1 convolution to the
embedding. PReLU is the nonlinearity and every convolution is followed by BatchNorm. The paper
reports 0.99 M parameters and 221 M multiply-adds for a 128-d embedding at 112x112.

The GDConv kernel is sized to the final feature map at initialisation, so other input sizes
work (56x56 gives a 4x4 map and a 4x4 GDConv). Mixed precision follows iresnet.py: the body
computes in `dtype`, the embedding projection and its BN in float32.
"""

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from adam_face.models.iresnet import CONV_INIT, PReLU, batch_norm, check_images

# (expansion factor t, output channels c, repeats n, stride of the first repeat s): Table 1.
BOTTLENECKS = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))


class Bottleneck(nn.Module):
  """MobileNetV2 linear bottleneck with PReLU: 1x1 expand, 3x3 depthwise, linear 1x1 project."""

  features: int
  expansion: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=CONV_INIT)
    norm = batch_norm(train, self.dtype)
    hidden = x.shape[-1] * self.expansion
    y = conv(hidden, (1, 1), name="expand_conv")(x)
    y = PReLU(name="expand_prelu")(norm(name="expand_bn")(y))
    y = conv(hidden, (3, 3), strides=self.strides, padding=1, feature_group_count=hidden,
             name="depthwise_conv")(y)
    y = PReLU(name="depthwise_prelu")(norm(name="depthwise_bn")(y))
    y = conv(self.features, (1, 1), name="project_conv")(y)
    y = norm(name="project_bn")(y)
    if self.strides == 1 and x.shape[-1] == self.features:
      y = x + y
    return y


class MobileFaceNet(nn.Module):
  """MobileFaceNet of Chen et al. 2018 (the paper's embedding is 128-d; 512 here by default).

  Attributes:
    embedding_dim: size of the returned (not L2-normalised) embedding.
    dropout_rate: dropout before the embedding projection (the paper uses none: default 0).
    dtype: compute dtype of the body (jnp.float32 or jnp.bfloat16); parameters stay float32.
  """

  embedding_dim: int = 512
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    check_images(images)
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=CONV_INIT)
    norm = batch_norm(train, self.dtype)
    x = images.astype(self.dtype)
    x = conv(64, (3, 3), strides=2, padding=1, name="stem_conv")(x)
    x = PReLU(name="stem_prelu")(norm(name="stem_bn")(x))
    x = conv(64, (3, 3), padding=1, feature_group_count=64, name="stem_depthwise_conv")(x)
    x = PReLU(name="stem_depthwise_prelu")(norm(name="stem_depthwise_bn")(x))
    index = 0
    for expansion, features, repeats, strides in BOTTLENECKS:
      for repeat in range(repeats):
        index += 1
        x = Bottleneck(features, expansion, strides if repeat == 0 else 1, self.dtype,
                       name=f"bottleneck{index}")(x, train)
    x = conv(512, (1, 1), name="expand_conv")(x)
    x = PReLU(name="expand_prelu")(norm(name="expand_bn")(x))
    # Linear GDConv: one depthwise kernel spanning the whole remaining map, no nonlinearity.
    x = conv(512, x.shape[1:3], padding="VALID", feature_group_count=512, name="gdconv")(x)
    x = norm(name="gdconv_bn")(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    # Linear 1x1 convolution on the 1x1 map == a dense layer without bias, run in float32.
    x = x.reshape(x.shape[0], -1).astype(jnp.float32)
    x = nn.Dense(self.embedding_dim, use_bias=False, dtype=jnp.float32, name="embedding")(x)
    # Scale fixed at 1, as in the iResNet "E" head (insightface fixes gamma of this BN too).
    return batch_norm(train, jnp.float32, use_scale=False)(name="embedding_bn")(x)
