"""Readers: a pretrained source -> flat `{'params/a/b': np.ndarray}`, never executing its code."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from tljax.errors import UserError


class WeightsError(UserError):
  """A pretrained source that cannot be read or does not fit the model."""


def restore_latest(path: str) -> dict[str, Any]:
  """The latest checkpoint of a tljax workdir as a plain tree (step, params, batch_stats,
  opt_state) on this process's first device, whatever topology wrote it."""
  directory = os.path.join(os.path.abspath(path), 'checkpoints')
  if not os.path.isdir(directory):
    raise WeightsError(f'{path!r} (init.pretrained) is not a tljax workdir: no checkpoints/')
  manager = ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler())
  step = manager.latest_step()
  if step is None:
    raise WeightsError(f'{directory} holds no complete checkpoint')
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          manager.item_metadata(step))
  restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  manager.close()
  return restored


def read_tljax_workdir(path: str) -> dict[str, np.ndarray]:
  """`params/...` and `batch_stats/...` of the latest checkpoint in a tljax run's workdir."""
  restored = restore_latest(path)
  tree = {'params': restored['params'], 'batch_stats': restored.get('batch_stats') or {}}
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep='/').items()}


def read_pretrained(source: str) -> dict[str, np.ndarray]:
  """Dispatches on what `source` is; today a tljax workdir (pretrain here, transfer next)."""
  if os.path.isdir(source):
    return read_tljax_workdir(source)
  raise WeightsError(f'init.pretrained={source!r}: not a tljax workdir')
