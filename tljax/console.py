"""What a run shows on the terminal, and where the rest of what it says goes.

The terminal gets the run's own lines (the group table, evaluations, the outcome), WARNING or
worse from any library, and one progress line: a tqdm bar rewritten in place on a terminal, a
plain line every `every_s` seconds otherwise (a log file, a batch job). Library INFO logs
(orbax's checkpointing, clu's metric writer, JAX, TensorFlow's start-up notices) go to the
workdir's `train.log`: not lost, not in the way. `--verbosity=0` or higher on the command line
shows them on the terminal too, as absl does by default.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import statistics
import sys
import time
from collections.abc import Mapping
from typing import IO

from absl import logging as absl_logging

from tljax.workdir import LOG_FILE

_HELD_RECORDS = 20_000  # library log records held in memory until the workdir may be written


def log_file_name(process_index: int) -> str:
  """`train.log` for process 0; `train.<i>.log` for the others of a multi-process job."""
  return LOG_FILE if process_index == 0 else f'train.{process_index}.log'


# The lowest level of library records the terminal shows; None: the absl logger's own level
# (what --verbosity set). The CLI sets WARNING unless --verbosity is given.
_terminal_level: int | None = None
_active_bars: list = []  # tqdm bars being drawn: a line for the terminal goes above them


def quiet_terminal(verbosity_given: bool) -> None:
  """The CLI's terminal shows WARNING and worse from libraries, unless `--verbosity` was given
  (then its level stands, -1 as well as 0 or more)."""
  global _terminal_level
  if not verbosity_given:
    _terminal_level = logging.WARNING
    absl_logging.get_absl_handler().setLevel(logging.WARNING)


class _LogFile(logging.StreamHandler):
  """The workdir's log file. A write that fails (a full disk) is dropped without the traceback
  `logging` would print: the run's own error line names the disk, and a log is not worth more
  lines on the terminal than the failure itself."""

  def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
    del record


class _ToTerminal(logging.Handler):
  """Hands the absl records the terminal should show (its level and worse) to the root
  logger's handlers, as propagation would, with any progress bar cleared around them."""

  def __init__(self, level: int, skip: list[logging.Handler]):
    super().__init__(level)
    self.skip = skip

  def emit(self, record: logging.LogRecord) -> None:
    handlers = [h for h in logging.getLogger().handlers
                if h not in self.skip and record.levelno >= h.level]
    if not handlers:
      return
    if _active_bars:
      from tqdm import tqdm
      with tqdm.external_write_mode(file=sys.stderr):
        for handler in handlers:
          handler.handle(record)
    else:
      for handler in handlers:
        handler.handle(record)


class _OrbaxNoise(logging.Filter):
  """Orbax warns on every checkpoint saved without metrics when a best-checkpoint rule is set;
  tljax saves periodic ones that way on purpose. Kept in the log, at INFO."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno == logging.WARNING and 'did not provide metrics' in str(record.msg):
      record.levelno, record.levelname = logging.INFO, 'INFO'
    return True


class RunLog:
  """Library log records of one run: held in memory while the run is checked (nothing may be
  written then), appended to the workdir's log file once `open` is called. absl's records
  (orbax, clu) are taken off the terminal: INFO goes to the file only, and the terminal sees
  what it saw before (WARNING and worse by default). A context manager; on exit the logging
  set-up is as it was."""

  def __init__(self) -> None:
    self.root = logging.getLogger()
    self.absl = logging.getLogger('absl')
    self.held = logging.handlers.MemoryHandler(_HELD_RECORDS, flushLevel=logging.CRITICAL + 1)
    self.held.setLevel(logging.INFO)
    self.file: logging.Handler | None = None
    self.terminal: logging.Handler | None = None
    self.absl_level, self.absl_propagate = self.absl.level, self.absl.propagate
    self.noise = _OrbaxNoise()
    self.path: str | None = None
    self.ours: list[logging.Handler] = [self.held]
    self.forward: _ToTerminal | None = None

  def __enter__(self) -> RunLog:
    if not self.root.handlers:  # Python API without logging set up: warnings stay visible
      self.terminal = logging.StreamHandler(sys.stderr)
      self.terminal.setLevel(logging.WARNING)
      self.root.addHandler(self.terminal)
    shown = _terminal_level if _terminal_level is not None else self.absl.getEffectiveLevel()
    self.forward = _ToTerminal(max(shown, logging.INFO), self.ours)
    self.absl.setLevel(min(self.absl.getEffectiveLevel(), logging.INFO))
    self.absl.propagate = False
    self.absl.addFilter(self.noise)
    for logger in (self.root, self.absl):
      logger.addHandler(self.held)
    self.absl.addHandler(self.forward)
    return self

  def open(self, path: str) -> None:
    """Appends the held records and every later one to `path` (a link there is refused)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)
    handler = _LogFile(os.fdopen(fd, 'a', encoding='utf-8'))
    handler.setFormatter(logging.Formatter(
        '%(asctime)s %(levelname).1s %(name)s %(filename)s:%(lineno)d] %(message)s'))
    handler.setLevel(logging.INFO)
    self.held.setTarget(handler)
    self.held.flush()
    for logger in (self.root, self.absl):
      logger.removeHandler(self.held)
      logger.addHandler(handler)
    self.ours.append(handler)
    self.file, self.path = handler, path
    tf_quiet = sys.modules.get('tljax.data.tf_quiet')
    for text in getattr(tf_quiet, 'NATIVE_OUTPUT', ()):
      logging.getLogger('tensorflow').info('%s', text)

  def __exit__(self, *exc: object) -> None:
    for logger in (self.root, self.absl):
      for handler in (self.held, self.file):
        logger.removeHandler(handler)
    self.absl.removeHandler(self.forward)
    self.absl.removeFilter(self.noise)
    self.held.setTarget(None)
    self.held.close()
    for handler in (self.file, self.terminal):
      if handler is not None:
        self.root.removeHandler(handler)
        handler.close()
    self.absl.setLevel(self.absl_level)
    self.absl.propagate = self.absl_propagate


