"""Feature caching: a frozen, deterministic prefix of the model runs once per example.

When the first k STAGES are frozen and their input is deterministic (no augmentation), every epoch
computes the same prefix outputs again. Here they are computed once; training then feeds them to
the first trainable stage (`FromCut`), and XLA drops the unused prefix from the train step.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tljax.errors import UserError


class CacheError(UserError):
  """Feature caching was asked for where it would change what trains."""


def cut_stage(stages: Sequence[str], frozen_stages: int, augment: bool) -> str:
  """The first trainable stage, whose input is cached; errors say which condition fails."""
  if augment:
    raise CacheError('data.cache_features needs deterministic inputs: set data.augment=False '
                     '(random augmentation would be frozen into the cache)')
  if frozen_stages < 1:
    raise CacheError('data.cache_features needs frozen leading stages (freeze.preset '
                     f"'linear_probe' or 'stages:K'); none of {list(stages)} is frozen")
  return stages[frozen_stages]


def _is_call_of(context: Any, module_name: str) -> bool:
  return context.method_name == '__call__' and context.module.path == (module_name,)


def _checked_input(args: tuple, module_name: str) -> jax.Array:
  if not args or not isinstance(args[0], jax.Array):
    raise CacheError(f'cannot cache features at stage {module_name!r}: its first argument '
                     'is not an array')
  return args[0]


def prefix_features(model: nn.Module, variables: Any, images: jax.Array, module_name: str,
                    train: bool = False, rngs: Any = None) -> jax.Array:
  """The input the top-level submodule `module_name` receives when `model` sees `images`."""
  seen: list[jax.Array] = []

  def record(next_fun, args, kwargs, context):
    if _is_call_of(context, module_name):
      seen.append(_checked_input(args, module_name))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    model.apply(variables, images, train=train, rngs=rngs,
                mutable=['batch_stats'] if train else False)
  if len(seen) != 1:
    raise CacheError(f'cannot cache features at stage {module_name!r}: the model calls it '
                     f'{len(seen)} times, not once')
  return seen[0]


class FromCut:
  """`model` applied to cached prefix outputs instead of images, for the train step.

  The images the model is called with are zeros that nothing reads once the cut stage's input
  is replaced, so XLA removes the whole prefix from the compiled step.
  """

  def __init__(self, model: nn.Module, module_name: str, image_shape: Sequence[int]):
    self.model, self.module_name, self.image_shape = model, module_name, tuple(image_shape)

  def apply(self, variables: Any, features: jax.Array, **kwargs: Any) -> Any:
    def replace(next_fun, args, kwargs_, context):
      if _is_call_of(context, self.module_name):
        _checked_input(args, self.module_name)
        return next_fun(features, *args[1:], **kwargs_)
      return next_fun(*args, **kwargs_)

    images = jnp.zeros((features.shape[0], *self.image_shape), jnp.float32)
    with nn.intercept_methods(replace):
      return self.model.apply(variables, images, **kwargs)


def check_deterministic(model: nn.Module, variables: Any, images: jax.Array,
                        module_name: str) -> None:
  """Refuses caching when the frozen prefix is random in training (dropout before the cut):
  cached features could not stand in for what an uncached train step computes."""
  in_eval = prefix_features(model, variables, images, module_name)
  in_train = prefix_features(model, variables, images, module_name, train=True,
                             rngs={'dropout': jax.random.key(1)})
  if not np.allclose(np.asarray(in_eval), np.asarray(in_train), rtol=1e-5, atol=1e-6):
    fix = ('--config.model.dropout=0.0' if isinstance(getattr(model, 'dropout', None), float)
           else "the model's dropout before that stage to 0")
    raise CacheError(f'data.cache_features: the frozen layers before stage {module_name!r} '
                     f'are random in training (dropout); set {fix}, or turn caching off '
                     '(--config.data.cache_features=false)')


def compute(model: nn.Module, variables: Any, batches: Iterable[dict[str, np.ndarray]],
            module_name: str) -> dict[str, np.ndarray]:
  """Prefix outputs and labels of every example, in order, as host arrays; refuses a prefix
  that is random in training (checked on the first batch)."""
  extract = jax.jit(lambda v, x: prefix_features(model, v, x, module_name))
  features, labels = [], []
  for batch in batches:
    if not features:
      check_deterministic(model, variables, jnp.asarray(batch['image'][:4]), module_name)
    features.append(np.asarray(extract(variables, batch['image'])))
    labels.append(np.asarray(batch['label']))
  if not features:
    raise CacheError('data.cache_features: the training split has no examples')
  return dict(image=np.concatenate(features), label=np.concatenate(labels))
