"""PyTorch `torch.save` files (zip and legacy formats) read without torch and without running code.

A restricted unpickler admits only the globals a tensor state dict needs (tensor and parameter
rebuild functions, typed storages, OrderedDict); anything else is refused by name, so a file
crafted to call `os.system` fails before any of its code can run.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import zipfile
from collections import OrderedDict
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

from tljax.weights.errors import WeightsError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8,
    'BoolStorage': np.bool_,
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
  dtype: Any


@dataclasses.dataclass(frozen=True)
class _StorageRef:
  key: str
  dtype: Any


@dataclasses.dataclass(frozen=True)
class _LazyTensor:
  """A tensor whose storage bytes may come later in the file (legacy format)."""
  storage: _StorageRef
  offset: int
  shape: tuple[int, ...]
  strides: tuple[int, ...]

  def materialise(self, storages: dict[str, np.ndarray]) -> np.ndarray:
    data = storages[self.storage.key]
    if not self.shape:
      return np.array(data[self.offset])
    itemsize = data.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        data[self.offset:], shape=self.shape, strides=[s * itemsize for s in self.strides],
        writeable=False)
    return np.array(view)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused) -> _LazyTensor:
  return _LazyTensor(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad, backward_hooks, *unused) -> _LazyTensor:
  return data


_ALLOWED = {
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('collections', 'OrderedDict'): OrderedDict,
    **{('torch', name): _StorageType(dtype) for name, dtype in STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):

  def __init__(self, file: BinaryIO, source: str):
    super().__init__(file)
    self.source = source

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    raise WeightsError(f'{self.source}: refusing to load global {module}.{name} (only tensors, '
                       'storages and OrderedDict are allowed in a weights file)')

  def persistent_load(self, pid: Any) -> _StorageRef:
    if not (isinstance(pid, tuple) and pid and pid[0] == 'storage'
            and isinstance(pid[1], _StorageType)):
      raise WeightsError(f'{self.source}: unsupported persistent id {pid!r:.80}')
    return _StorageRef(str(pid[2]), pid[1].dtype)


def _map_tensors(tree: Any, fn) -> Any:
  """`tree` with every lazy tensor replaced by `fn(tensor)` (dicts, lists, tuples walked)."""
  if isinstance(tree, _LazyTensor):
    return fn(tree)
  if isinstance(tree, dict):
    return {k: _map_tensors(v, fn) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return type(tree)(_map_tensors(v, fn) for v in tree)
  return tree


def _materialise(tree: Any, storages: dict[str, np.ndarray]) -> Any:
  return _map_tensors(tree, lambda t: t.materialise(storages))


def _storage_refs(tree: Any) -> list[_StorageRef]:
  refs: list[_StorageRef] = []
  _map_tensors(tree, lambda t: refs.append(t.storage))
  return refs


def _load_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith('/data.pkl') or n == 'data.pkl']
    if len(pickles) != 1:
      raise WeightsError(f'{path}: a torch zip file holds one data.pkl, found {pickles}')
    prefix = pickles[0][:-len('data.pkl')]
    if f'{prefix}byteorder' in names and archive.read(f'{prefix}byteorder') != b'little':
      raise WeightsError(f'{path}: big-endian torch files are not supported')
    tree = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), path).load()
    storages = {}
    for ref in _storage_refs(tree):
      if ref.key not in storages:
        raw = archive.read(f'{prefix}data/{ref.key}')
        storages[ref.key] = np.frombuffer(raw, dtype=ref.dtype)
  return _materialise(tree, storages)


def _load_legacy(path: str) -> Any:
  with open(path, 'rb') as f:
    if _RestrictedUnpickler(f, path).load() != LEGACY_MAGIC:
      raise WeightsError(f'{path}: not a torch.save file (bad magic number)')
    _RestrictedUnpickler(f, path).load()  # protocol version
    _RestrictedUnpickler(f, path).load()  # sys info
    tree = _RestrictedUnpickler(f, path).load()
    keys = _RestrictedUnpickler(f, path).load()
    dtypes = {ref.key: ref.dtype for ref in _storage_refs(tree)}
    storages = {}
    for key in keys:
      if key not in dtypes:  # its element size, hence its length, would be unknown
        raise WeightsError(f'{path}: storage {key} is used by no tensor')
      numel = int.from_bytes(f.read(8), 'little')
      dtype = np.dtype(dtypes[key])
      raw = f.read(numel * dtype.itemsize)
      if len(raw) != numel * dtype.itemsize:
        raise WeightsError(f'{path}: truncated storage {key}')
      storages[key] = np.frombuffer(raw, dtype=dtype)
  return _materialise(tree, storages)


def load(path: str) -> Any:
  """The object saved in a `.pth`/`.bin` file, tensors as NumPy arrays."""
  if not os.path.isfile(path):
    raise WeightsError(f'{path}: no such file')
  with open(path, 'rb') as f:
    zip_header = f.read(4) == b'PK\x03\x04'
  if zip_header and not zipfile.is_zipfile(path):  # the zip directory sits at the end
    raise WeightsError(f'{path}: truncated or corrupt zip archive (no central directory)')
  try:
    return _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)
  except WeightsError:
    raise
  except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, OSError,
          zipfile.BadZipFile) as e:
    raise WeightsError(f'{path}: not a readable torch.save file ({e})') from None
