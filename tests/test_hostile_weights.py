"""A corpus of hostile and damaged weight files, generated here, read in a separate process: every
one is refused with one WeightsError naming the file, the process never crashes, and a refused
file leaves nothing behind that changes how the next, legitimate file decodes."""

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
from helpers import REPO
from hostile_files import legacy_file, zip_file

torch = pytest.importorskip('torch')


class _Storage:
  def __init__(self, key, numel, kind='FloatStorage'):
    self.key, self.numel, self.kind = key, numel, kind


class _Tensor:
  """A tensor record with whatever size, stride and offset the test wants the file to claim."""

  def __init__(self, storage, offset, size, stride, state=None):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride
    self.state = state  # set by a BUILD opcode after the record is built


class _Pickler(pickle.Pickler):
  """Writes torch's own records (`torch._utils._rebuild_tensor_v2`, `torch.FloatStorage`) with
  the values of `_Tensor` and `_Storage`, checked by nothing."""

  def persistent_id(self, obj):
    if isinstance(obj, _Storage):
      return ('storage', getattr(torch, obj.kind), obj.key, 'cpu', obj.numel)
    return None

  def reducer_override(self, obj):
    if isinstance(obj, _Tensor):
      return (torch._utils._rebuild_tensor_v2,
              (obj.storage, obj.offset, obj.size, obj.stride, False, OrderedDict()), obj.state)
    return NotImplemented


def _pickle(tree) -> bytes:
  buffer = io.BytesIO()
  _Pickler(buffer, protocol=2).dump(tree)
  return buffer.getvalue()


FOUR_FLOATS = np.arange(4, dtype=np.float32).tobytes()


def _view_case(size, stride, offset=0, numel=4):
  return {'w': _Tensor(_Storage('0', numel), offset, size, stride)}


# name -> (tree with hostile records, what the error must say)
VIEW_CASES = {
    'larger_than_storage': (_view_case((16, 3), (3, 1)), 'storage holds 4'),
    'negative_stride': (_view_case((4,), (-1,), offset=3), 'negative size, stride or offset'),
    'negative_size': (_view_case((-2, 2), (2, 1)), 'negative size, stride or offset'),
    'negative_offset': (_view_case((2,), (1,), offset=-8), 'negative size, stride or offset'),
    'offset_far_past_the_end': (_view_case((2,), (1,), offset=10**6), 'storage holds 4'),
    'overflowing_size': (_view_case((2**62, 2**62), (1, 1)), 'storage holds 4'),
    'stride_zero_expanded_to_2_40': (_view_case((2**40,), (0,)), 'holds 1099511627776 elements'),
    'huge_stride': (_view_case((2, 2), (2**63, 1)), 'storage holds 4'),
    'strides_do_not_match_dims': (_view_case((2, 2), (1,)), '1 strides for 2 dimensions'),
    'size_not_ints': (_view_case(('a', 2), (2, 1)), 'malformed tensor record'),
    'scalar_past_the_end': (_view_case((), (), offset=4), 'storage holds 4'),
}


def _raw(*parts: bytes) -> bytes:
  return b'\x80\x02' + b''.join(parts) + b'.'


def _global(module, name) -> bytes:
  return b'c' + f'{module}\n{name}\n'.encode()


def _value(value) -> bytes:
  """The opcodes that push `value` (a fragment of pickle.dumps without PROTO and STOP)."""
  return pickle.dumps(value, protocol=2)[2:-1]


# BUILD on the objects the allowlist hands out: each would rewrite reader state shared with the
# next load (the storage's dtype, the rebuild function's attributes, OrderedDict's class dict).
BUILD_CASES = {
    'build_on_storage_type': _raw(_global('torch', 'FloatStorage'),
                                  _value({'dtype': 'int8'}), b'b'),
    'build_slots_on_storage_type': _raw(_global('torch', 'FloatStorage'),
                                        _value((None, {'dtype': 'int8'})), b'b'),
    'build_on_rebuild_function': _raw(_global('torch._utils', '_rebuild_tensor_v2'),
                                      _value((None, {'__defaults__': (1,)})), b'b'),
    'build_on_ordered_dict_class': _raw(_global('collections', 'OrderedDict'),
                                        _value((None, {'fromkeys': 1})), b'b'),
}


