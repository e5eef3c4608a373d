"""Preemption: SIGTERM (what TPU VMs and SLURM send) asks the run to stop after its current step.

One process: a Python handler records the signal. Several processes joined by jax.distributed:
JAX's preemption service already listens for SIGTERM on every process and agrees on one step at
which all of them stop, so the checkpoint they write together is consistent.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import jax
from jax.experimental import multihost_utils


class PreemptionWatch:
  """`reached(step)` says whether to stop after `step`; use as a context manager."""

  def __init__(self):
    self.signalled = False
    self._previous = None
    self.distributed = jax.process_count() > 1

  def __enter__(self) -> PreemptionWatch:
    if not self.distributed and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _handle(self, signum: int, frame: FrameType | None) -> None:
    self.signalled = True

  def reached(self, step: int) -> bool:
    """Called after every step on every process (the distributed protocol needs each step)."""
    if self.distributed:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.signalled
