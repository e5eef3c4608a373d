"""LoRA (Hu et al. 2021): a trainable low-rank update A @ B beside each frozen matrix weight.

The adapters are ordinary parameters in their own subtree, `params['lora']`, mirroring each
target module's path, so freeze groups address them like any other leaf ('lora/.*' trains,
the rest is frozen) and one optimizer and one checkpoint cover them. `LoraModel` adds
x @ A @ B * alpha / rank to each target module's output through a method interceptor, so no
model file changes; `merge` folds the update into the kernels for export.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from tljax.errors import UserError
from tljax.freeze import flat_paths
from tljax.models.layers import PointwiseConv

LORA = 'lora'  # the top-level key of the adapter subtree in the params pytree
KERNEL = 'kernel'
ATTENTION_OUT = 'out'  # flax attention's output projection: kernel (heads, head_dim, out)
SUPPORTED = 'Dense, DenseGeneral (attention query/key/value/out), 1x1 Conv and PointwiseConv'


class LoraError(UserError):
  """A LoRA configuration that cannot adapt the model as asked."""


def _shape(leaf: Any) -> tuple[int, ...]:
  return tuple(getattr(leaf, 'shape', None) or np.shape(leaf))


def _module_path(kernel_path: str) -> str:
  return kernel_path.rsplit('/', 1)[0] if '/' in kernel_path else ''


def matrix_shape(path: str, shape: Sequence[int]) -> tuple[int, int] | None:
  """(fan_in, fan_out) of a kernel applied as one matrix product, or None where it is not."""
  shape = tuple(int(s) for s in shape)
  if path.rsplit('/', 1)[-1] != KERNEL:
    return None
  if len(shape) == 2:
    return shape[0], shape[1]
  if len(shape) == 4 and shape[:2] == (1, 1):
    return shape[2], shape[3]
  if len(shape) == 3:  # attention projections (DenseGeneral)
    if path.split('/')[-2:-1] == [ATTENTION_OUT]:
      return shape[0] * shape[1], shape[2]
    return shape[0], shape[1] * shape[2]
  return None


def _why_not(path: str, shape: tuple[int, ...]) -> str:
  name = path.rsplit('/', 1)[-1]
  if name != KERNEL:
    return f'is a {name!r}, not a kernel (a bias, norm scale or embedding table)'
  if len(shape) == 4 and shape[2] == 1:
    return f'is a depthwise {shape[0]}x{shape[1]} kernel {shape}'
  if len(shape) == 4:
    return f'is a {shape[0]}x{shape[1]} convolution kernel {shape}'
  return f'is a {len(shape)}-D kernel {shape}'


def find_targets(params: Mapping[str, Any], patterns: Sequence[str]
                 ) -> dict[str, tuple[int, int]]:
  """Kernel paths matched by `patterns` (re.fullmatch on `a/b/kernel`, as in tljax.freeze) ->
  their matrix shape (fan_in, fan_out); each pattern must match only matrix kernels."""
  if isinstance(patterns, str) or not patterns:
    raise LoraError(f'lora.targets must be a non-empty list of regexes, got {patterns!r}; e.g. '
                    "['.*/attn/(query|value)/kernel']")
  shapes = {path: _shape(leaf) for path, leaf in flat_paths(params).items()
            if not path.startswith(f'{LORA}/')}
  examples = [p for p, s in shapes.items() if matrix_shape(p, s)][:3] or list(shapes)[:3]
  targets: dict[str, tuple[int, int]] = {}
  for index, pattern in enumerate(patterns):
    key = f'lora.targets[{index}]'
    try:
      regex = re.compile(pattern)
    except (re.error, TypeError) as e:
      raise LoraError(f'{key} {pattern!r} is not a regex: {e}') from None
    matched = [path for path in shapes if regex.fullmatch(path)]
    if not matched:
      raise LoraError(f'{key} {pattern!r} matches no parameter; patterns match whole paths '
                      f'such as {", ".join(examples)}')
    for path in matched:
      matrix = matrix_shape(path, shapes[path])
      if matrix is None:
        raise LoraError(f'{key} {pattern!r} matches {path}, which {_why_not(path, shapes[path])}'
                        f'; LoRA adapts matrix kernels ({SUPPORTED}): narrow the pattern')
      targets[path] = matrix
  return targets


def check_rank(rank: int, shapes: Mapping[str, tuple[int, int]]) -> None:
  """Refuses a rank below 1 or above the smaller side of some target matrix (it would add
  nothing there but parameters)."""
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
    raise LoraError(f'lora.rank={rank!r} must be an integer >= 1 (typically 4 to 16)')
  if shapes:
    path, shape = min(shapes.items(), key=lambda item: (min(item[1]), item[0]))
    if rank > min(shape):
      raise LoraError(f'lora.rank={rank} exceeds the smaller side of {path} (matrix '
                      f'{shape[0]}x{shape[1]}); set lora.rank to at most {min(shape)} or leave '
                      'that kernel out of lora.targets')


def scale(alpha: float, rank: int) -> float:
  """The factor alpha / rank on the adapters' output, so retuning the rank keeps the step size."""
  if (isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating))
      or not math.isfinite(alpha) or alpha <= 0):
    raise LoraError(f'lora.alpha={alpha!r} must be a finite number > 0 (often 2 * lora.rank)')
  check_rank(rank, {})
  return float(alpha) / rank


