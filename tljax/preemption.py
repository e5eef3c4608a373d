"""Stop requests: SIGTERM (what TPU VMs and SLURM send) and SIGINT (Ctrl-C) ask a run to stop.

A request never kills the process where it stands. Before the first write the run exits at once
(nothing needed saving); in the training loop it finishes the current step, saves a checkpoint
and exits 75. A second SIGTERM changes nothing; a second Ctrl-C aborts without saving (exit 130),
keeping the checkpoints already complete.

One process: Python handlers record the request. Several processes joined by jax.distributed:
JAX's preemption service listens for SIGTERM on every process and agrees on one step at which all
of them stop, so the checkpoint they write together is consistent; Ctrl-C is passed to it as a
SIGTERM. The CLIs call `install_early()` first thing, so a signal during imports and start-up is
recorded instead of killing the process.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

from tljax.errors import Preempted

ABORT_EXIT_CODE = 130  # 128 + SIGINT, what shells report for Ctrl-C
# Asking a run to stop: SIGTERM (TPU VMs, SLURM, docker stop), SIGINT (Ctrl-C), SIGHUP (the
# terminal closed) and SIGUSR1/SIGUSR2 (SLURM's --signal before a time limit, by convention).
# Their default action would kill the process mid-step, or mid-save.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
_early_requests: list[str] = []  # signals recorded by the start-up handlers
_cli = False  # set by install_early: a second Ctrl-C ends the process instead of raising


def _is_main_thread() -> bool:
  return threading.current_thread() is threading.main_thread()


def _abort(name: str) -> None:
  console = sys.modules.get('tljax.console')
  if console is not None and console.bar_active():  # end the bar's line first
    sys.stderr.write('\n')
  sys.stderr.write(f'error: {name} again: stopped at once without saving; the checkpoints '
                   'already complete are kept\n')
  sys.stderr.flush()
  os._exit(ABORT_EXIT_CODE)


def _early_handler(signum: int, frame: FrameType | None) -> None:
  name = signal.Signals(signum).name
  if signum == signal.SIGINT and 'SIGINT' in _early_requests:
    _abort(name)
  _early_requests.append(name)


def install_early() -> None:
  """Records the stop signals from now on (CLI start-up); `StopRequests` takes them over."""
  global _cli
  _cli = True
  if _is_main_thread():
    for signum in STOP_SIGNALS:
      signal.signal(signum, _early_handler)


def ignore_from_now() -> None:
  """Ignores the stop signals while the process exits: Python restores their default actions
  during shutdown, which would turn a late signal into death by signal after a clean finish."""
  if _is_main_thread():
    for signum in STOP_SIGNALS:
      signal.signal(signum, signal.SIG_IGN)


def requested_early() -> str | None:
  """The first signal recorded during start-up, if any."""
  return _early_requests[0] if _early_requests else None


class StopRequests:
  """The run's view of stop requests; use as a context manager around a whole run."""

  def __init__(self):
    import jax
    self.distributed = jax.process_count() > 1
    self.requested: str | None = requested_early()
    self.interrupts = _early_requests.count('SIGINT')
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> StopRequests:
    if _is_main_thread():
      signals = [s for s in STOP_SIGNALS if s != signal.SIGTERM or not self.distributed]
      for signum in signals:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous.clear()

  def _handle(self, signum: int, frame: FrameType | None) -> None:
    name = signal.Signals(signum).name
    if signum == signal.SIGINT:
      self.interrupts += 1
      if self.interrupts > 1:  # the second Ctrl-C (a SIGTERM before it does not count)
        if _cli:  # like a SIGKILL: a half-written checkpoint is removed on the next start
          _abort(name)
        raise KeyboardInterrupt(f'{name} again')  # in a notebook: stop, keep the kernel
    self.requested = self.requested or name
    if self.distributed and signum != signal.SIGTERM:
      os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption service

  def check(self, where: str) -> None:
    """Before the training loop: stop now if asked (nothing needs saving yet)."""
    if self.requested and not self.distributed:
      raise Preempted(None, f'stopped by {self.requested} {where}; nothing needed saving. Run '
                            'the same command to start again')

  def reached(self, step: int) -> bool:
    """Called after every step on every process (the distributed protocol needs each step)."""
    if self.distributed:
      from jax.experimental import multihost_utils
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested is not None
