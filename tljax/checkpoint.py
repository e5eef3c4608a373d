"""Orbax CheckpointManager in `<workdir>/checkpoints`: periodic saves, keep N, resume the newest
checkpoint that reads completely.

Orbax writes each step into `<step>.orbax-checkpoint-tmp` and renames it when complete, so a
process killed mid-save leaves no checkpoint that `latest_step` would pick, and older checkpoints
are deleted only after a newer one is complete. A save that fails (a full disk) removes its
temporary directory and raises one error naming the step; the complete checkpoints stay. A
checkpoint damaged afterwards (a truncated file, an empty step directory) is set aside into
`<workdir>/checkpoints-damaged/`, never deleted, and the run resumes from the newest one that
restores; a checkpoint of another model (shapes that differ) is an error, not damage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import sys
import traceback
import warnings
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from tljax.errors import TrainingFailed, UserError

TMP_SUFFIX = '.orbax-checkpoint-tmp'
DAMAGED_DIR = 'checkpoints-damaged'


class CheckpointWriteError(TrainingFailed):
  """A checkpoint could not be written (disk full, quota, permissions); earlier ones are
  intact."""


class CheckpointMismatch(UserError):
  """A checkpoint that reads, but holds the state of another model or optimizer."""


STEP_NAME = re.compile(r'0|[1-9][0-9]*')  # how orbax names a step: str(step), ASCII digits


def step_names(directory: str) -> list[int]:
  """The step numbers named in a checkpoints directory (whatever state they are in), newest
  first; none when the directory does not exist. Other names ('09', '²', 'x') are not steps."""
  if not os.path.isdir(directory):
    return []
  return sorted((int(name) for name in os.listdir(directory) if STEP_NAME.fullmatch(name)),
                reverse=True)


def check_metrics_files(directory: str) -> None:
  """Orbax reads every checkpoint's saved metrics (`<step>/metrics/metrics`, JSON) as soon as
  a manager opens the directory, and one damaged file fails them all: refuse it first, in one
  line naming it."""
  for step in step_names(directory):
    path = os.path.join(directory, str(step), 'metrics', 'metrics')
    if not os.path.lexists(path):
      continue
    try:
      with open(path, encoding='utf-8') as f:
        value = json.load(f)
      if not isinstance(value, dict):
        raise ValueError('not a JSON object')
    except (OSError, ValueError) as e:
      raise UserError(f'{path} (the validation metrics saved with checkpoint {step}) is '
                      f'damaged ({type(e).__name__}: {" ".join(str(e).split())[:80]}); move '
                      f'that checkpoint\'s metrics/ folder away (its arrays stay usable) and '
                      'run the same command again') from None


def has_checkpoints(workdir: str) -> bool:
  """Whether `workdir` holds at least one checkpoint (a step-numbered entry)."""
  return bool(step_names(os.path.join(workdir, 'checkpoints')))


@dataclasses.dataclass
class Resume:
  """Where a run starts: the step and state restored (0, None for a new run), and the damaged
  checkpoints passed over on the way, as (step, reason)."""
  step: int = 0
  state: Any = None
  damaged: list[tuple[int, str]] = dataclasses.field(default_factory=list)


def _path_name(path: tuple) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def _leaf_specs(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {_path_name(path): (tuple(leaf.shape), str(np.dtype(leaf.dtype))) for path, leaf in flat}


def _check_fits(metadata: Any, like: Any, where: str) -> None:
  """Refuses a checkpoint whose arrays (names, shapes, dtypes) are not those of `like`."""
  saved, wanted = _leaf_specs(metadata), _leaf_specs(like)
  order = lambda keys: sorted(keys, key=lambda k: (not k.startswith('params/'), k))  # noqa: E731
  differences = [f'{k} is {saved[k][0]} {saved[k][1]} there, {wanted[k][0]} {wanted[k][1]} '
                 'here' for k in order(saved.keys() & wanted.keys()) if saved[k] != wanted[k]]
  differences += [f'{k} only there' for k in order(saved.keys() - wanted.keys())]
  differences += [f'{k} only here' for k in order(wanted.keys() - saved.keys())]
  if differences:
    shown = '; '.join(differences[:3]) + (f' and {len(differences) - 3} more'
                                          if len(differences) > 3 else '')
    raise CheckpointMismatch(
        f'{where} holds the state of another model or optimizer ({shown}); use another '
        'workdir, or pass --fresh to move the earlier run aside')


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
  """Orbax's warnings about a damaged checkpoint, and the "Event loop is closed" errors its
  reader threads report after a failed read, are noise once the damage is named in one line."""
  logger = logging.getLogger('absl')
  level = logger.level
  logger.setLevel(logging.CRITICAL)
  _drop_orbax_noise()
  try:
    yield
  finally:
    logger.setLevel(level)


def _from_the_reader(error: BaseException | None) -> bool:
  """Whether `error` was raised inside orbax's or tensorstore's code (reading or writing)."""
  frames = traceback.extract_tb(error.__traceback__) if error is not None else []
  return any(f'{os.sep}orbax{os.sep}' in frame.filename
             or f'{os.sep}tensorstore{os.sep}' in frame.filename
             or f'{os.sep}asyncio{os.sep}' in frame.filename for frame in frames)


class _ReaderNoise(logging.Filter):
  """Drops the tracebacks of reads and writes that failed with the one already named
  (asyncio's "Task exception was never retrieved", orbax's thread errors)."""

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    return not (error is not None and _from_the_reader(error))


def _drop_orbax_noise() -> None:
  """After a read of a damaged checkpoint (or a write to a full disk) failed, its other pending
  reads or writes fail too, in threads and coroutines nobody waits for; their reports are noise
  once the failure is named in one line."""
  previous = sys.unraisablehook
  if getattr(previous, 'tljax_filter', False):
    return

  def hook(unraisable: Any) -> None:
    if not _from_the_reader(unraisable.exc_value):
      previous(unraisable)

  hook.tljax_filter = True
  sys.unraisablehook = hook
  for name in ('asyncio', 'absl'):  # orbax's threads log their tracebacks through absl
    logging.getLogger(name).addFilter(_ReaderNoise())
  warnings.filterwarnings('ignore', message='coroutine .* was never awaited',
                          category=RuntimeWarning)


def restore_newest(workdir: str, like: Any = None, only: int | None = None) -> Resume:
  """The newest checkpoint in `workdir` that restores completely into `like` (abstract arrays
  with target shardings, or a function of the step giving them, for states whose structure
  changes with the step; None: as saved, on this process's first device), passing over
  damaged ones; nothing is written or moved here. `only`: that step or none."""
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  resume = Resume()
  check_metrics_files(directory)
  steps = [s for s in step_names(directory) if only is None or s == only]
  if not steps:
    return resume
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
  first_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with _quiet_orbax():
    manager = ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler(),
                                    options=options)
    try:
      for step in steps:
        where = f'checkpoint {os.path.join(directory, str(step))}'
        if not os.path.isdir(os.path.join(directory, str(step))):
          resume.damaged.append((step, 'not a directory'))
          continue
        _check_permissions(os.path.join(directory, str(step)))
        if not os.path.isfile(os.path.join(directory, str(step), '_CHECKPOINT_METADATA')):
          resume.damaged.append((step, 'incomplete: no _CHECKPOINT_METADATA'))
          continue
        try:
          metadata = manager.item_metadata(step)
        except Exception as e:  # noqa: BLE001 (orbax raises many kinds for a damaged file)
          resume.damaged.append((step, damage_reason(e)))
          continue
        if metadata is None or not jax.tree.leaves(metadata):
          resume.damaged.append((step, 'no readable metadata'))
          continue
        if like is None:
          abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                                                 sharding=first_device), metadata)
        else:
          target = like(step) if callable(like) else like
          _check_fits(metadata, target, where)
          abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        try:
          state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as e:  # noqa: BLE001
          resume.damaged.append((step, damage_reason(e)))
          continue
        resume.step, resume.state = step, state
        return resume
    finally:
      manager.close()
  return resume


def _check_permissions(step_dir: str) -> None:
  """A checkpoint this process may not read is not damaged: refuse, naming the path, rather
  than set it aside and silently train from an older one."""
  effective = os.access in os.supports_effective_ids  # the user this process runs as

  def readable(path: str, directory: bool) -> bool:
    return os.access(path, os.R_OK | (os.X_OK if directory else 0), effective_ids=effective)

  for root, dirs, files in os.walk(step_dir):
    for name in dirs + files:
      path = os.path.join(root, name)
      if not readable(path, name in dirs):
        raise UserError(f'{path} is not readable by this user (permission denied); make the '
                        f'checkpoint {step_dir} readable, or move it away')
  if not readable(step_dir, True):
    raise UserError(f'checkpoint {step_dir} is not readable by this user (permission denied)')


def damage_reason(error: BaseException) -> str:
  """The innermost cause of a failed read, in a few words (tensorstore's says which file)."""
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  text = ' '.join(str(error).split())
  return text[:200] + ('...' if len(text) > 200 else '')


def set_aside(workdir: str, damaged: list[tuple[int, str]]) -> list[str]:
  """Moves each damaged checkpoint into `<workdir>/checkpoints-damaged/` (process 0); returns
  where each went."""
  moved = []
  target_root = os.path.join(workdir, DAMAGED_DIR)
  for step, _ in damaged:
    target = base = os.path.join(target_root, str(step))
    count = 1
    while os.path.lexists(target):
      count += 1
      target = f'{base}-{count}'
    if jax.process_index() == 0:
      os.makedirs(target_root, exist_ok=True)
      os.replace(os.path.join(workdir, 'checkpoints', str(step)), target)
    moved.append(target)
  return moved


def _best_policy(metric: str, mode: str) -> ocp.checkpoint_managers.BestN:
  """Orbax's rule for the one best checkpoint: highest (mode 'max') or lowest `metric`, the
  later step on a tie."""
  return ocp.checkpoint_managers.BestN(
      get_metric_fn=lambda metrics: metrics[metric], reverse=mode == 'min', n=1,
      keep_checkpoints_without_metrics=False)


def best_step(manager: ocp.CheckpointManager, metric: str, mode: str) -> int | None:
  """The step `_best_policy` keeps among `manager`'s checkpoints saved with metrics."""
  scored = []
  for step in manager.all_steps():
    metrics = manager.metrics(step)
    if isinstance(metrics, dict) and isinstance(metrics.get(metric), (int, float)):
      scored.append((step, float(metrics[metric])))
  if not scored:
    return None
  return sorted(scored, key=lambda item: item[1], reverse=mode == 'min')[-1][0]


class Checkpointer:
  """Saves in the background into `<workdir>/checkpoints`, keeping the newest `keep` and, with
  `select=(metric, mode)`, the best checkpoint by that validation metric besides (orbax's
  BestN preservation policy over the metrics saved with each evaluated checkpoint)."""

  def __init__(self, workdir: str, keep: int = 3, select: tuple[str, str] | None = None):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    # A save cut short by a killed process is deleted here, before anything else runs. (Orbax's
    # cleanup_tmp_directories does it in a background thread that can overlap the data
    # pipeline's start, where tfds.testing.mock_data redirects every file path process-wide.)
    self._remove_partial()
    # A write that fails (a full disk) fails in orbax's threads first, whose reports would
    # print before the one error line `save` and `wait` raise: only that line is shown.
    _drop_orbax_noise()
    if select is None:
      options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    else:
      policy = ocp.checkpoint_managers.AnyPreservationPolicy(
          [ocp.checkpoint_managers.LatestN(n=keep), _best_policy(*select)])
      metric, mode = select  # best_fn: orbax saves the metrics only when it tracks a best
      options = ocp.CheckpointManagerOptions(
          create=True, preservation_policy=policy, best_fn=lambda m: m[metric], best_mode=mode)
    self.select = select
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    # The selected metric's best value so far (from an earlier run's checkpoints on resume),
    # kept here so the training loop never waits on a pending save to compare.
    best = best_step(self.manager, *select) if select else None
    self.best_value = None if best is None else float(self.manager.metrics(best)[select[0]])
    self.pending_step: int | None = None  # the save that may still be writing
    self.failed = False

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore(self, step: int, like: Any) -> Any:
    """Restores `step` into the structure, shapes, dtypes and shardings of `like` (arrays or
    jax.ShapeDtypeStructs); orbax reshards whatever topology wrote it."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def best_step(self) -> int | None:
    """The selected checkpoint's step (after the pending save completes); None without
    selection or before any evaluated checkpoint."""
    if self.select is None:
      return None
    self.wait()
    return best_step(self.manager, *self.select)

  def improves(self, value: float) -> bool:
    """Whether a checkpoint with validation `value` of the selected metric would become the
    best (ties go to the later step, as orbax keeps them)."""
    if self.best_value is None:
      return True
    return value >= self.best_value if self.select[1] == 'max' else value <= self.best_value

  def save(self, step: int, state: Any, metrics: dict[str, float] | None = None) -> None:
    """Starts writing `step` in the background, once the previous save is complete; `metrics`
    (the validation metrics of this step) rank it for selection."""
    self.wait()
    self.pending_step = step
    self._guarded(lambda: self.manager.save(step, args=ocp.args.StandardSave(state),
                                            metrics=metrics, force=True))
    if self.select and metrics is not None and self.improves(metrics[self.select[0]]):
      self.best_value = float(metrics[self.select[0]])

  def wait(self) -> None:
    """Returns when the last save is complete on disk."""
    self._guarded(self.manager.wait_until_finished)
    self.pending_step = None

  def close(self) -> None:
    if not self.failed:  # after a failed write there is nothing left to wait for
      self.wait()
      self.manager.close()

  def _guarded(self, write) -> None:
    try:
      write()
    except Exception as e:  # noqa: BLE001 (OSError, or tensorstore's ValueError naming errno)
      failed, self.failed = self.pending_step, True
      _drop_orbax_noise()  # the writer threads' own reports of this failure
      try:
        self.manager.close()  # joins the writer threads
      except Exception:  # noqa: BLE001, S110 (they failed already; the error below says so)
        pass
      self._remove_partial()
      if not os.path.isdir(self.directory):
        raise CheckpointWriteError(
            f'could not write the checkpoint of step {failed}: the directory {self.directory} '
            'no longer exists (removed during the run?), so no checkpoint is kept; rerun the '
            'same command to start again') from None
      kept = ', '.join(str(s) for s in sorted(step_names(self.directory))) or 'none'
      raise CheckpointWriteError(
          f'could not write the checkpoint of step {failed} in {self.directory}: {e}. '
          f'Complete checkpoints kept: {kept}; free space and rerun the same command to '
          'resume') from None

  def _remove_partial(self) -> None:
    if jax.process_index() != 0 or not os.path.isdir(self.directory):
      return
    for name in os.listdir(self.directory):
      if TMP_SUFFIX in name:
        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
