"""`.npz` archives read as plain arrays, with every member checked before its bytes are used.

`np.load` would hand back a member that is not an `.npy` file as raw bytes, and allocates what
a member's header claims before finding out the data is shorter. Here each member must be an
`.npy` file of a numeric or boolean dtype whose header agrees with its size, and compressed
members may not expand beyond a sane ratio; anything else is one error naming the member.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Callable

import numpy as np

from tljax.errors import UserError

MAX_HEADER_BYTES = 10_000
MAX_EXPANSION = 1000  # deflate compresses at most ~1000x; more is a zip bomb
NUMERIC_KINDS = 'biufc'


def _member_array(archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> np.ndarray:
  if (info.compress_type != zipfile.ZIP_STORED and info.file_size > 64 * 2**20
      and info.file_size > MAX_EXPANSION * max(info.compress_size, 1)):
    raise ValueError(f'{where} expands {info.compress_size:,} bytes to {info.file_size:,}; '
                     'refusing a likely zip bomb')
  with archive.open(info) as member:
    try:
      version = np.lib.format.read_magic(member)
    except ValueError:
      raise ValueError(f'{where} is not an .npy array (no NUMPY magic)') from None
    reader = {(1, 0): np.lib.format.read_array_header_1_0,
              (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if reader is None:  # 3.0 exists for structured dtypes with non-ASCII field names
      raise ValueError(f'{where}: unsupported .npy version {version}')
    shape, fortran_order, dtype = reader(member, max_header_size=MAX_HEADER_BYTES)
    if dtype.hasobject or dtype.kind not in NUMERIC_KINDS:
      raise ValueError(f'{where} holds {dtype} values; only numbers and booleans are read '
                       '(object arrays would need pickle)')
    header = member.tell()
    expected = math.prod(shape) * dtype.itemsize
    if info.file_size - header != expected:
      raise ValueError(f'{where}: its header says {shape} {dtype} ({expected:,} bytes) but it '
                       f'holds {info.file_size - header:,} bytes; truncated or damaged')
    data = member.read(expected)
  if len(data) != expected:
    raise ValueError(f'{where} is truncated')
  array = np.frombuffer(data, dtype).reshape(shape, order='F' if fortran_order else 'C')
  return array != 0 if dtype == np.bool_ else array


def read(path: str, error: type[UserError], name: str,
         wanted: Callable[[str], bool] | None = None) -> dict[str, np.ndarray]:
  """Every member of the archive at `path` as `{name without .npy: array}` (only those whose
  name `wanted` accepts, the others never read). Errors are `error` (a UserError subclass),
  their message starting with `name` (the file and its key)."""
  if not os.path.isfile(path):
    raise error(f'{name}: {"not a regular file" if os.path.exists(path) else "no such file"}')
  try:
    with zipfile.ZipFile(path) as archive:
      arrays = {}
      for info in archive.infolist():
        if info.is_dir():
          continue
        where = f'member {info.filename!r}'
        if wanted is not None and not wanted(info.filename.removesuffix('.npy')):
          continue
        if not info.filename.endswith('.npy'):
          raise ValueError(f'{where} is not an .npy array')
        arrays[info.filename[:-len('.npy')]] = _member_array(archive, info, where)
  except (ValueError, OSError, EOFError, RuntimeError, zipfile.BadZipFile, zipfile.LargeZipFile,
          NotImplementedError, SyntaxError, OverflowError, MemoryError) as e:
    # RuntimeError: an encrypted member
    raise error(f'{name} cannot be read as plain arrays: {e}') from None
  return arrays
