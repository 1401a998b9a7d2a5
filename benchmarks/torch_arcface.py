"""arcface_torch's backbones restated in PyTorch, with the module names of its state dicts.

From the published layout (insightface, recognition/arcface_torch/backbones: iresnet.py and
mobilefacenet.py). Two users: benchmarks/bench_train_step.py's PyTorch side and
tests/test_convert.py, whose converter reads these state dicts. Importing this module needs torch
(benchmarks/requirements.txt).

As in arcface_torch, the embedding layers (fc / conv_sep and the final BatchNorm) run in float32
outside any autocast region, which its `fp16` flag otherwise covers.
"""

import torch
from torch import nn

IRESNET_WIDTHS = (64, 128, 256, 512)


class Layers(nn.Module):
  """Children in `.layers` (as arcface_torch's ConvBlock, LinearBlock, DepthWise and Residual
  keep them), with an optional residual connection."""

  def __init__(self, *layers, residual=False):
    super().__init__()
    self.layers = nn.Sequential(*layers)
    self.residual = residual

  def forward(self, x):
    return x + self.layers(x) if self.residual else self.layers(x)


def conv_bn(in_channels, out_channels, kernel=1, stride=1, padding=0, groups=1, prelu=True):
  """arcface_torch's ConvBlock (conv, BN, PReLU) or, without the PReLU, LinearBlock."""
  layers = [
      nn.Conv2d(in_channels, out_channels, kernel, stride, padding, groups=groups, bias=False),
      nn.BatchNorm2d(out_channels),
  ]
  return Layers(*layers, nn.PReLU(out_channels)) if prelu else Layers(*layers)


def depthwise_unit(in_channels, out_channels, hidden, stride=1):
  """arcface_torch's DepthWise: expand 1x1, depthwise 3x3 (`hidden` groups), project 1x1; a
  residual where it keeps the shape."""
  return Layers(
      conv_bn(in_channels, hidden),
      conv_bn(hidden, hidden, 3, stride, 1, groups=hidden),
      conv_bn(hidden, out_channels, prelu=False),
      residual=stride == 1 and in_channels == out_channels,
  )


def float32_embedding(layers, x: torch.Tensor) -> torch.Tensor:
  """`layers` applied to x in float32, outside autocast (arcface_torch's `x.float() if fp16`).
  Without autocast, plainly: an ONNX export then holds no Cast node (the converter reads none)."""
  if not torch.is_autocast_enabled(x.device.type):
    return layers(x)
  with torch.autocast(x.device.type, enabled=False):
    return layers(x.float())


class MobileFaceNetMBF(nn.Module):
  """arcface_torch's get_mbf(fp16, num_features, blocks=(1, 4, 6, 2), scale=2)."""

  def __init__(self, num_features):
    super().__init__()
    self.layers = nn.ModuleList(
        [
            conv_bn(3, 128, 3, 2, 1),
            conv_bn(128, 128, 3, 1, 1, groups=64),
            depthwise_unit(128, 128, 128, stride=2),
            Layers(*[depthwise_unit(128, 128, 128) for _ in range(4)]),
            depthwise_unit(128, 256, 256, stride=2),
            Layers(*[depthwise_unit(256, 256, 256) for _ in range(6)]),
            depthwise_unit(256, 256, 512, stride=2),
            Layers(*[depthwise_unit(256, 256, 256) for _ in range(2)]),
        ]
    )
    self.conv_sep = conv_bn(256, 512)
    self.features = Layers(
        conv_bn(512, 512, 7, groups=512, prelu=False),
        nn.Flatten(),
        nn.Linear(512, num_features, bias=False),
        nn.BatchNorm1d(num_features),
    )

  def forward(self, x):
    for layer in self.layers:
      x = layer(x)
    return float32_embedding(lambda y: self.features(self.conv_sep(y)), x)


class IBasicBlock(nn.Module):
  """arcface_torch's residual unit: BN, conv3x3, BN, PReLU, conv3x3 (strided), BN, plus shortcut."""

  def __init__(self, in_channels, channels, stride):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_channels, eps=1e-5)
    self.conv1 = nn.Conv2d(in_channels, channels, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(channels, eps=1e-5)
    self.prelu = nn.PReLU(channels)
    self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(channels, eps=1e-5)
    self.downsample = None
    if stride != 1 or in_channels != channels:
      self.downsample = nn.Sequential(
          nn.Conv2d(in_channels, channels, 1, stride, bias=False),
          nn.BatchNorm2d(channels, eps=1e-5),
      )

  def forward(self, x):
    y = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
    return y + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
  """arcface_torch's IResNet: conv3x3-BN-PReLU stem, one strided stage per depth, then
  BN-flatten-fc-BN1d with the last BN's scale frozen at 1. `widths` and `image_size` other than
  arcface_torch's (64-512, 112) give adam_face's smaller iResNets the same layout."""

  def __init__(self, depths, num_features, widths=IRESNET_WIDTHS, image_size=112):
    super().__init__()
    self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(widths[0], eps=1e-5)
    self.prelu = nn.PReLU(widths[0])
    self.stages = len(depths)
    in_channels, side = widths[0], image_size
    for stage, (depth, channels) in enumerate(zip(depths, widths), start=1):
      units = [IBasicBlock(in_channels, channels, 2)]
      units += [IBasicBlock(channels, channels, 1) for _ in range(depth - 1)]
      setattr(self, f"layer{stage}", nn.Sequential(*units))
      in_channels, side = channels, (side + 1) // 2  # 3x3, stride 2, pad 1 rounds up.
    self.bn2 = nn.BatchNorm2d(in_channels, eps=1e-5)
    self.fc = nn.Linear(in_channels * side * side, num_features)
    self.features = nn.BatchNorm1d(num_features, eps=1e-5)
    nn.init.constant_(self.features.weight, 1.0)
    self.features.weight.requires_grad = False

  def forward(self, x):
    x = self.prelu(self.bn1(self.conv1(x)))
    for stage in range(1, self.stages + 1):
      x = getattr(self, f"layer{stage}")(x)
    x = torch.flatten(self.bn2(x), 1)
    return float32_embedding(lambda y: self.features(self.fc(y)), x)
