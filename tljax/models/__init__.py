"""Model registry: names -> (Linen module factory, STAGES)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from tljax.errors import UserError
from tljax.models import mobilenet_v2, resnet, small_cnn


@dataclasses.dataclass(frozen=True)
class ModelEntry:
  build: Callable[..., nn.Module]
  stages: tuple[str, ...]


MODELS: dict[str, ModelEntry] = {
    'small_cnn': ModelEntry(small_cnn.SmallCNN, small_cnn.STAGES),
    'resnet18': ModelEntry(functools.partial(resnet.ResNet, stage_sizes=(2, 2, 2, 2),
                                             block=resnet.BasicBlock), resnet.STAGES),
    'resnet34': ModelEntry(functools.partial(resnet.ResNet, stage_sizes=(3, 4, 6, 3),
                                             block=resnet.BasicBlock), resnet.STAGES),
    'resnet50': ModelEntry(functools.partial(resnet.ResNet, stage_sizes=(3, 4, 6, 3),
                                             block=resnet.Bottleneck), resnet.STAGES),
    'resnet101': ModelEntry(functools.partial(resnet.ResNet, stage_sizes=(3, 4, 23, 3),
                                              block=resnet.Bottleneck), resnet.STAGES),
    'mobilenet_v2': ModelEntry(mobilenet_v2.MobileNetV2, mobilenet_v2.STAGES),
}


def get_entry(name: str) -> ModelEntry:
  if name not in MODELS:
    raise UserError(f"unknown model {name!r} (config key model.name); known: "
                   f"{', '.join(sorted(MODELS))}")
  return MODELS[name]


def build_model(name: str, **kwargs) -> nn.Module:
  """Builds the Linen module registered as `name` with its keyword arguments."""
  try:
    return get_entry(name).build(**kwargs)
  except TypeError as e:
    raise UserError(f'model {name!r} (config key model) does not accept the arguments '
                    f'{sorted(kwargs)}: {e}') from None


def init_variables(model: nn.Module, image_size: int, channels: int = 3, seed: int = 0) -> dict:
  """Fresh variables (`params`, `batch_stats`) of `model` for square images of `image_size`."""
  dummy = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
  return jax.jit(lambda key: model.init(key, dummy, train=False))(jax.random.key(seed))
