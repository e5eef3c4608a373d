"""Readers: a file or tljax workdir -> flat `{'a/b/c': np.ndarray}`, never executing its code.

Outside layouts keep their own names with `.` turned into `/` (`features/0/0/weight`); a model's
converter maps them onto tljax paths. A tljax workdir reads as `params/...`/`batch_stats/...`.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from tljax import checkpoint, npz
from tljax.weights import torch_file
from tljax.weights.errors import WeightsError

TORCH_SUFFIXES = ('.pth', '.pt', '.bin', '.ckpt')


def restore_latest(path: str) -> dict[str, Any]:
  """The newest readable checkpoint of a tljax workdir as a plain tree (step, params,
  batch_stats, opt_state) on this process's first device, whatever topology wrote it. Damaged
  newer checkpoints are passed over (and named in the log), never changed."""
  directory = os.path.join(os.path.abspath(path), 'checkpoints')
  if not os.path.isdir(directory):
    raise WeightsError(f'{path!r} (init.pretrained) is not a tljax workdir: no checkpoints/')
  resume = checkpoint.restore_newest(path)
  damaged = '; '.join(f'step {step}: {reason}' for step, reason in resume.damaged)
  if resume.state is None:
    raise WeightsError(f'{directory} holds no readable checkpoint' +
                       (f' (damaged: {damaged})' if damaged else ''))
  if damaged:
    print(f'warning: {directory}: passed over damaged checkpoint(s) ({damaged}); read step '
          f'{resume.step} instead', file=sys.stderr, flush=True)
  return resume.state


def read_tljax_workdir(path: str) -> dict[str, np.ndarray]:
  """`params/...` and `batch_stats/...` of the latest checkpoint in a tljax run's workdir."""
  restored = restore_latest(path)
  tree = {'params': restored['params'], 'batch_stats': restored.get('batch_stats') or {}}
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep='/').items()}


def read_npz(path: str) -> dict[str, np.ndarray]:
  """big_vision / vit_jax / BiT `.npz`: keys are already `/`-joined flax paths."""
  return npz.read(path, WeightsError, f'{path}:')


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """timm / HF transformers `.safetensors`."""
  from safetensors import SafetensorError
  from safetensors.numpy import load_file
  try:
    tensors = load_file(path)
  except (SafetensorError, Exception) as e:  # noqa: BLE001 (e.g. a dtype NumPy lacks: one line)
    reason = ' '.join(f'{type(e).__name__}: {e}'.split())[:200]
    if isinstance(e, (AttributeError, TypeError)) and ('float8' in reason or 'dtype' in reason):
      raise WeightsError(f'{path}: holds tensors of a dtype tljax does not read ({reason}); '
                         'convert them to float32 and save again') from None
    raise WeightsError(f'{path}: not a readable safetensors file ({reason})') from None
  if not tensors:
    raise WeightsError(f'{path}: holds no tensors')
  flat = {k.replace('.', '/'): v for k, v in tensors.items()}
  if len(flat) != len(tensors):
    names = sorted(tensors)
    clash = next(a for a in names if a.replace('.', '/') in
                 {b.replace('.', '/') for b in names if b != a})
    raise WeightsError(f'{path}: tensors {clash!r} and another name differing only in "." and '
                       '"/" would be read as one; not a file tljax can read unambiguously')
  return flat


def _flatten_tensors(tree: Any, source: str) -> dict[str, np.ndarray]:
  """`{a/b/c: array}` of the nested mappings in `tree` (numbers, strings and lists are
  training metadata, not weights); a hostile file's shared subtrees cannot blow it up."""
  out: dict[str, np.ndarray] = {}
  stack, visited = [('', tree)], 0
  while stack:
    prefix, node = stack.pop()
    visited += 1
    if visited > torch_file.MAX_OBJECTS:
      raise WeightsError(f'{source}: more than {torch_file.MAX_OBJECTS:,} entries; not a '
                         'weights file')
    if isinstance(node, np.ndarray):
      if prefix in out:  # 'a.b' and {'a': {'b'}} are both a/b: neither may shadow the other
        raise WeightsError(f'{source}: two tensors are both named {prefix!r} (once with dots, '
                           'once nested); not a state dict tljax can read unambiguously')
      out[prefix] = node
    elif isinstance(node, Mapping):
      children = [(f'{prefix}/{name}' if prefix else name, value)
                  for name, value in ((str(k).replace('.', '/'), v) for k, v in node.items())]
      stack.extend(reversed(children))  # popped in the file's order
  return out


def read_torch(path: str) -> dict[str, np.ndarray]:
  """PyTorch `torch.save` state dict (zip or legacy), through the restricted unpickler; a
  checkpoint dict holding `state_dict` or `model` is unwrapped."""
  tree = torch_file.load(path)
  for key in ('state_dict', 'model', 'model_state_dict'):
    if isinstance(tree, Mapping) and isinstance(tree.get(key), Mapping):
      tree = tree[key]
  flat = _flatten_tensors(tree, path)
  if not flat:
    raise WeightsError(f'{path}: holds no tensors')
  return {k.removeprefix('module/'): v for k, v in flat.items()}  # DataParallel wrapping


def read_file(path: str) -> dict[str, np.ndarray]:
  """Dispatches on the file name: .npz, .safetensors, or a torch.save file."""
  if not os.path.isfile(path):
    raise WeightsError(f'{path}: ' + ('not a regular file (a directory, FIFO or device)'
                                      if os.path.exists(path) else 'no such file'))
  if path.endswith('.npz'):
    return read_npz(path)
  if path.endswith('.safetensors'):
    return read_safetensors(path)
  if path.endswith(TORCH_SUFFIXES):
    return read_torch(path)
  raise WeightsError(f'{path}: unknown weights format (expected .npz, .safetensors or '
                     f'{", ".join(TORCH_SUFFIXES)})')


def sha256_of(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def verify_sha256(path: str, expected: str) -> None:
  """`expected` is the full hex digest or a prefix of at least 8 digits (torch.hub puts one in
  its file names); fails before anything in the file is read."""
  actual = sha256_of(path)
  if len(expected) < 8 or not actual.startswith(expected.lower()):
    raise WeightsError(f'{path}: sha256 {actual} does not match the expected {expected}; '
                       'the file is corrupt or not the one this source names')
