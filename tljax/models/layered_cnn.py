"""A plain CNN whose every layer is its own stage, for layer-by-layer transfer experiments.

Yosinski et al. (2014) copy the first n layers of one network into another; this model gives
each conv and dense layer a stage name, so `init.load_stages` and `freeze.preset='stages:n'`
address exactly the first n layers. No BatchNorm: transferred layers carry no statistics.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

STAGES = ('conv1', 'conv2', 'conv3', 'conv4', 'fc5', 'fc6', 'head')


class LayeredCNN(nn.Module):
  """conv1-conv2-pool-conv3-conv4-pool-fc5-fc6-head, ReLU after each hidden layer."""
  num_classes: int = 10
  conv_widths: Sequence[int] = (16, 16, 32, 32)
  dense_width: int = 128
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    del train  # no dropout or normalisation: the same function in training and evaluation
    x = images.astype(self.dtype)
    for index, features in enumerate(self.conv_widths):
      x = nn.relu(nn.Conv(features, (3, 3), padding='SAME', name=STAGES[index])(x))
      if index % 2 == 1:
        x = nn.max_pool(x, (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    for name in STAGES[4:6]:
      x = nn.relu(nn.Dense(self.dense_width, name=name)(x))
    return nn.Dense(self.num_classes, name='head')(x)