def _check_dropout(dropout: float) -> float:
  if (isinstance(dropout, bool) or not isinstance(dropout, (int, float, np.floating))
      or not 0.0 <= dropout < 1.0):
    raise LoraError(f'lora.dropout={dropout!r} must be a number in [0, 1)')
  return float(dropout)


def _check_layout(adapter_paths: Sequence[str]) -> None:
  """One target's module path must not lie inside another's adapter leaves."""
  paths = set(adapter_paths)
  for path in adapter_paths:
    parts = path.split('/')
    clash = next((p for p in ('/'.join(parts[:i]) for i in range(1, len(parts))) if p in paths),
                 None)
    if clash:
      raise LoraError(f'lora.targets: the adapters of {path} and {clash} would share a place in '
                      f'params[{LORA!r}]; leave one of their kernels out of lora.targets')


def init_adapters(params: Mapping[str, Any], targets: Mapping[str, tuple[int, int]], rank: int,
                  seed: int) -> dict[str, Any]:
  """`params` with `params['lora']` added: per target module `{'a': (fan_in, rank) uniform in
  +-1/sqrt(fan_in) (peft's kaiming-uniform, a=sqrt(5)), 'b': (rank, fan_out) zeros}`, float32.
  B is zero, so the adapted model starts exactly as the base model."""
  if LORA in params:
    raise LoraError(f"the model's params already hold a {LORA!r} subtree (adapters added "
                    'twice, or a module named lora); add adapters to the base params once')
  check_rank(rank, targets)
  flat: dict[str, jax.Array] = {}
  for index, path in enumerate(sorted(targets)):  # drawn on the host: nothing to compile
    fan_in, fan_out = targets[path]
    bound = 1.0 / math.sqrt(fan_in)
    draw = np.random.default_rng([seed % 2**64, index]).uniform(-bound, bound, (fan_in, rank))
    module = _module_path(path)
    flat[f'{module}/a'] = jnp.asarray(draw, jnp.float32)
    flat[f'{module}/b'] = jnp.zeros((rank, fan_out), jnp.float32)
  _check_layout(list(flat))
  return {**params, LORA: traverse_util.unflatten_dict(flat, sep='/')}


def adapter_count(params: Mapping[str, Any]) -> int:
  """Number of adapter parameters (every leaf under params['lora'])."""
  leaves = jax.tree.leaves(params.get(LORA, {}))
  return int(sum(math.prod(_shape(leaf)) for leaf in leaves))