class TolerantStream:
  """stdout or stderr that stops writing, without a traceback, once the reader is gone (a
  closed pipe: `... | head`) or the device is full: losing the run's lines must not stop it."""

  def __init__(self, stream: IO[str]):
    self.stream, self.broken = stream, False

  def write(self, text: str) -> int:
    if not self.broken:
      try:
        return self.stream.write(text)
      except OSError:
        self.broken = True
    return len(text)

  def flush(self) -> None:
    if not self.broken:
      try:
        self.stream.flush()
      except OSError:
        self.broken = True

  def __getattr__(self, name: str):
    return getattr(self.stream, name)


def tolerate_lost_output() -> None:
  """The CLI's stdout and stderr as TolerantStreams."""
  for name in ('stdout', 'stderr'):
    stream = getattr(sys, name)
    if stream is not None and not isinstance(stream, TolerantStream):
      setattr(sys, name, TolerantStream(stream))


def duration(seconds: float | None) -> str:
  """h:mm:ss or m:ss; '?' when unknown."""
  if seconds is None or seconds == float('inf'):
    return '?'
  minutes, secs = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f'{hours}:{minutes:02d}:{secs:02d}' if hours else f'{minutes}:{secs:02d}'


class Progress:
  """Steps, steps/s and the time left, from step times measured after compilation (the first
  step of a process compiles; its time says nothing about the rest)."""

  def __init__(self, total_steps: int, start_step: int, stream: IO[str] | None = None,
               every_s: float = 30.0, enabled: bool = True):
    self.total, self.start = total_steps, start_step
    self.stream = stream or sys.stderr
    self.every_s = every_s
    self.enabled = enabled
    self.tty = enabled and _isatty(self.stream) and _columns(self.stream) > 0
    self.compiled_at: tuple[int, float] | None = None  # (step, time) after the first step
    self.intervals: list[float] = []  # seconds per step of each update since compilation
    self.last: tuple[int, float] | None = None
    self.last_print = time.monotonic()
    self.bar = None
    if self.tty:
      from tqdm import tqdm
      self.bar = tqdm(total=total_steps, initial=start_step, file=self.stream, unit='step',
                      dynamic_ncols=True, leave=True, mininterval=0.2,
                      bar_format='{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} '
                                 '[{elapsed}{postfix}]')
      self.bar.set_postfix_str('compiling', refresh=True)
      _active_bars.append(self.bar)

  def compiled(self, step: int, seconds: float) -> None:
    """The first step of this process (compilation included) finished after `seconds`."""
    now = time.monotonic()
    self.compiled_at = self.last = (step, now)
    self._show(step, f'first step (compilation) {seconds:.1f} s', force=True)

  def update(self, step: int, values: Mapping[str, float] | None = None) -> None:
    now = time.monotonic()
    if self.last is not None and step > self.last[0]:
      self.intervals.append((now - self.last[1]) / (step - self.last[0]))
    self.last = (step, now)
    shown = ' '.join(f'{k}={v:.4g}' for k, v in (values or {}).items())
    rate = self.steps_per_second()
    speed = f'{rate:.2f} steps/s' if rate else '? steps/s'
    self._show(step, f'{speed}, ETA {duration(self.eta(step))} {shown}'.rstrip(),
               force=step >= self.total)

  def steps_per_second(self) -> float | None:
    """Since compilation, wall time included (evaluations and checkpoints are part of a run)."""
    if self.compiled_at is None or self.last is None or self.last[0] <= self.compiled_at[0]:
      return None
    return (self.last[0] - self.compiled_at[0]) / max(self.last[1] - self.compiled_at[1], 1e-9)

  def eta(self, step: int) -> float | None:
    rate = self.steps_per_second()
    return None if rate is None else (self.total - step) / rate

  def median_step_seconds(self) -> float | None:
    return statistics.median(self.intervals) if self.intervals else None

  def write(self, line: str) -> None:
    """A line of the run's own, above the bar."""
    if self.bar is not None:  # cleared, the line written to stdout, the bar drawn again
      self.bar.write(line, file=sys.stdout)
      sys.stdout.flush()
    else:
      print(line, flush=True)

  def _show(self, step: int, text: str, force: bool = False) -> None:
    if not self.enabled:
      return
    if self.bar is not None:
      self.bar.set_postfix_str(text, refresh=False)
      self.bar.update(step - self.bar.n)
      if force:
        self.bar.refresh()
      return
    now = time.monotonic()
    if force or now - self.last_print >= self.every_s:
      self.stream.write(f'step {step}/{self.total}  {text}\n')
      self.stream.flush()
      self.last_print = now

  def close(self) -> None:
    if self.bar is not None:
      if self.bar in _active_bars:
        _active_bars.remove(self.bar)
      self.bar.close()
      self.bar = None


def bar_active() -> bool:
  """Whether a progress bar is drawn now (a message for the terminal starts a new line)."""
  return bool(_active_bars)


def _columns(stream: IO[str]) -> int:
  """The terminal's width; 0 when it reports none (a bar would not show at all)."""
  try:
    return os.get_terminal_size(stream.fileno()).columns
  except (AttributeError, ValueError, OSError):
    return 0


def _isatty(stream: IO[str]) -> bool:
  try:
    return stream.isatty()
  except (AttributeError, ValueError):
    return False