def _write_corpus(root) -> dict[str, tuple[str, str]]:
  """Every hostile file: name -> (path, fragment its error must hold)."""
  corpus = {}
  for name, (tree, expected) in VIEW_CASES.items():
    for fmt in ('zip', 'legacy'):
      path = os.path.join(root, f'{name}-{fmt}.pth')
      writer = zip_file if fmt == 'zip' else legacy_file
      writer(path, _pickle(tree), {'0': FOUR_FLOATS})
      corpus[f'{name}-{fmt}'] = (path, expected)
  for name, payload in BUILD_CASES.items():
    for fmt in ('zip', 'legacy'):
      path = os.path.join(root, f'{name}-{fmt}.pth')
      (zip_file if fmt == 'zip' else legacy_file)(path, payload, {})
      corpus[f'{name}-{fmt}'] = (path, 'refusing a BUILD opcode')
  tree = _pickle({'w': _Tensor(_Storage('0', 4), 0, (4,), (1,))})
  cases = {
      'numel_2_61': (lambda p: legacy_file(p, tree, {'0': FOUR_FLOATS}, {'0': 2**61}),
                     'claims 2,305,843,009,213,693,952 elements'),
      'numel_past_the_end': (lambda p: legacy_file(p, tree, {'0': FOUR_FLOATS}, {'0': 5}),
                             'bytes are left; truncated'),
      'storage_missing': (lambda p: zip_file(p, tree, {}), "storage '0' is missing"),
      'storage_not_whole_elements': (lambda p: zip_file(p, tree, {'0': FOUR_FLOATS[:7]}),
                                     'not a whole number of float32 elements'),
      'bytearray8_of_2_60_bytes': (
          lambda p: zip_file(p, b'\x80\x05\x96' + struct.pack('<Q', 2**60) + b'.', {}),
          'out-of-band buffers are not allowed'),
      'binunicode_of_4_gib': (
          lambda p: legacy_file(p, _raw(b'X' + struct.pack('<I', 2**32 - 1)), {}),
          'not a readable torch.save file'),
      'os_system': (lambda p: zip_file(p, _raw(_global('os', 'system'), _value(('true',)),
                                                b'R'), {}),
                    'refusing to load global os.system'),
      'lists_nested_200000_deep': (lambda p: zip_file(p, _deep_lists(200_000), {}),
                                   'nested too deeply'),
      'shared_dicts_naming_2_60_paths': (lambda p: zip_file(p, _exponential_tree(60), {}),
                                         'more than 1,000,000 entries'),
      'build_on_a_checked_tensor': (lambda p: zip_file(p, _pickle({'w': _Tensor(
          _Storage('0', 4), 0, (2,), (1,), state={'shape': (16, 3)})}), {'0': FOUR_FLOATS}),
                                    'refusing a BUILD opcode on _LazyTensor'),
      'dotted_and_nested_names_clash': (lambda p: zip_file(p, _pickle({
          'a.b': _Tensor(_Storage('0', 4), 0, (4,), (1,)),
          'a': {'b': _Tensor(_Storage('0', 4), 0, (2,), (1,))}}), {'0': FOUR_FLOATS}),
                                        "two tensors are both named 'a/b'"),
      'dtype_conflict': (lambda p: zip_file(p, _pickle({
          'a': _Tensor(_Storage('0', 4), 0, (4,), (1,)),
          'b': _Tensor(_Storage('0', 4, 'IntStorage'), 0, (4,), (1,))}), {'0': FOUR_FLOATS}),
                         'read as both float32 and int32'),
  }
  for name, (write, expected) in cases.items():
    path = os.path.join(root, f'{name}.pth')
    write(path)
    corpus[name] = (path, expected)
  npz_cases = {
      'raw_pickle_member': ('w.npy', pickle.dumps({'a': 1}), 'not an .npy'),
      'member_without_npy_suffix': ('w', b'\x93NUMPY', 'is not an .npy array'),
      'header_claims_more_than_stored': (
          'w.npy', _npy_bytes(np.zeros(4, np.float32))[:-8], 'truncated or damaged'),
      'header_claims_2_62_elements': (
          'w.npy', _npy_header('<f4', (2**62,)) + b'\0' * 16, 'truncated or damaged'),
      'object_dtype': ('w.npy', _npy_header('|O', (1,)) + b'\0' * 8, 'only numbers'),
  }
  from safetensors.numpy import save_file
  path = os.path.join(root, 'names_clash.safetensors')
  save_file({'a.b': np.zeros(2, np.float32), 'a/b': np.ones(2, np.float32)}, path)
  corpus['safetensors_names_clash'] = (path, 'differing only in "." and "/"')
  for name, (member, data, expected) in npz_cases.items():
    path = os.path.join(root, f'{name}.npz')
    with zipfile.ZipFile(path, 'w') as archive:
      archive.writestr(member, data)
    corpus[name] = (path, expected)
  return corpus


