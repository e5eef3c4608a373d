"""Device placement: the mesh, global batches, and jit-with-sharding or pmap step runners.

Both runners take the same pure step functions and the same per-process numpy batches, so the
training loop does not know which one it drives.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tljax.errors import UserError

DATA_AXIS = 'data'
PMAP_AXIS = 'batch'


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Joins a multi-process job; with no arguments JAX reads TPU / SLURM environments."""
  kwargs = {k: v for k, v in dict(coordinator_address=coordinator_address,
                                  num_processes=num_processes,
                                  process_id=process_id).items() if v is not None}
  jax.distributed.initialize(**kwargs)


def sync_processes(name: str) -> None:
  """Waits until every process gets here (a no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


COMPILATION_CACHE_ENV = 'TLJAX_COMPILATION_CACHE'  # a directory, or '' to turn the cache off


def enable_compilation_cache() -> str | None:
  """Turns on JAX's persistent compilation cache (default ~/.cache/tljax/xla), so a rerun or
  another sweep variant with the same program skips XLA compilation; returns the directory."""
  default = os.path.join(os.path.expanduser('~'), '.cache', 'tljax', 'xla')
  directory = os.environ.get(COMPILATION_CACHE_ENV, default)
  if not directory:
    return None
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  return directory


def set_cpu_device_count(count: int) -> None:
  """Simulates `count` CPU devices; must run before the backend starts."""
  jax.config.update('jax_num_cpu_devices', count)
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')


def make_mesh() -> Mesh:
  """A 1-D mesh over every device of every process, axis 'data'."""
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def check_batch_size(global_batch: int) -> int:
  """The per-process batch; the global batch must split evenly over devices and processes."""
  devices = jax.device_count()
  if global_batch % devices:
    raise UserError(f'data.batch_size={global_batch} is not divisible by the {devices} '
                     'devices; pick a multiple')
  return global_batch // jax.process_count()


class JitRunner:
  """One jitted step over a Mesh: batch split on 'data', parameters replicated, state donated."""
  name = 'jit'

  def __init__(self, mesh: Mesh | None = None):
    self.mesh = mesh or make_mesh()
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P(DATA_AXIS))

  def place_state(self, state: Any) -> Any:
    """Replicates host values on every device of every process."""
    def put(x):
      host = np.asarray(x)
      return jax.make_array_from_callback(host.shape, self.replicated, lambda index: host[index])
    return jax.tree.map(put, state)

  def host_state(self, state: Any) -> Any:
    """The state as ordinary (replicated) jax.Arrays, the layout checkpoints use."""
    return state

  def global_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
            for k, v in local_batch.items()}

  def compile_train(self, train_step: Callable) -> Callable:
    step = jax.jit(train_step, out_shardings=(self.replicated, self.replicated),
                   donate_argnums=0)
    return lambda state, batch: step(state, self.global_batch(batch))

  def compile_eval(self, eval_step: Callable) -> Callable:
    step = jax.jit(eval_step, out_shardings=self.replicated)
    return lambda state, batch: step(state, self.global_batch(batch))

  def metrics_to_host(self, metrics: Any) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


class PmapRunner:
  """The same steps under pmap: state replicated with a leading local-device axis."""
  name = 'pmap'

  def __init__(self):
    self.local_devices = jax.local_devices()
    self.num_local = len(self.local_devices)

  def place_state(self, state: Any) -> Any:
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (self.num_local, *np.shape(x))), state)

  def host_state(self, state: Any) -> Any:
    return jax.tree.map(lambda x: x[0], state)

  def _split(self, local_batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.reshape(self.num_local, -1, *v.shape[1:]) for k, v in local_batch.items()}

  def compile_train(self, train_step: Callable) -> Callable:
    step = jax.pmap(train_step, axis_name=PMAP_AXIS, donate_argnums=0)
    return lambda state, batch: step(state, self._split(batch))

  def compile_eval(self, eval_step: Callable) -> Callable:
    step = jax.pmap(eval_step, axis_name=PMAP_AXIS)
    return lambda state, batch: step(state, self._split(batch))

  def metrics_to_host(self, metrics: Any) -> dict[str, float]:
    return {k: float(v[0]) for k, v in jax.device_get(metrics).items()}


def make_runner(kind: str) -> JitRunner | PmapRunner:
  if kind == 'jit':
    return JitRunner()
  if kind == 'pmap':
    return PmapRunner()
  raise UserError(f"config.parallel must be 'jit' or 'pmap', got {kind!r}")
