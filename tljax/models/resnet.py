"""ResNet v1.5 (torchvision layout): basic and bottleneck blocks with BatchNorm.

Parameter paths follow torchvision so converters stay plain: `stem/conv1`, `stem/bn1`,
`layer2/block0/conv1`, `layer2/block0/downsample/conv`, `head`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tljax.models.convert import Pair, TorchLayout, TorchWriter
from tljax.models.layers import NormSpec, batch_norm, conv

STAGES = ('stem', 'layer1', 'layer2', 'layer3', 'layer4', 'head')


class BasicBlock(nn.Module):
  features: int
  stride: int
  norm: NormSpec
  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    residual = x
    y = conv(self.features, 3, self.stride, name='conv1')(x)
    y = nn.relu(batch_norm(self, self.norm, 'bn1', y, train))
    y = conv(self.features, 3, name='conv2')(y)
    y = batch_norm(self, self.norm, 'bn2', y, train)
    if residual.shape != y.shape:
      residual = _Downsample(self.features, self.stride, self.norm, name='downsample')(x, train)
    return nn.relu(y + residual)


class Bottleneck(nn.Module):
  features: int
  stride: int
  norm: NormSpec
  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    residual = x
    y = conv(self.features, 1, name='conv1')(x)
    y = nn.relu(batch_norm(self, self.norm, 'bn1', y, train))
    y = conv(self.features, 3, self.stride, name='conv2')(y)  # stride on the 3x3 (v1.5)
    y = nn.relu(batch_norm(self, self.norm, 'bn2', y, train))
    y = conv(self.features * 4, 1, name='conv3')(y)
    y = batch_norm(self, self.norm, 'bn3', y, train)
    if residual.shape != y.shape:
      residual = _Downsample(self.features * 4, self.stride, self.norm,
                             name='downsample')(x, train)
    return nn.relu(y + residual)


class _Downsample(nn.Module):
  features: int
  stride: int
  norm: NormSpec

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = conv(self.features, 1, self.stride, name='conv')(x)
    return batch_norm(self, self.norm, 'bn', x, train)


class _Stem(nn.Module):
  width: int
  norm: NormSpec

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = conv(self.width, 7, 2, name='conv1')(x)
    x = nn.relu(batch_norm(self, self.norm, 'bn1', x, train))
    return nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))


class _Layer(nn.Module):
  block: type[nn.Module]
  num_blocks: int
  features: int
  stride: int
  norm: NormSpec

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for i in range(self.num_blocks):
      x = self.block(self.features, self.stride if i == 0 else 1, self.norm,
                     name=f'block{i}')(x, train)
    return x


class ResNet(nn.Module):
  """`stage_sizes=(2, 2, 2, 2)` with BasicBlock is ResNet-18; (3, 4, 6, 3) Bottleneck is -50."""
  stage_sizes: Sequence[int]
  block: type[nn.Module] = Bottleneck
  num_classes: int = 1000
  width: int = 64
  norm: NormSpec = NormSpec()
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    x = _Stem(self.width, self.norm, name='stem')(images.astype(self.dtype), train)
    for i, num_blocks in enumerate(self.stage_sizes):
      x = _Layer(self.block, num_blocks, self.width * 2**i, 1 if i == 0 else 2, self.norm,
                 name=f'layer{i + 1}')(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name='head')(x)


def torchvision_pairs(exists: Callable[[str, str], bool]) -> Iterator[Pair]:
  """(kind, torchvision module, tljax module) of every layer; `exists(torchvision, tljax)`
  tells which blocks and convs the model at hand has (the converters' one mapping both ways)."""
  yield 'conv', 'conv1', 'stem/conv1'
  yield 'bn', 'bn1', 'stem/bn1'
  for layer in range(1, 5):
    block = 0
    while exists(f'layer{layer}/{block}/conv1', f'layer{layer}/block{block}/conv1'):
      s, d = f'layer{layer}/{block}', f'layer{layer}/block{block}'
      i = 1
      while exists(f'{s}/conv{i}', f'{d}/conv{i}'):  # two convs in a basic block, three in a
        yield 'conv', f'{s}/conv{i}', f'{d}/conv{i}'  # bottleneck
        yield 'bn', f'{s}/bn{i}', f'{d}/bn{i}'
        i += 1
      if exists(f'{s}/downsample/0', f'{d}/downsample/conv'):
        yield 'conv', f'{s}/downsample/0', f'{d}/downsample/conv'
        yield 'bn', f'{s}/downsample/1', f'{d}/downsample/bn'
      block += 1
  yield 'dense', 'fc', 'head'


def from_torchvision(flat: Mapping[str, np.ndarray], model: nn.Module | None = None
                     ) -> dict[str, np.ndarray]:
  """torchvision or timm ResNet state dict (`layer1/0/conv1/weight`, `fc`) -> tljax variables."""
  src = TorchLayout(flat)
  return src.apply(torchvision_pairs(lambda torch_name, _: src.has(f'{torch_name}/weight')))


def to_torchvision(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """tljax variables -> a torchvision ResNet state dict (`load_state_dict(strict=True)`)."""
  out = TorchWriter(flat)
  return out.apply(torchvision_pairs(lambda _, path: out.has(path)), 'torchvision')


def from_hf(flat: Mapping[str, np.ndarray], model: nn.Module | None = None
            ) -> dict[str, np.ndarray]:
  """HF transformers ResNet(ForImageClassification) safetensors -> tljax variables."""
  prefix = 'resnet/' if any(k.startswith('resnet/') for k in flat) else ''
  src = TorchLayout(flat, prefix)
  src.conv('embedder/embedder/convolution', 'stem/conv1')
  src.batch_norm('embedder/embedder/normalization', 'stem/bn1')
  stage = 0
  while src.has(f'encoder/stages/{stage}/layers/0/layer/0/convolution/weight'):
    block = 0
    while src.has(f'encoder/stages/{stage}/layers/{block}/layer/0/convolution/weight'):
      s, d = f'encoder/stages/{stage}/layers/{block}', f'layer{stage + 1}/block{block}'
      i = 0
      while src.has(f'{s}/layer/{i}/convolution/weight'):
        src.conv(f'{s}/layer/{i}/convolution', f'{d}/conv{i + 1}')
        src.batch_norm(f'{s}/layer/{i}/normalization', f'{d}/bn{i + 1}')
        i += 1
      src.conv(f'{s}/shortcut/convolution', f'{d}/downsample/conv')
      src.batch_norm(f'{s}/shortcut/normalization', f'{d}/downsample/bn')
      block += 1
    stage += 1
  src.prefix = ''
  src.dense('classifier/1', 'head')
  return src.result()
