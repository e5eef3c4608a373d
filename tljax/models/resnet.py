"""ResNet v1.5 (torchvision layout): basic and bottleneck blocks with BatchNorm.

Parameter paths follow torchvision so converters stay plain: `stem/conv1`, `stem/bn1`,
`layer2/block0/conv1`, `layer2/block0/downsample/conv`, `head`.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

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
