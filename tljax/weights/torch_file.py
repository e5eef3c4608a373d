"""PyTorch `torch.save` files (zip and legacy formats) read without torch and without running code.

A restricted unpickler admits only the globals a tensor state dict needs (tensor and parameter
rebuild functions, typed storages, OrderedDict); anything else is refused by name, so a file
crafted to call `os.system` fails before any of its code can run. Everything the file says is
checked before it is used: a tensor's size, stride and offset must lie inside its storage, reads
never go past the end of the file, and no opcode can change an object that outlives one load.
Tensors come back as read-only NumPy views of their storage.
"""

from __future__ import annotations

import dataclasses
import io
import math
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
MAX_DIMS = 64  # more dimensions than any tensor has: a file claiming more is damaged
MAX_OBJECTS = 1_000_000  # containers and tensors walked in one file (shared ones repeatedly)
MAX_PICKLE_BYTES = 256 * 2**20  # data.pkl holds names and shapes, never tensor data
# A compressed zip member may expand at most this much past 64 MiB (deflate's best is ~1000x).
MAX_EXPANSION = 1000


@dataclasses.dataclass(frozen=True, slots=True)
class _StorageType:
  dtype: Any


@dataclasses.dataclass(frozen=True, slots=True)
class _StorageRef:
  key: str
  dtype: Any


@dataclasses.dataclass(frozen=True, slots=True)
class _LazyTensor:
  """A tensor whose storage bytes may come later in the file (legacy format)."""
  storage: _StorageRef
  offset: int
  shape: tuple[int, ...]
  strides: tuple[int, ...]


MAX_EXPANDED_ELEMENTS = 2**28  # an expanded (stride-0) tensor of 1 GiB float32 at most


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _view(tensor: _LazyTensor, data: np.ndarray, source: str) -> np.ndarray:
  """The tensor as a read-only view of `data`, after proving every element it addresses lies
  inside `data`; nothing the file claims reaches `as_strided` unchecked."""
  shape, strides, offset = tensor.shape, tensor.strides, tensor.offset
  where = f'{source}: tensor of shape {shape} (storage {tensor.storage.key!r})'
  if len(shape) != len(strides) or len(shape) > MAX_DIMS:
    raise WeightsError(f'{where} has {len(strides)} strides for {len(shape)} dimensions')
  if any(s < 0 for s in (*shape, *strides)) or offset < 0:
    raise WeightsError(f'{where} has a negative size, stride or offset '
                       f'(strides {strides}, offset {offset}); the file is damaged or hostile')
  numel = math.prod(shape)
  if numel == 0:
    return np.zeros(shape, data.dtype)
  last = sum((size - 1) * stride for size, stride in zip(shape, strides, strict=True))
  extent = offset + last + 1  # one past the last element addressed
  # Memory safety needs only the extent inside the storage; a legitimately expanded tensor
  # (stride 0, torch's expand) holds more elements than its storage, up to a sane size.
  if extent > len(data) or (numel > len(data) and numel > MAX_EXPANDED_ELEMENTS):
    raise WeightsError(f'{where}, strides {strides} and offset {offset} reaches element '
                       f'{extent - 1} or holds {numel} elements, but the storage holds '
                       f'{len(data)}; the file is damaged or hostile')
  itemsize = data.dtype.itemsize
  window = data[offset:extent]  # bounds proven above: the view cannot leave this window
  view = np.lib.stride_tricks.as_strided(window, shape=shape,
                                         strides=[s * itemsize for s in strides],
                                         writeable=False)
  return view


def _rebuild_tensor(source: str, storage, storage_offset, size, stride, *unused
                    ) -> _LazyTensor:
  if not (isinstance(storage, _StorageRef) and _is_int(storage_offset)
          and isinstance(size, tuple) and isinstance(stride, tuple)
          and all(_is_int(v) for v in (*size, *stride))):
    raise WeightsError(f'{source}: malformed tensor record (storage {type(storage).__name__}, '
                       f'offset {storage_offset!r:.40}, size {size!r:.80}, '
                       f'stride {stride!r:.80})')
  return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(source: str, data, requires_grad, backward_hooks, *unused
                       ) -> _LazyTensor:
  if not isinstance(data, _LazyTensor):
    raise WeightsError(f'{source}: a parameter must wrap a tensor, not {type(data).__name__}')
  return data


_ALLOWED_NAMES = frozenset({('torch._utils', '_rebuild_tensor_v2'),
                            ('torch._utils', '_rebuild_parameter'),
                            ('collections', 'OrderedDict'),
                            *(('torch', name) for name in STORAGE_DTYPES)})
# Opcodes of pickle protocol 5's out-of-band buffers: torch.save never writes them, and
# BYTEARRAY8 allocates whatever length the file claims before reading it.
_REFUSED_OPCODES = (pickle.BYTEARRAY8, pickle.NEXT_BUFFER, pickle.READONLY_BUFFER)


