"""Shared pieces of the converters that map outside layouts (PyTorch, HF, timm) onto tljax paths.

A converter walks the tljax module tree and `take`s each source tensor once. Source tensors it
cannot find are left out (the merge then reports the tljax path as missing); source tensors it
never took are passed on under `unconverted/<key>` (the merge reports them as unexpected), so
one table shows every problem.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import numpy as np

from tljax.errors import UserError

# A layer of a layout's mapping: (kind 'conv' | 'bn' | 'dense', source module, tljax module).
Pair = tuple[str, str, str]

# Buffers that hold no learned value in their frameworks and have no tljax counterpart.
IGNORED_SUFFIXES = ('num_batches_tracked', 'position_ids')


class TorchLayout:
  """Reads `a/b/weight`-style source arrays into flat `params/...`/`batch_stats/...` arrays."""

  def __init__(self, source: Mapping[str, np.ndarray], prefix: str = ''):
    self.source = dict(source)
    self.prefix = prefix
    self.taken: set[str] = set()
    self.out: dict[str, np.ndarray] = {}

  def has(self, key: str) -> bool:
    return self.prefix + key in self.source

  def take(self, key: str) -> np.ndarray | None:
    full = self.prefix + key
    if full not in self.source:
      return None
    self.taken.add(full)
    return np.asarray(self.source[full])

  def put(self, path: str, value: np.ndarray | None, collection: str = 'params') -> None:
    if value is not None:
      self.out[f'{collection}/{path}'] = value

  def conv(self, src: str, dst: str) -> None:
    """PyTorch conv weight OIHW -> flax HWIO (depthwise (C,1,k,k) -> (k,k,1,C) alike)."""
    weight = self.take(f'{src}/weight')
    self.put(f'{dst}/kernel', None if weight is None else weight.transpose(2, 3, 1, 0))
    self.put(f'{dst}/bias', self.take(f'{src}/bias'))

  def dense(self, src: str, dst: str) -> None:
    """PyTorch Linear weight (out, in) -> flax Dense kernel (in, out)."""
    weight = self.take(f'{src}/weight')
    self.put(f'{dst}/kernel', None if weight is None else weight.T)
    self.put(f'{dst}/bias', self.take(f'{src}/bias'))

  def batch_norm(self, src: str, dst: str) -> None:
    """Affine terms to `params`, running statistics to `batch_stats`."""
    self.put(f'{dst}/scale', self.take(f'{src}/weight'))
    self.put(f'{dst}/bias', self.take(f'{src}/bias'))
    self.put(f'{dst}/mean', self.take(f'{src}/running_mean'), 'batch_stats')
    self.put(f'{dst}/var', self.take(f'{src}/running_var'), 'batch_stats')

  def layer_norm(self, src: str, dst: str) -> None:
    """`weight`/`bias`, or `gamma`/`beta` in older TF-converted checkpoints."""
    scale = self.take(f'{src}/weight')
    self.put(f'{dst}/scale', scale if scale is not None else self.take(f'{src}/gamma'))
    bias = self.take(f'{src}/bias')
    self.put(f'{dst}/bias', bias if bias is not None else self.take(f'{src}/beta'))

  def attention(self, sources: Iterable[str], dst: str, out_src: str, num_heads: int) -> None:
    """Separate q/k/v Linears -> flax MultiHeadDotProductAttention (D, heads, head_dim)."""
    for src, name in zip(sources, ('query', 'key', 'value'), strict=True):
      weight, bias = self.take(f'{src}/weight'), self.take(f'{src}/bias')
      self._qkv_put(f'{dst}/{name}', weight, bias, num_heads)
    self._out_put(dst, self.take(f'{out_src}/weight'), self.take(f'{out_src}/bias'), num_heads)

  def fused_attention(self, qkv_src: str, dst: str, out_src: str, num_heads: int) -> None:
    """A fused qkv Linear (3D, D) as in timm -> separate query/key/value."""
    weight, bias = self.take(f'{qkv_src}/weight'), self.take(f'{qkv_src}/bias')
    weights = np.split(weight, 3) if weight is not None else (None,) * 3
    biases = np.split(bias, 3) if bias is not None else (None,) * 3
    for name, w, b in zip(('query', 'key', 'value'), weights, biases, strict=True):
      self._qkv_put(f'{dst}/{name}', w, b, num_heads)
    self._out_put(dst, self.take(f'{out_src}/weight'), self.take(f'{out_src}/bias'), num_heads)

  def _qkv_put(self, dst: str, weight, bias, num_heads: int) -> None:
    if weight is not None:
      out_dim, in_dim = weight.shape
      self.put(f'{dst}/kernel', weight.T.reshape(in_dim, num_heads, out_dim // num_heads))
    if bias is not None:
      self.put(f'{dst}/bias', bias.reshape(num_heads, -1))

  def _out_put(self, dst: str, weight, bias, num_heads: int) -> None:
    if weight is not None:
      out_dim, in_dim = weight.shape
      self.put(f'{dst}/out/kernel', weight.T.reshape(num_heads, in_dim // num_heads, out_dim))
    self.put(f'{dst}/out/bias', bias)

  def apply(self, pairs: Iterator[Pair]) -> dict[str, np.ndarray]:
    """Converts every (kind, source, tljax) layer of a mapping; returns `result()`."""
    for kind, source, destination in pairs:
      dict(conv=self.conv, bn=self.batch_norm, dense=self.dense)[kind](source, destination)
    return self.result()

  def result(self) -> dict[str, np.ndarray]:
    """Converted arrays plus every source tensor no rule took, under `unconverted/`."""
    left = {f'unconverted/{k}': v for k, v in self.source.items()
            if k not in self.taken and not k.endswith(IGNORED_SUFFIXES)}
    return {**self.out, **left}


class TorchWriter:
  """The inverse of TorchLayout for conv, BatchNorm and dense layers: flat tljax variables
  (`params/a/b/kernel`) to a PyTorch state dict (`a.b.weight`, OIHW convs, (out, in) Linear
  weights, BatchNorm running statistics and its `num_batches_tracked` counter)."""

  def __init__(self, flat: Mapping[str, np.ndarray]):
    self.flat = dict(flat)
    self.used: set[str] = set()
    self.out: dict[str, np.ndarray] = {}

  def has(self, path: str) -> bool:
    return f'params/{path}/kernel' in self.flat or f'params/{path}/scale' in self.flat

  def _take(self, key: str) -> np.ndarray | None:
    if key not in self.flat:
      return None
    self.used.add(key)
    return np.ascontiguousarray(self.flat[key])

  def _put(self, module: str, name: str, value: np.ndarray | None) -> None:
    if value is not None:
      self.out[f'{module.replace("/", ".")}.{name}'] = value

  def conv(self, module: str, path: str) -> None:
    kernel = self._take(f'params/{path}/kernel')
    self._put(module, 'weight', None if kernel is None
              else np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
    self._put(module, 'bias', self._take(f'params/{path}/bias'))

  def dense(self, module: str, path: str) -> None:
    kernel = self._take(f'params/{path}/kernel')
    self._put(module, 'weight', None if kernel is None else np.ascontiguousarray(kernel.T))
    self._put(module, 'bias', self._take(f'params/{path}/bias'))

  def batch_norm(self, module: str, path: str) -> None:
    self._put(module, 'weight', self._take(f'params/{path}/scale'))
    self._put(module, 'bias', self._take(f'params/{path}/bias'))
    self._put(module, 'running_mean', self._take(f'batch_stats/{path}/mean'))
    self._put(module, 'running_var', self._take(f'batch_stats/{path}/var'))
    self._put(module, 'num_batches_tracked', np.zeros((), np.int64))

  def apply(self, pairs: Iterator[Pair], layout: str) -> dict[str, np.ndarray]:
    """The state dict of every layer of a mapping; a tljax variable the layout has no place
    for is an error naming it."""
    for kind, module, path in pairs:
      dict(conv=self.conv, bn=self.batch_norm, dense=self.dense)[kind](module, path)
    left = sorted(set(self.flat) - self.used)
    if left:
      raise UserError(f'the {layout} layout has no place for {len(left)} variable(s) of this '
                      f'model: {", ".join(left[:5])}; export it in the tljax layout instead')
    return self.out
