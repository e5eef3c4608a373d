"""Device placement: the mesh, global batches, and jit-with-sharding or pmap step runners.

Both runners take the same pure step functions and the same per-process numpy batches, so the
training loop does not know which one it drives. Under jit the train state is laid out by a
`partition.Layout` (replicated, FSDP, or a 2-D ('data', 'model') mesh) and XLA inserts the
gathers and reductions; under pmap it is replicated.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import warnings
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tljax import preemption
from tljax.errors import Preempted, UserError
from tljax.partition import DATA_AXIS, Layout

PMAP_AXIS = 'batch'


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Joins a multi-process job; with no arguments JAX reads TPU / SLURM environments."""
  kwargs = {k: v for k, v in dict(coordinator_address=coordinator_address,
                                  num_processes=num_processes,
                                  process_id=process_id).items() if v is not None}
  if coordinator_address is not None:  # checked here: a malformed one crashes JAX's client
    host, _, port = coordinator_address.rpartition(':')
    if not host or not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
      raise UserError(f'--coordinator_address={coordinator_address!r} must be HOST:PORT with a '
                      'port in 1-65535')
  if (num_processes is not None and process_id is not None
      and not 0 <= process_id < num_processes):
    raise UserError(f'--process_id={process_id} must be in [0, --num_processes={num_processes})')
  flags = ', '.join(f'--{k}={v}' for k, v in kwargs.items()) or '--distributed'
  # Joining blocks in native code until every process is there (or a timeout); it runs in a
  # thread so that SIGTERM or Ctrl-C meanwhile still stops this process, with nothing to save.
  outcome: dict[str, BaseException] = {}

  def join() -> None:
    try:
      jax.distributed.initialize(**kwargs)
    except BaseException as e:  # noqa: BLE001 (handed to the main thread)
      outcome['error'] = e

  print(f'joining the jax.distributed job ({flags}): waiting for every process (JAX gives up '
        'after 300 s); SIGTERM or Ctrl-C stops the wait', flush=True)
  thread = threading.Thread(target=join, name='tljax-distributed-join', daemon=True)
  thread.start()
  while thread.is_alive():
    thread.join(0.1)
    requested = preemption.requested_early()
    if requested:
      raise Preempted(None, f'stopped by {requested} while joining the jax.distributed job '
                            f'({flags}); nothing needed saving')
  error = outcome.get('error')
  if isinstance(error, (ValueError, RuntimeError, TypeError)):  # bad ids, no coordinator
    reason = ' '.join(str(error).split())[:300]
    raise UserError(f'cannot join the jax.distributed job ({flags}): {reason}') from None
  if error is not None:
    raise error


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
  _repair_on_read_errors(directory)
  return directory


def _decompresses(data: bytes) -> bool:
  try:
    zlib.decompress(data)
    return True
  except zlib.error:
    pass
  try:
    import zstandard
    zstandard.ZstdDecompressor().decompress(data)
    return True
  except Exception:  # noqa: BLE001 (not installed, or not a whole zstd frame)
    return False


def repair_compilation_cache(directory: str) -> list[str]:
  """Deletes entries of the compilation cache that do not decompress and returns them. JAX
  writes an entry in place and never replaces one, so a process killed mid-write leaves an
  entry every later run fails to read, recompiles, and cannot rewrite."""
  removed = []
  for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
    path = os.path.join(directory, name)
    if name.endswith('-cache') and os.path.isfile(path):
      with open(path, 'rb') as f:
        if _decompresses(f.read()):
          continue
      for stale in (path, path[:-len('-cache')] + '-atime'):
        with contextlib.suppress(OSError):
          os.remove(stale)
      removed.append(name)
  return removed


def _repair_on_read_errors(directory: str) -> None:
  """When JAX warns that it cannot read a cache entry, the damaged entries are deleted (one
  line says how many), so the program compiled now is written in their place."""
  show = warnings.showwarning
  if getattr(show, 'tljax_cache_repair', False):
    return

  def showwarning(message, category, filename, lineno, file=None, line=None):
    if 'Error reading persistent compilation cache entry' in str(message):
      removed = repair_compilation_cache(directory)
      print(f'removed {len(removed)} damaged entr{"y" if len(removed) == 1 else "ies"} of the '
            f'compilation cache {directory} (left by a process killed while writing them)',
            file=sys.stderr, flush=True)
      return
    show(message, category, filename, lineno, file, line)

  showwarning.tljax_cache_repair = True
  warnings.showwarning = showwarning


MAX_CPU_DEVICES = 512


def set_cpu_device_count(count: int) -> None:
  """Simulates `count` CPU devices; must run before the backend starts."""
  if not 1 <= count <= MAX_CPU_DEVICES:
    raise UserError(f'--cpu_devices={count} must be between 1 and {MAX_CPU_DEVICES} (simulated '
                    'devices share this machine\'s cores and memory)')
  jax.config.update('jax_num_cpu_devices', count)
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')


def make_mesh(layout: Layout | None = None) -> Mesh:
  """A mesh over every device of every process: 1-D ('data',) or 2-D ('data', 'model').

  Devices are ordered by process, so each process holds whole rows of the 'data' axis and
  feeds them its own contiguous slice of the global batch.
  """
  layout = layout or Layout(data=jax.device_count())
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  return Mesh(np.asarray(devices).reshape(layout.mesh_shape), layout.axis_names)