def _adapter_pairs(params: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
  """Module path -> (A, B) of every adapter in params['lora']."""
  if LORA not in params:
    raise LoraError(f"the params hold no {LORA!r} subtree: add the adapters with "
                    'tljax.lora.init_adapters before applying or merging a LoRA model')
  flat = flat_paths(params[LORA])
  pairs = {}
  for path, leaf in flat.items():
    module, _, name = path.rpartition('/')
    if name == 'a':
      if f'{module}/b' not in flat:
        raise LoraError(f'params[{LORA!r}] has {LORA}/{path} but no {LORA}/{module}/b')
      pairs[module] = (leaf, flat[f'{module}/b'])
    elif name != 'b' or f'{module}/a' not in flat:
      raise LoraError(f'params[{LORA!r}] holds {LORA}/{path}, which is no adapter matrix '
                      '(each target module has exactly a and b)')
  return pairs


def _check_pair(module: str, a: Any, b: Any, rank: int, fan_in: int, fan_out: int) -> None:
  if _shape(a) != (fan_in, rank) or _shape(b) != (rank, fan_out):
    raise LoraError(f'the adapter of {module}/{KERNEL} has A {_shape(a)} and B {_shape(b)}, not '
                    f'({fan_in}, {rank}) and ({rank}, {fan_out}): lora.rank or lora.targets '
                    'differ from those the adapters were made with; use the same values')


def merge(params: Mapping[str, Any], alpha: float, rank: int) -> dict[str, Any]:
  """`params` without the adapters, each adapted kernel replaced by kernel + alpha/rank * A @ B
  (computed in float32): a plain base model that computes what `LoraModel` does (no dropout)."""
  factor = scale(alpha, rank)
  pairs = _adapter_pairs(params)
  flat = flat_paths({k: v for k, v in params.items() if k != LORA})
  for module, (a, b) in pairs.items():
    path = f'{module}/{KERNEL}'
    if path not in flat:
      raise LoraError(f'params[{LORA!r}] has an adapter for {path}, which the model lacks; '
                      'merge adapters only into the params they were trained with')
    matrix = matrix_shape(path, _shape(flat[path]))
    if matrix is None:
      raise LoraError(f'params[{LORA!r}] adapts {path}, which {_why_not(path, _shape(flat[path]))}')
    _check_pair(module, a, b, rank, *matrix)
  kernels = {module: flat[f'{module}/{KERNEL}'] for module in pairs}
  flat.update({f'{module}/{KERNEL}': kernel
               for module, kernel in _merged_kernels(kernels, pairs, factor).items()})
  return traverse_util.unflatten_dict(flat, sep='/')


@functools.partial(jax.jit, static_argnums=2)
def _merged_kernels(kernels: dict[str, Any], pairs: dict[str, tuple[Any, Any]], factor: float
                    ) -> dict[str, jax.Array]:
  """kernel + factor * A @ B of every adapted module, in float32, in one compiled program."""
  merged = {}
  for module, kernel in kernels.items():
    a, b = (jnp.asarray(x, jnp.float32) for x in pairs[module])
    update = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST) * factor
    merged[module] = (kernel.astype(jnp.float32) + update.reshape(kernel.shape)
                      ).astype(kernel.dtype)
  return merged


def _as_tuple(value: Any, length: int = 1) -> tuple[int, ...]:
  if value is None:
    return (1,) * length
  if isinstance(value, int):
    return (value,) * length
  return tuple(value)


def _unsupported(module: nn.Module, path: str, why: str) -> LoraError:
  return LoraError(f'lora.targets: {path}/{KERNEL} belongs to a {type(module).__name__} '
                   f'{why}, which LoRA cannot adapt ({SUPPORTED}); leave it out of lora.targets')


