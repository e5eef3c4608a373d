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


def stage_inputs(model: nn.Module, variables: Any, inputs: Sequence[jax.Array],
                 module_names: Sequence[str], train: bool = False, rngs: Any = None
                 ) -> tuple[dict[str, jax.Array], Any]:
  """The input each top-level submodule of `module_names` receives when `model` sees `inputs`
  (an image batch, or token ids, attention mask and token types), and the model's output, from
  one forward pass."""
  seen: dict[str, list[jax.Array]] = {name: [] for name in module_names}

  def record(next_fun, args, kwargs, context):
    if context.method_name == '__call__' and len(context.module.path) == 1 and (
        context.module.path[0] in seen):
      seen[context.module.path[0]].append(_checked_input(args, context.module.path[0]))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    output = model.apply(variables, *inputs, train=train, rngs=rngs,
                         mutable=['batch_stats'] if train else False)
  for name, found in seen.items():
    if len(found) != 1:
      raise CacheError(f'cannot take the features at stage {name!r}: the model calls it '
                       f'{len(found)} times, not once')
  return {name: found[0] for name, found in seen.items()}, output


def prefix_features(model: nn.Module, variables: Any, inputs: Sequence[jax.Array],
                    module_name: str, train: bool = False, rngs: Any = None) -> jax.Array:
  """The input the top-level submodule `module_name` receives when `model` sees `inputs` (an
  image batch, or token ids, attention mask and token types)."""
  return stage_inputs(model, variables, inputs, (module_name,), train, rngs)[0][module_name]


FEATURES = 'features'  # the batch key of cached prefix outputs


class FromCut:
  """`model` applied to cached prefix outputs instead of its first input, for the train step.

  The first input (images, or token ids) is zeros that nothing reads once the cut stage's input
  is replaced, so XLA removes the whole prefix from the compiled step; the model's other inputs
  (a text's attention mask) are passed as they are, for the layers after the cut.
  """

  def __init__(self, model: nn.Module, module_name: str, input_shape: Sequence[int],
               input_dtype: Any = jnp.float32):
    self.model, self.module_name = model, module_name
    self.input_shape, self.input_dtype = tuple(input_shape), input_dtype

  def apply(self, variables: Any, features: jax.Array, *rest: jax.Array, **kwargs: Any) -> Any:
    def replace(next_fun, args, kwargs_, context):
      if _is_call_of(context, self.module_name):
        _checked_input(args, self.module_name)
        return next_fun(features, *args[1:], **kwargs_)
      return next_fun(*args, **kwargs_)

    dummy = jnp.zeros((features.shape[0], *self.input_shape), self.input_dtype)
    with nn.intercept_methods(replace):
      return self.model.apply(variables, dummy, *rest, **kwargs)


def check_deterministic(model: nn.Module, variables: Any, inputs: Sequence[jax.Array],
                        module_name: str) -> None:
  """Refuses caching when the frozen prefix is random in training (dropout before the cut):
  cached features could not stand in for what an uncached train step computes."""
  in_eval = prefix_features(model, variables, inputs, module_name)
  in_train = prefix_features(model, variables, inputs, module_name, train=True,
                             rngs={'dropout': jax.random.key(1)})
  if not np.allclose(np.asarray(in_eval), np.asarray(in_train), rtol=1e-5, atol=1e-6):
    fix = ('--config.lora.dropout=0.0 (adapters before the cut)'
           if getattr(model, 'lora_dropout', 0.0) else
           '--config.model.dropout=0.0' if isinstance(getattr(model, 'dropout', None), float)
           else "the model's dropout before that stage to 0")
    raise CacheError(f'data.cache_features: the frozen layers before stage {module_name!r} '
                     f'are random in training (dropout); set {fix}, or turn caching off '
                     '(--config.data.cache_features=false)')


def compute(model: nn.Module, variables: Any, batches: Iterable[dict[str, np.ndarray]],
            module_name: str, input_keys: Sequence[str] = ('image',)) -> dict[str, np.ndarray]:
  """Prefix outputs (`features`), labels and the model's other inputs of every example, in
  order, as host arrays; refuses a prefix that is random in training (checked on the first
  batch)."""
  extract = jax.jit(lambda v, inputs: prefix_features(model, v, inputs, module_name))
  features, labels = [], []
  rest: dict[str, list[np.ndarray]] = {key: [] for key in input_keys[1:]}
  for batch in batches:
    inputs = [jnp.asarray(batch[key]) for key in input_keys]
    if not features:
      check_deterministic(model, variables, [x[:4] for x in inputs], module_name)
    features.append(np.asarray(extract(variables, inputs)))
    labels.append(np.asarray(batch['label']))
    for key in rest:
      rest[key].append(np.asarray(batch[key]))
  if not features:
    raise CacheError('data.cache_features: the training split has no examples')
  return {FEATURES: np.concatenate(features), 'label': np.concatenate(labels),
          **{key: np.concatenate(arrays) for key, arrays in rest.items()}}