def check_batch_size(global_batch: int, layout: Layout | None = None) -> int:
  """The per-process batch; the global batch must split evenly over the 'data' axis (all
  devices, unless a 'model' axis shares them) and over processes."""
  data = layout.data if layout else jax.device_count()
  if global_batch % data:
    where = (f'the {data} devices of the mesh\'s data axis (sharding.model_axis='
             f'{layout.model})' if layout and layout.model > 1 else f'the {data} devices')
    raise UserError(f'data.batch_size={global_batch} is not divisible by {where}; pick a '
                    'multiple')
  return global_batch // jax.process_count()


def layout_summary(state: Any, mesh: Mesh) -> dict[str, Any]:
  """How the placed arrays of `state` are really split: leaves, split leaves, and the bytes one
  device holds against a full copy."""
  leaves = [x for x in jax.tree.leaves(state) if isinstance(x, jax.Array)]
  full = sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves)
  per_device = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in leaves)
  return dict(mesh=dict(mesh.shape), leaves=len(leaves),
              split_leaves=sum(1 for x in leaves if not x.sharding.is_fully_replicated),
              bytes_replicated=int(full), bytes_per_device=int(per_device))


class JitRunner:
  """One jitted step over a Mesh: batch split on 'data', state laid out by `layout`, donated."""
  name = 'jit'

  def __init__(self, layout: Layout | None = None):
    self.layout = layout or Layout(data=jax.device_count())
    self.mesh = make_mesh(self.layout)
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P(DATA_AXIS))

  def state_shardings(self, state: Any) -> Any:
    """The NamedSharding of every leaf of `state` (host or device arrays)."""
    return jax.tree.map(lambda spec: NamedSharding(self.mesh, spec),
                        self.layout.tree_specs(state))

  def abstract_state(self, state: Any) -> Any:
    """Shapes, dtypes and target shardings: what a checkpoint is restored into (resharded)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                        state, self.state_shardings(state))

  def place_state(self, state: Any) -> Any:
    """Lays host values out on every device of every process; arrays already laid out stay."""
    def put(x, sharding):
      if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
        return x
      host = np.asarray(x)
      return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
    return jax.tree.map(put, state, self.state_shardings(state))

  def host_state(self, state: Any) -> Any:
    """The state as jax.Arrays in their global layout, which checkpoints save as is."""
    return state

  def global_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
            for k, v in local_batch.items()}

  def jit_train(self, train_step: Callable, state: Any) -> Callable:
    """The jitted step on global arrays: state in and out in its layout, donated."""
    shardings = self.state_shardings(state)
    return jax.jit(train_step, in_shardings=(shardings, self.batch_sharding),
                   out_shardings=(shardings, self.replicated), donate_argnums=0)

  def compile_train(self, train_step: Callable, state: Any) -> Callable:
    step = self.jit_train(train_step, state)
    return lambda state, batch: step(state, self.global_batch(batch))

  def compile_eval(self, eval_step: Callable, state: Any) -> Callable:
    step = jax.jit(eval_step, in_shardings=(self.state_shardings(state), self.batch_sharding),
                   out_shardings=self.replicated)
    return lambda state, batch: step(state, self.global_batch(batch))

  def metrics_to_host(self, metrics: Any) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


class PmapRunner:
  """The same steps under pmap: state replicated with a leading local-device axis."""
  name = 'pmap'

  def __init__(self):
    self.local_devices = jax.local_devices()
    self.num_local = len(self.local_devices)

  def abstract_state(self, state: Any) -> Any:
    """Shapes and dtypes on the first local device; place_state then copies to the others."""
    device = jax.sharding.SingleDeviceSharding(self.local_devices[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=device),
                        state)

  def place_state(self, state: Any) -> Any:
    """One copy per local device. From host values: an array committed to one device (a
    restored checkpoint, or `host_state`'s first replica) broadcast on that device would stay
    there, and pmap refuses it."""
    return jax.tree.map(
        lambda x: jnp.broadcast_to(np.asarray(x), (self.num_local, *np.shape(x))), state)

  def host_state(self, state: Any) -> Any:
    return jax.tree.map(lambda x: x[0], state)

  def _split(self, local_batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.reshape(self.num_local, -1, *v.shape[1:]) for k, v in local_batch.items()}

  def compile_train(self, train_step: Callable, state: Any = None) -> Callable:
    step = jax.pmap(train_step, axis_name=PMAP_AXIS, donate_argnums=0)
    return lambda state, batch: step(state, self._split(batch))

  def compile_eval(self, eval_step: Callable, state: Any = None) -> Callable:
    step = jax.pmap(eval_step, axis_name=PMAP_AXIS)
    return lambda state, batch: step(state, self._split(batch))

  def metrics_to_host(self, metrics: Any) -> dict[str, float]:
    return {k: float(v[0]) for k, v in jax.device_get(metrics).items()}


# Runners by the name config.parallel gives: (layout) -> runner.
RUNNERS: dict[str, Callable[[Layout | None], JitRunner | PmapRunner]] = {
    'jit': JitRunner,
    'pmap': lambda layout: PmapRunner(),
}


def make_runner(kind: str, layout: Layout | None = None) -> JitRunner | PmapRunner:
  if kind not in RUNNERS:
    raise UserError(f'config.parallel must be one of {tuple(RUNNERS)}, got {kind!r}')
  return RUNNERS[kind](layout)
