"""A small CNN (a few thousand parameters) for fast tests and Fashion-MNIST-sized tasks."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from tljax.models.layers import NormSpec, batch_norm, conv

STAGES = ('stem', 'stage1', 'stage2', 'head')


class SmallCNN(nn.Module):
  """stem conv -> two conv+BN stages (the second strided) -> global pool -> dense head."""
  num_classes: int = 10
  width: int = 8
  norm: NormSpec = NormSpec()
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    x = images.astype(self.dtype)
    for stage, (features, stride) in zip(
        STAGES[:-1], ((self.width, 1), (2 * self.width, 2), (4 * self.width, 2)), strict=True):
      block = _ConvBN(features, stride, self.norm, name=stage)
      x = block(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name='head')(x)


class _ConvBN(nn.Module):
  features: int
  stride: int
  norm: NormSpec

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = conv(self.features, 3, self.stride, name='conv')(x)
    return nn.relu(batch_norm(self, self.norm, 'bn', x, train))