class _BoundedReader:
  """A file seen as its first `end` bytes: a read never asks for more than is left, so a
  length field of 2**60 costs nothing."""

  def __init__(self, file: BinaryIO, end: int):
    self.file, self.end = file, end

  def read(self, size: int = -1) -> bytes:
    left = max(0, self.end - self.file.tell())
    return self.file.read(left if size is None or size < 0 else min(size, left))

  def readline(self) -> bytes:
    return self.file.readline(max(0, self.end - self.file.tell()))

  def tell(self) -> int:
    return self.file.tell()


class _RestrictedUnpickler(pickle._Unpickler):
  """One pickle, by the pure-Python unpickler (whose opcodes can be replaced). The globals it
  may name are made afresh for each load, and BUILD (which sets attributes) is allowed only on
  dicts this load created, whose state it drops: nothing outlives the load."""

  dispatch = dict(pickle._Unpickler.dispatch)

  def __init__(self, file: BinaryIO, source: str):
    super().__init__(file)
    self.source = source
    self._globals = {
        ('torch._utils', '_rebuild_tensor_v2'): lambda *a: _rebuild_tensor(source, *a),
        ('torch._utils', '_rebuild_parameter'): lambda *a: _rebuild_parameter(source, *a),
        ('collections', 'OrderedDict'): OrderedDict,
        **{('torch', name): _StorageType(dtype) for name, dtype in STORAGE_DTYPES.items()},
    }

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _ALLOWED_NAMES:
      return self._globals[(module, name)]
    if (module, name) == ('torch._utils', '_rebuild_tensor_v3') or (
        module == 'torch' and name.endswith('Storage')):
      raise WeightsError(f'{self.source}: holds tensors of a dtype tljax does not read '
                         f'({module}.{name}; it reads float64/32/16, bfloat16, int8-64, uint8 '
                         'and bool); convert them, e.g. tensor.float(), and save again')
    raise WeightsError(f'{self.source}: refusing to load global {module}.{name} (only tensors, '
                       'storages and OrderedDict are allowed in a weights file)')

  def persistent_load(self, pid: Any) -> _StorageRef:
    if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == 'storage'
            and isinstance(pid[1], _StorageType) and isinstance(pid[2], (str, int))):
      raise WeightsError(f'{self.source}: unsupported persistent id {pid!r:.80}')
    if len(pid) > 5 and pid[5] is not None:  # legacy views into another storage
      raise WeightsError(f'{self.source}: storage views (view_metadata) are not supported')
    return _StorageRef(str(pid[2]), pid[1].dtype)

  def _load_build(self) -> None:
    state = self.stack.pop()
    target = self.stack[-1]
    if type(target) not in (dict, OrderedDict):
      raise WeightsError(f'{self.source}: refusing a BUILD opcode on '
                         f'{type(target).__name__} (a weights file may set state only on '
                         'its own dicts)')
    del state  # torch's state dicts carry `_metadata` (module versions): not needed

  def _refuse_opcode(self) -> None:
    raise WeightsError(f'{self.source}: pickle protocol 5 out-of-band buffers are not allowed '
                       'in a weights file')

  dispatch[pickle.BUILD[0]] = _load_build
  for _opcode in _REFUSED_OPCODES:
    dispatch[_opcode[0]] = _refuse_opcode
  del _opcode


class _Walker:
  """Walks the loaded tree once per distinct container (shared ones are not re-walked), with a
  budget on objects and depth so a hostile nesting cannot hang or exhaust the reader."""

  def __init__(self, source: str):
    self.source, self.seen, self.visited = source, {}, 0

  def map(self, tree: Any, fn) -> Any:
    if id(tree) in self.seen:
      return self.seen[id(tree)]
    self.visited += 1
    if self.visited > MAX_OBJECTS:
      raise WeightsError(f'{self.source}: more than {MAX_OBJECTS:,} objects; not a weights '
                         'file')
    if isinstance(tree, _LazyTensor):
      out = fn(tree)
    elif isinstance(tree, dict):
      out = {k: self.map(v, fn) for k, v in tree.items()}
    elif isinstance(tree, (list, tuple)):
      out = type(tree)(self.map(v, fn) for v in tree)
    else:
      return tree
    self.seen[id(tree)] = out
    return out


def _map_tensors(tree: Any, fn, source: str) -> Any:
  """`tree` with every lazy tensor replaced by `fn(tensor)` (dicts, lists, tuples walked)."""
  try:
    return _Walker(source).map(tree, fn)
  except RecursionError:
    raise WeightsError(f'{source}: nested too deeply to be a weights file') from None


def _storage_refs(tree: Any, source: str) -> dict[str, Any]:
  """Every storage the tensors use -> its dtype; one storage read as two dtypes is refused."""
  dtypes: dict[str, Any] = {}

  def note(tensor: _LazyTensor) -> None:
    known = dtypes.setdefault(tensor.storage.key, tensor.storage.dtype)
    if np.dtype(known) != np.dtype(tensor.storage.dtype):
      raise WeightsError(f'{source}: storage {tensor.storage.key!r} is read as both '
                         f'{np.dtype(known)} and {np.dtype(tensor.storage.dtype)}')

  _map_tensors(tree, note, source)
  return dtypes


