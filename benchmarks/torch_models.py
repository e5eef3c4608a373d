"""The benchmark's PyTorch baselines, each split into the same ordered stages as tljax's STAGES.

MobileNetV2 is written out here (torchvision's layout; torchvision itself has no wheel matching our
pinned CPU torch); ResNet-50 and ViT-S/16 are the transformers implementations our parity tests
compare against.
"""

from __future__ import annotations

import torch
from torch import nn

# (expansion, output channels, blocks, first stride), as in torchvision and tljax.
_MOBILENET_V2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                 (6, 160, 3, 2), (6, 320, 1, 1))


def _conv_bn_relu6(cin: int, cout: int, kernel: int, stride: int, groups: int = 1) -> nn.Module:
  return nn.Sequential(
      nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
      nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class _InvertedResidual(nn.Module):
  def __init__(self, cin: int, cout: int, stride: int, expansion: int):
    super().__init__()
    hidden = cin * expansion
    layers = [] if expansion == 1 else [_conv_bn_relu6(cin, hidden, 1, 1)]
    layers += [_conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
               nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
    self.conv = nn.Sequential(*layers)
    self.residual = stride == 1 and cin == cout

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return x + self.conv(x) if self.residual else self.conv(x)


class _PoolHead(nn.Module):
  """Global average pool, dropout and the classifier, as tljax's `head` stage sees them."""

  def __init__(self, features: int, num_classes: int, dropout: float):
    super().__init__()
    self.dropout = nn.Dropout(dropout)
    self.fc = nn.Linear(features, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fc(self.dropout(x.mean((2, 3))))


def mobilenet_v2(num_classes: int) -> list[nn.Module]:
  """Stages stem, stage1..7, final, head (tljax's mobilenet_v2.STAGES)."""
  stages: list[nn.Module] = [_conv_bn_relu6(3, 32, 3, 2)]
  cin = 32
  for expansion, cout, blocks, stride in _MOBILENET_V2:
    stages.append(nn.Sequential(*(_InvertedResidual(cin if i == 0 else cout, cout,
                                                    stride if i == 0 else 1, expansion)
                                  for i in range(blocks))))
    cin = cout
  stages += [_conv_bn_relu6(cin, 1280, 1, 1), _PoolHead(1280, num_classes, 0.2)]
  return stages


class _Lambda(nn.Module):
  def __init__(self, fn):
    super().__init__()
    self.fn = fn

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fn(x)


def resnet50(num_classes: int) -> list[nn.Module]:
  """Stages stem, layer1..4, head (tljax's resnet.STAGES), from transformers' ResNet."""
  from transformers import ResNetConfig, ResNetForImageClassification
  model = ResNetForImageClassification(ResNetConfig(num_labels=num_classes))
  head = nn.Sequential(model.resnet.pooler, nn.Flatten(), model.classifier[-1])
  return [model.resnet.embedder, *model.resnet.encoder.stages, head]


class _ViTBlock(nn.Module):
  def __init__(self, layer: nn.Module):
    super().__init__()
    self.layer = layer

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = self.layer(x)
    return out[0] if isinstance(out, tuple) else out


def vit_s16(num_classes: int, image_size: int) -> list[nn.Module]:
  """Stages embed, block0..11, norm, head (tljax's vit stages), from transformers' ViT."""
  from transformers import ViTConfig, ViTForImageClassification
  config = ViTConfig(image_size=image_size, patch_size=16, hidden_size=384, num_hidden_layers=12,
                     num_attention_heads=6, intermediate_size=1536, num_labels=num_classes,
                     layer_norm_eps=1e-6, attn_implementation='sdpa')
  model = ViTForImageClassification(config)
  layers = model.vit.layers if hasattr(model.vit, 'layers') else model.vit.encoder.layer
  blocks = [_ViTBlock(layer) for layer in layers]
  head = nn.Sequential(_Lambda(lambda x: x[:, 0]), model.classifier)
  return [model.vit.embeddings, *blocks, model.vit.layernorm, head]


def build(name: str, num_classes: int, image_size: int) -> list[nn.Module]:
  if name == 'mobilenet_v2':
    return mobilenet_v2(num_classes)
  if name == 'resnet50':
    return resnet50(num_classes)
  if name == 'vit_s16':
    return vit_s16(num_classes, image_size)
  raise ValueError(f'no PyTorch baseline for {name!r}')


class Staged(nn.Module):
  """The stages in order; the first `frozen` are frozen: no grads, BatchNorm in eval mode."""

  def __init__(self, stages: list[nn.Module], frozen: int):
    super().__init__()
    self.stages = nn.ModuleList(stages)
    self.frozen = frozen
    for stage in self.stages[:frozen]:
      stage.requires_grad_(False)

  def train(self, mode: bool = True) -> Staged:
    super().train(mode)
    for stage in self.stages[:self.frozen]:
      stage.eval()
    return self

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():  # the frozen prefix keeps no graph
      for stage in self.stages[:self.frozen]:
        x = stage(x)
    for stage in self.stages[self.frozen:]:
      x = stage(x)
    return x
