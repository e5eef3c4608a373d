"""Orbax CheckpointManager in `<workdir>/checkpoints`: periodic saves, keep N, resume latest.

Orbax writes each step into `<step>.orbax-checkpoint-tmp` and renames it when complete, so a
process killed mid-save leaves no checkpoint that `latest_step` would pick, and older checkpoints
are deleted only after a newer one is complete. A save that fails (a full disk) removes its
temporary directory and raises one error naming the step; the complete checkpoints stay.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

from tljax.errors import UserError

TMP_SUFFIX = '.orbax-checkpoint-tmp'


class CheckpointWriteError(UserError):
  """A checkpoint could not be written (disk full, quota, permissions); earlier ones are
  intact."""


def has_checkpoints(workdir: str) -> bool:
  """Whether `workdir` holds at least one complete checkpoint (a step-numbered directory)."""
  directory = os.path.join(workdir, 'checkpoints')
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


class Checkpointer:
  def __init__(self, workdir: str, keep: int = 3):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    # A save cut short by a killed process is deleted here, before anything else runs. (Orbax's
    # cleanup_tmp_directories does it in a background thread that can overlap the data
    # pipeline's start, where tfds.testing.mock_data redirects every file path process-wide.)
    self._remove_partial()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self.pending_step: int | None = None  # the save that may still be writing
    self.failed = False

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore(self, step: int, like: Any) -> Any:
    """Restores `step` into the structure, shapes, dtypes and shardings of `like` (arrays or
    jax.ShapeDtypeStructs); orbax reshards whatever topology wrote it."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def save(self, step: int, state: Any) -> None:
    """Starts writing `step` in the background, once the previous save is complete."""
    self.wait()
    self.pending_step = step
    self._guarded(lambda: self.manager.save(step, args=ocp.args.StandardSave(state),
                                            force=True))

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
      try:
        self.manager.close()  # joins the writer threads
      except Exception:  # noqa: BLE001, S110 (they failed already; the error below says so)
        pass
      self._remove_partial()
      kept = ', '.join(str(s) for s in self.manager.all_steps()) or 'none'
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