def _storage_array(raw: bytes, dtype: Any, key: str, source: str) -> np.ndarray:
  dtype = np.dtype(dtype)
  if len(raw) % dtype.itemsize:
    raise WeightsError(f'{source}: storage {key!r} holds {len(raw)} bytes, not a whole number '
                       f'of {dtype} elements')
  if dtype == np.bool_:  # bytes other than 0 and 1 are not valid NumPy booleans
    return np.frombuffer(raw, np.uint8) != 0
  return np.frombuffer(raw, dtype)


def _materialise(tree: Any, storages: dict[str, np.ndarray], source: str) -> Any:
  return _map_tensors(tree, lambda t: _view(t, storages[t.storage.key], source), source)


def _check_member(info: zipfile.ZipInfo, source: str, limit: int | None = None) -> None:
  """Refuses a zip member that would expand far beyond its compressed bytes (a zip bomb)."""
  expanded = info.file_size
  if limit is not None and expanded > limit:
    raise WeightsError(f'{source}: member {info.filename} claims {expanded:,} bytes; the limit '
                       f'is {limit:,}')
  if (info.compress_type != zipfile.ZIP_STORED and expanded > 64 * 2**20
      and expanded > MAX_EXPANSION * max(info.compress_size, 1)):
    raise WeightsError(f'{source}: member {info.filename} expands {info.compress_size:,} bytes '
                       f'to {expanded:,}; refusing a likely zip bomb')


def _load_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith('/data.pkl') or n == 'data.pkl']
    if len(pickles) != 1:
      raise WeightsError(f'{path}: a torch zip file holds one data.pkl, found {pickles}')
    prefix = pickles[0][:-len('data.pkl')]
    if f'{prefix}byteorder' in names and archive.read(f'{prefix}byteorder') != b'little':
      raise WeightsError(f'{path}: big-endian torch files are not supported')
    info = archive.getinfo(pickles[0])
    _check_member(info, path, MAX_PICKLE_BYTES)
    tree = _RestrictedUnpickler(io.BytesIO(archive.read(info)), path).load()
    storages = {}
    for key, dtype in _storage_refs(tree, path).items():
      name = f'{prefix}data/{key}'
      if name not in names:
        raise WeightsError(f'{path}: storage {key!r} is missing ({name})')
      member = archive.getinfo(name)
      _check_member(member, path)
      storages[key] = _storage_array(archive.read(member), dtype, key, path)
  return _materialise(tree, storages, path)


def _load_legacy(path: str) -> Any:
  with open(path, 'rb') as f:
    size = os.fstat(f.fileno()).st_size
    reader = _BoundedReader(f, size)
    if _RestrictedUnpickler(reader, path).load() != LEGACY_MAGIC:
      raise WeightsError(f'{path}: not a torch.save file (bad magic number)')
    _RestrictedUnpickler(reader, path).load()  # protocol version
    _RestrictedUnpickler(reader, path).load()  # sys info
    tree = _RestrictedUnpickler(reader, path).load()
    keys = _RestrictedUnpickler(reader, path).load()
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
      raise WeightsError(f'{path}: the storage key list is malformed')
    dtypes = _storage_refs(tree, path)
    storages = {}
    for key in keys:
      if key not in dtypes:  # its element size, hence its length, would be unknown
        raise WeightsError(f'{path}: storage {key} is used by no tensor')
      header = reader.read(8)
      if len(header) != 8:
        raise WeightsError(f'{path}: truncated storage {key}')
      numel = int.from_bytes(header, 'little')
      itemsize = np.dtype(dtypes[key]).itemsize
      left = size - f.tell()
      if numel * itemsize > left:
        raise WeightsError(f'{path}: storage {key} claims {numel:,} elements '
                           f'({numel * itemsize:,} bytes) but {left:,} bytes are left; '
                           'truncated or damaged')
      storages[key] = _storage_array(reader.read(numel * itemsize), dtypes[key], key, path)
    missing = sorted(set(dtypes) - set(storages))
    if missing:
      raise WeightsError(f'{path}: storages {missing[:5]} are used by tensors but not stored')
  return _materialise(tree, storages, path)


def load(path: str) -> Any:
  """The object saved in a `.pth`/`.bin` file, tensors as read-only NumPy arrays."""
  if not os.path.isfile(path):
    raise WeightsError(f'{path}: ' + ('not a regular file' if os.path.exists(path) else
                                      'no such file'))
  with open(path, 'rb') as f:
    zip_header = f.read(4) == b'PK\x03\x04'
  if zip_header and not zipfile.is_zipfile(path):  # the zip directory sits at the end
    raise WeightsError(f'{path}: truncated or corrupt zip archive (no central directory)')
  try:
    return _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)
  except WeightsError:
    raise
  except Exception as e:  # noqa: BLE001 (a file from outside may fail in any way: one line)
    reason = ' '.join(f'{type(e).__name__}: {e}'.split())[:200]
    raise WeightsError(f'{path}: not a readable torch.save file ({reason})') from None