def _exponential_tree(depth: int) -> bytes:
  """A dict holding the previous dict under two keys, `depth` times: a few hundred bytes that
  name 2**depth paths."""
  parts = [b'}q\x00']  # memo 0: {}
  for level in range(depth):
    get = b'h' + bytes([level])
    parts.append(b'}(' + _value('a') + get + _value('b') + get + b'u' + b'q' + bytes([level + 1]))
    if level < depth - 1:
      parts.append(b'0')  # POP: only the memo keeps it
  return _raw(*parts)


def _deep_lists(depth: int) -> bytes:
  """Lists nested `depth` deep: `depth` EMPTY_LISTs, then APPEND each into the one below."""
  return _raw(b']' * depth, b'a' * (depth - 1))


def _npy_bytes(array) -> bytes:
  buffer = io.BytesIO()
  np.save(buffer, array)
  return buffer.getvalue()


def _npy_header(descr, shape) -> bytes:
  buffer = io.BytesIO()
  np.lib.format.write_array_header_1_0(buffer, dict(descr=descr, fortran_order=False,
                                                    shape=shape))
  return buffer.getvalue()


READER = """
import json, sys
import numpy as np
from tljax.weights import read
from tljax.weights.errors import WeightsError
corpus, legit, expected = json.loads(sys.argv[1])
out = {}
for name, (path, _) in corpus.items():
  try:
    read.read_file(path)
    out[name] = 'accepted'
  except WeightsError as e:
    out[name] = str(e)
  flat = read.read_file(legit)  # after every refusal, a real file still decodes exactly
  for key, values in expected.items():
    if not np.array_equal(flat[key], np.asarray(values, flat[key].dtype)):
      out[name] = f'poisoned the reader: {key} decoded as {flat[key].tolist()}'
print(json.dumps(out))
"""


def test_hostile_weight_files_are_refused_by_a_process_that_survives(tmp_path):
  corpus = _write_corpus(str(tmp_path))
  legit = tmp_path / 'legit.pth'
  state = {'conv.weight': torch.arange(6, dtype=torch.float32).reshape(2, 3),
           'half': torch.tensor([0.5, -2.0]).half(), 'flags': torch.tensor([True, False]),
           'view': torch.arange(12, dtype=torch.float32).reshape(3, 4)[:, 1:3].t()}
  torch.save(state, legit, _use_new_zipfile_serialization=False)
  expected = {k.replace('.', '/'): v.tolist() for k, v in state.items()}
  process = subprocess.run([sys.executable, '-c', READER,
                            json.dumps([corpus, str(legit), expected])],
                           cwd=REPO, capture_output=True, text=True, timeout=600,
                           env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert process.returncode == 0, process.stderr[-3000:]  # no segfault, no uncaught error
  results = json.loads(process.stdout.strip().splitlines()[-1])
  assert results.keys() == corpus.keys()
  for name, (path, fragment) in corpus.items():
    message = results[name]
    assert message.startswith(f'{path}'), (name, message)
    assert fragment in message, (name, message)
    assert '\n' not in message, (name, message)
  print(f'\n{len(corpus)} hostile weight files refused, each with one line')
