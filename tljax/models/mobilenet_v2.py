"""MobileNetV2 (torchvision layout), with depthwise convs chosen per backend.

Stages group torchvision's `features` by output width: `stem` (features.0), `stage1`..`stage7`
(the inverted-residual groups), `final` (features.18, the 1x1 conv to 1280) and `head`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tljax.models.convert import Pair, TorchLayout, TorchWriter
from tljax.models.layers import DepthwiseConv, NormSpec, batch_norm, conv

STAGES = ('stem', 'stage1', 'stage2', 'stage3', 'stage4', 'stage5', 'stage6', 'stage7',
          'final', 'head')

# (expansion, output channels, blocks, first stride) per stage, as in the paper and torchvision.
INVERTED_RESIDUAL_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                              (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def make_divisible(value: float, divisor: int = 8) -> int:
  """Rounds channel counts like torchvision so width multipliers give the same shapes."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * value else rounded


class InvertedResidual(nn.Module):
  """Expand 1x1, depthwise kxk, project 1x1; shared with EfficientNet-Lite (k=5, 'SAME' pads)."""
  features: int
  stride: int
  expansion: int
  norm: NormSpec
  depthwise_impl: str = 'auto'
  kernel: int = 3
  same_padding: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    in_features = x.shape[-1]
    y = x
    if self.expansion != 1:
      y = conv(in_features * self.expansion, 1, name='expand_conv')(y)
      y = nn.relu6(batch_norm(self, self.norm, 'expand_bn', y, train))
    padding = 'SAME' if self.same_padding else (self.kernel - 1) // 2
    y = DepthwiseConv(self.kernel, self.stride, padding, self.depthwise_impl, name='dw_conv')(y)
    y = nn.relu6(batch_norm(self, self.norm, 'dw_bn', y, train))
    y = conv(self.features, 1, name='project_conv')(y)
    y = batch_norm(self, self.norm, 'project_bn', y, train)
    if self.stride == 1 and in_features == self.features:
      y = y + x
    return y


class Stage(nn.Module):
  expansion: int
  features: int
  num_blocks: int
  stride: int
  norm: NormSpec
  depthwise_impl: str
  kernel: int = 3
  same_padding: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for i in range(self.num_blocks):
      x = InvertedResidual(self.features, self.stride if i == 0 else 1, self.expansion,
                           self.norm, self.depthwise_impl, self.kernel, self.same_padding,
                           name=f'block{i}')(x, train)
    return x


class ConvBNReLU6(nn.Module):
  features: int
  kernel: int
  stride: int
  norm: NormSpec
  same_padding: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = conv(self.features, self.kernel, self.stride, name='conv', same=self.same_padding)(x)
    return nn.relu6(batch_norm(self, self.norm, 'bn', x, train))


class MobileNetV2(nn.Module):
  num_classes: int = 1000
  width_mult: float = 1.0
  dropout: float = 0.2
  norm: NormSpec = NormSpec()
  depthwise_impl: str = 'auto'
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    x = ConvBNReLU6(make_divisible(32 * self.width_mult), 3, 2, self.norm,
                     name='stem')(images.astype(self.dtype), train)
    for i, (t, c, n, s) in enumerate(INVERTED_RESIDUAL_SETTINGS):
      x = Stage(t, make_divisible(c * self.width_mult), n, s, self.norm, self.depthwise_impl,
                 name=f'stage{i + 1}')(x, train)
    last = make_divisible(1280 * max(1.0, self.width_mult))
    x = ConvBNReLU6(last, 1, 1, self.norm, name='final')(x, train)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name='head')(x)


def torchvision_pairs() -> Iterator[Pair]:
  """(kind, torchvision module, tljax module) of every layer (the converters' one mapping both
  ways)."""
  yield 'conv', 'features/0/0', 'stem/conv'
  yield 'bn', 'features/0/1', 'stem/bn'
  feature = 1
  for stage, (expansion, _, num_blocks, _) in enumerate(INVERTED_RESIDUAL_SETTINGS, start=1):
    for block in range(num_blocks):
      s, d = f'features/{feature}/conv', f'stage{stage}/block{block}'
      layers = [] if expansion == 1 else [('0/0', 'expand_conv'), ('0/1', 'expand_bn')]
      first = len(layers) // 2  # index of the depthwise ConvBNReLU in `conv`
      layers += [(f'{first}/0', 'dw_conv'), (f'{first}/1', 'dw_bn'),
                 (f'{first + 1}', 'project_conv'), (f'{first + 2}', 'project_bn')]
      for s_name, d_name in layers:
        yield ('bn' if d_name.endswith('_bn') else 'conv'), f'{s}/{s_name}', f'{d}/{d_name}'
      feature += 1
  yield 'conv', f'features/{feature}/0', 'final/conv'
  yield 'bn', f'features/{feature}/1', 'final/bn'
  yield 'dense', 'classifier/1', 'head'


def from_torchvision(flat: Mapping[str, np.ndarray], model: nn.Module | None = None
                     ) -> dict[str, np.ndarray]:
  """torchvision MobileNetV2 state dict (`features/3/conv/1/0/weight`) -> tljax variables."""
  return TorchLayout(flat).apply(torchvision_pairs())


def to_torchvision(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """tljax variables -> a torchvision MobileNetV2 state dict (`load_state_dict(strict=True)`)."""
  return TorchWriter(flat).apply(torchvision_pairs(), 'torchvision')