def _rows(module: nn.Module, path: str, x: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
  """`x` as the (..., fan_in) rows the module's kernel multiplies (a strided 1x1 conv reads
  every stride-th pixel), and the trailing shape of the module's output."""
  if isinstance(module, PointwiseConv):
    stride = module.stride
    return (x[:, ::stride, ::stride] if stride > 1 else x), (module.features,)
  if isinstance(module, nn.Dense):
    return x, (module.features,)
  if isinstance(module, nn.DenseGeneral):
    axes = sorted(axis % x.ndim for axis in _as_tuple(module.axis))
    if module.batch_dims or axes != list(range(x.ndim - len(axes), x.ndim)):
      raise _unsupported(module, path, 'that contracts other than its last axes')
    return x.reshape(*x.shape[:x.ndim - len(axes)], -1), _as_tuple(module.features)
  if isinstance(module, nn.Conv):
    kernel_size = _as_tuple(module.kernel_size)
    spatial = len(kernel_size)
    if (any(k != 1 for k in kernel_size) or module.feature_group_count != 1
        or any(d != 1 for d in _as_tuple(module.input_dilation, spatial))):
      raise _unsupported(module, path, 'that is not a plain 1x1 convolution')
    strides = _as_tuple(module.strides, spatial)
    x = x[(Ellipsis, *(slice(None, None, s) for s in strides), slice(None))]
    return x, (module.features,)
  raise _unsupported(module, path, 'module')


def _dropout(rows: jax.Array, rate: float, key: jax.Array) -> jax.Array:
  keep = jax.random.bernoulli(key, 1.0 - rate, rows.shape)
  return jnp.where(keep, rows / (1.0 - rate), jnp.zeros((), rows.dtype))


class LoraModel:
  """A Linen module whose target layers also add x @ A @ B * alpha / rank to their output.

  `apply` takes params with the 'lora' subtree and runs the base module on the rest, with a
  method interceptor adding each adapter; with `train=True`, `dropout` > 0 and a 'dropout'
  rng, the adapter's input is dropped out (a key per target, derived from that rng). Other
  attributes are the base module's, so code that inspects `model.dtype` or `model.norm`
  works unchanged.
  """

  def __init__(self, model: nn.Module, targets: Mapping[str, tuple[int, int]], alpha: float,
               rank: int, dropout: float = 0.0):
    check_rank(rank, targets)
    self.model = model
    self.targets = dict(targets)
    self.lora_alpha, self.lora_rank = alpha, rank
    self.lora_scale = scale(alpha, rank)
    self.lora_dropout = _check_dropout(dropout)
    self._by_module = {_module_path(path): (index, path)
                       for index, path in enumerate(sorted(self.targets))}

  def clone(self, **kwargs: Any) -> LoraModel:
    """The base module cloned with `kwargs` (e.g. dtype, norm), wrapped with the same adapters."""
    return LoraModel(self.model.clone(**kwargs), self.targets, self.lora_alpha, self.lora_rank,
                     self.lora_dropout)

  def __getattr__(self, name: str) -> Any:
    model = self.__dict__.get('model')
    if model is None or name.startswith('__'):
      raise AttributeError(name)
    return getattr(model, name)

  def __repr__(self) -> str:
    return (f'LoraModel({type(self.model).__name__}, {len(self.targets)} targets, '
            f'rank={self.lora_rank}, alpha={self.lora_alpha}, dropout={self.lora_dropout})')

  def _dropout_key(self, kwargs: Mapping[str, Any]) -> jax.Array | None:
    rngs = kwargs.get('rngs')
    if not (kwargs.get('train') and self.lora_dropout > 0 and rngs and 'dropout' in rngs):
      return None
    key = rngs['dropout']
    return jax.random.key(key) if isinstance(key, int) else key

  def apply(self, variables: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
    """The base module's `apply` on `variables` without the adapters, each target's output
    plus its adapter's; refuses targets it cannot adapt or that the call never reaches."""
    pairs = _adapter_pairs(variables.get('params', {}))
    variables = {**variables,
                 'params': {k: v for k, v in variables['params'].items() if k != LORA}}
    dropout_key = self._dropout_key(kwargs)
    calls: dict[str, int] = {}

    def adapt(next_fun, args_, kwargs_, context):
      target = (self._by_module.get('/'.join(context.module.path))
                if context.method_name == '__call__' else None)
      if target is None:
        return next_fun(*args_, **kwargs_)
      index, path = target
      y = next_fun(*args_, **kwargs_)
      x = args_[0] if args_ else kwargs_.get('inputs', kwargs_.get('x'))
      if _module_path(path) not in pairs:
        raise LoraError(f'lora.targets: {path} has no adapter in params[{LORA!r}]; build the '
                        'adapters from the same lora.targets (tljax.lora.init_adapters)')
      count = calls[path] = calls.get(path, 0) + 1
      key = None if dropout_key is None else jax.random.fold_in(
          jax.random.fold_in(dropout_key, index), count)
      return y + self._delta(context.module, path, x, y, pairs[_module_path(path)], key)

    with nn.intercept_methods(adapt):
      out = self.model.apply(variables, *args, **kwargs)
    missing = sorted(set(self.targets) - set(calls))
    if missing and 'method' not in kwargs:
      raise LoraError(f'lora.targets: the model never calls the module of {missing[0]} '
                      f'({len(missing)} target(s) unused), so its adapter would not train; '
                      'leave it out of lora.targets')
    return out

  def _delta(self, module: nn.Module, path: str, x: Any, y: jax.Array, pair: tuple[Any, Any],
             dropout_key: jax.Array | None) -> jax.Array:
    """alpha/rank * dropout(x) @ A @ B in x's dtype, shaped like the module's output `y`."""
    module_path = _module_path(path)
    if not isinstance(x, (jax.Array, np.ndarray)):
      raise _unsupported(module, module_path, 'module called without an array input')
    rows, out_shape = _rows(module, module_path, jnp.asarray(x))
    fan_in, fan_out = self.targets[path]
    if rows.shape[-1] != fan_in or math.prod(out_shape) != fan_out:
      raise _unsupported(module, module_path,
                         f'module mapping {rows.shape[-1]} to {math.prod(out_shape)} features, '
                         f'not the {fan_in}x{fan_out} matrix its kernel was read as')
    a, b = pair
    _check_pair(module_path, a, b, self.lora_rank, fan_in, fan_out)
    dtype = rows.dtype if jnp.issubdtype(rows.dtype, jnp.floating) else y.dtype
    rows = rows.astype(dtype)
    if dropout_key is not None:
      rows = _dropout(rows, self.lora_dropout, dropout_key)
    down = (rows @ jnp.asarray(a).astype(dtype)) * self.lora_scale
    delta = (down @ jnp.asarray(b).astype(dtype)).reshape(*rows.shape[:-1], *out_shape)
    if delta.shape != y.shape:
      raise _unsupported(module, module_path,
                         f'module whose output {y.shape} differs from its matrix product '
                         f'{delta.shape} (padding)')
    return delta.astype(y.dtype)
