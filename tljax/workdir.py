"""The workdir as a resumable record: locked by one run, checked before anything is written,
files replaced whole.

A run writes nothing until its config, data, weights and the workdir's own files have been
checked, so bad input leaves an existing workdir as it was. Resuming needs the config the
checkpoints were written with: keys that change what the state means or how it evolves must
match; a few (how long to train, how often to log, where the data lives) may change between runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from typing import Any

from flax import traverse_util

from tljax.errors import TrainingFailed, UserError

CONFIG_FILE = 'config.json'
RESULTS_FILE = 'results.json'
METRICS_FILE = 'metrics.jsonl'
LOG_FILE = 'train.log'  # library INFO logs of process 0 (tljax.console); train.<i>.log of others
LOCK_FILE = '.tljax-lock'  # exists while a run holds the workdir; names the holder
# Keys a resumed run may change without invalidating its checkpoints.
RESUMABLE_CHANGES = (
    'total_steps', 'total_epochs', 'optim.schedule.steps', 'log_every', 'eval_every',
    'checkpoint_every', 'keep_checkpoints', 'parallel', 'data.path', 'data.data_dir',
    'data.cache_decoded',    'data.eval_batch_size', 'data.skip_corrupt_images',
    # Layout only: checkpoints are resharded on restore.
    'sharding.rule', 'sharding.min_size_mb', 'sharding.model_axis',
)
RUN_FILES = (CONFIG_FILE, 'model.json', 'checkpoints', 'checkpoints-damaged', METRICS_FILE,
             RESULTS_FILE, 'confusion_test.png', LOG_FILE)


def _is_log_file(name: str) -> bool:
  return name == LOG_FILE or re.fullmatch(r'train\.\d+\.log', name) is not None


class WorkdirError(UserError):
  """A workdir that cannot be written, or holds checkpoints of another config."""


def check_directory(workdir: str) -> None:
  """Refuses a --workdir that exists but is not a directory (a file, a link to one, or a
  dangling link), naming what it is."""
  if os.path.lexists(workdir) and not os.path.isdir(workdir):
    kind = ('a dangling symbolic link' if not os.path.exists(workdir) else
            'a link to a file' if os.path.islink(workdir) else 'a file')
    raise WorkdirError(f'workdir {workdir!r} is {kind}, not a directory; use another --workdir')


def check_writable(workdir: str) -> None:
  """Creates `workdir` if needed and proves a file can be written in it (and in checkpoints/)."""
  check_directory(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f'workdir {workdir!r} cannot be created: {e.strerror or e}') from None
  for directory in (workdir, os.path.join(workdir, 'checkpoints')):
    try:
      if os.path.isdir(directory):
        with tempfile.TemporaryFile(dir=directory):
          pass
    except OSError as e:
      what = 'workdir' if directory == workdir else 'checkpoint directory'
      raise WorkdirError(f'{what} {directory!r} is not writable: {e.strerror or e}') from None


def write_json(path: str, value: Any) -> None:
  """Writes to a temporary file and renames it, so a killed process never leaves half a file."""
  tmp = f'{path}.tmp'
  try:
    if os.path.lexists(tmp):  # left by a killed run, or planted: never written through
      if os.path.isdir(tmp) and not os.path.islink(tmp):
        raise WorkdirError(f'{tmp} is a directory where a temporary file goes; move it away '
                           'and run the same command again')
      os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, 'w') as f:
      f.write(value if isinstance(value, str) else json.dumps(value, indent=2))
    os.replace(tmp, path)
  except OSError as e:  # a full disk or quota: the earlier file, if any, is still whole
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise TrainingFailed(f'could not write {path}: {e.strerror or e}; free space and run the '
                         'same command again') from None


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any],
                       allowed: tuple[str, ...] = (),
                       defaults: Mapping[str, Any] | None = None) -> list[str]:
  """`key: saved -> current` for every dotted key whose value differs, except `allowed`. A key
  the saved config lacks (added to tljax since) counts as its value in `defaults`."""
  default = traverse_util.flatten_dict(dict(defaults or {}), sep='.')
  old = {**default, **traverse_util.flatten_dict(dict(saved), sep='.')}
  new = traverse_util.flatten_dict(dict(current), sep='.')
  return [f'{key}: {old.get(key, "<unset>")!r} -> {new.get(key, "<unset>")!r}'
          for key in sorted(old.keys() | new.keys())
          if old.get(key) != new.get(key) and key not in allowed]


def saved_config(workdir: str) -> dict[str, Any] | None:
  """The config.json an earlier run wrote in `workdir`, or None if there is none."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    return None
  try:
    return _read_json_object(path)
  except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
    raise WorkdirError(f'{path}: cannot read the config of the earlier run in {workdir} '
                       f'({e}); pass --fresh to start over') from None


def _read_json_object(path: str) -> dict[str, Any]:
  """The JSON object in `path`; ValueError if it holds anything else."""
  with open(path, encoding='utf-8') as f:
    value = json.load(f)
  if not isinstance(value, dict):
    raise ValueError(f'a JSON {type(value).__name__}, not an object')
  return value


def check_resumable(workdir: str, config_json: str, defaults_json: str) -> None:
  """Refuses to resume checkpoints written under a config that differs in a key that matters
  (`defaults_json`: every key's default, for keys older runs did not have)."""
  saved = saved_config(workdir)
  if saved is None:
    return  # checkpoints without a config (written by hand): nothing to compare against
  differences = config_differences(saved, json.loads(config_json), RESUMABLE_CHANGES,
                                   json.loads(defaults_json))
  if differences:
    raise WorkdirError(
        f'workdir {workdir} holds checkpoints of a different config; refusing to resume. '
        f'Keys that differ (saved -> now): {"; ".join(differences)}. Use another workdir, or '
        'pass --fresh to move the old run aside and start over')


def move_aside(workdir: str) -> str | None:
  """Moves an earlier run's files into `<workdir>/replaced-<time>/` (nothing is deleted);
  returns that folder, or None when there was nothing to move."""
  names = [n for n in os.listdir(workdir)
           if n in RUN_FILES or _is_log_file(n)
           or n.startswith(('events.out.tfevents', 'results-step'))]
  if not names:
    return None
  target = base = os.path.join(workdir, time.strftime('replaced-%Y%m%d-%H%M%S'))
  count = 1
  while os.path.exists(target):
    count += 1
    target = f'{base}-{count}'
  os.makedirs(target)
  for name in names:
    os.replace(os.path.join(workdir, name), os.path.join(target, name))
  return target


def _holder(path: str) -> str:
  """Who holds the lock, as its holder wrote right after taking it (waiting a moment for it)."""
  deadline = time.monotonic() + 2.0
  while True:
    try:
      with open(path) as f:
        text = f.read(500).strip()
    except OSError:
      text = ''
    if text or time.monotonic() > deadline:
      return ' '.join(text.split()) or 'another run'  # one line, whatever the command held
    time.sleep(0.01)


def _try_lock(workdir: str) -> int | None:
  """An fd holding an exclusive lock on the workdir's lock file, or None if another run holds
  it. A lock file removed by its holder between our open and our lock is opened again."""
  path = os.path.join(workdir, LOCK_FILE)
  while True:
    if os.path.islink(path) or (os.path.lexists(path) and not os.path.isfile(path)):
      raise _kind_error(path, 'regular file (a tljax lock file is never a link)')
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)  # never write through
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      return None
    try:
      same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
      same = False
    if same:
      os.ftruncate(fd, 0)
      os.write(fd, (f'pid {os.getpid()} on {socket.gethostname()} since '
                    f'{time.strftime("%Y-%m-%d %H:%M:%S")}: '
                    f'{" ".join(sys.argv)[:300]}').encode())
      return fd
    os.close(fd)


@contextlib.contextmanager
def lock(workdir: str) -> Iterator[None]:
  """Holds the workdir for one run (process 0 locks it for every process of a job); a second
  run is refused with one line naming the holder. The lock file goes when the run ends."""
  import jax
  from jax.experimental import multihost_utils

  fd, path, holder = None, os.path.join(workdir, LOCK_FILE), 'another run'
  if jax.process_index() == 0:
    try:
      fd = _try_lock(workdir)
    except OSError as e:
      raise WorkdirError(f'cannot lock workdir {workdir!r}: {e.strerror or e}') from None
    if fd is None:
      holder = _holder(path)
  locked = fd is not None or jax.process_index() != 0
  if jax.process_count() > 1:  # every process refuses together
    locked = bool(multihost_utils.broadcast_one_to_all(locked))
  if not locked:
    raise WorkdirError(f'workdir {workdir} is in use by {holder}; wait for that run to end, or '
                       'use another --workdir')
  try:
    yield
  finally:
    if fd is not None:
      with contextlib.suppress(OSError):
        os.unlink(path)
      os.close(fd)  # releases the lock


def _kind_error(path: str, expected: str) -> WorkdirError:
  return WorkdirError(f'{path} is not a {expected}; this workdir was damaged or is not a tljax '
                      'workdir. Move it away (or pass --fresh to move the earlier run aside)')


def check_run_files(workdir: str) -> None:
  """The files an earlier run left are what a run reads or appends to: each must be of its
  kind and readable, or the run is refused before it writes anything."""
  logs = [(name, 'file') for name in sorted(os.listdir(workdir)) if _is_log_file(name)]
  for name, kind in ((CONFIG_FILE, 'file'), (RESULTS_FILE, 'file'), (METRICS_FILE, 'file'),
                     ('checkpoints', 'directory'), ('checkpoints-damaged', 'directory'), *logs):
    path = os.path.join(workdir, name)
    if not os.path.lexists(path):
      continue
    if os.path.islink(path):  # a run writes and appends here: never through a link
      raise _kind_error(path, f'{kind} but a symbolic link')
    try:
      mode = os.stat(path).st_mode
    except OSError as e:
      raise WorkdirError(f'{path}: {e.strerror or e}; move it away') from None
    if not (stat.S_ISDIR(mode) if kind == 'directory' else stat.S_ISREG(mode)):
      raise _kind_error(path, 'directory' if kind == 'directory' else 'regular file')
    if _is_log_file(name) and not os.access(path, os.W_OK):  # appended to
      raise WorkdirError(f'{path} is not writable: the run appends its log there; make it '
                         'writable or move it away')
  _check_metrics_file(os.path.join(workdir, METRICS_FILE))
  read_results(workdir)
  saved_config(workdir)


def _check_metrics_file(path: str) -> None:
  """metrics.jsonl must be UTF-8 JSON lines; only its last line may be cut short (a process
  killed while writing it)."""
  if not os.path.exists(path):
    return
  try:
    with open(path, 'rb') as f:
      lines = f.read().split(b'\n')
  except OSError as e:
    raise WorkdirError(f'{path}: {e.strerror or e}') from None
  for number, raw in enumerate(lines[:-1], 1):  # every line ended by a newline
    try:
      record = json.loads(raw.decode('utf-8'))
      if not isinstance(record, dict) or type(record.get('step')) is not int:  # not a bool
        raise ValueError('not a {"step": ...} record')
    except (UnicodeDecodeError, ValueError) as e:
      raise WorkdirError(f'{path}:{number} is damaged ({type(e).__name__}: {str(e)[:80]}); '
                         'repair or move the file away, or pass --fresh to move the earlier '
                         'run aside') from None


def read_results(workdir: str) -> dict[str, Any] | None:
  """The results.json a finished run wrote, or None; a damaged one is an error naming it."""
  path = os.path.join(workdir, RESULTS_FILE)
  if not os.path.exists(path):
    return None
  try:
    results = _read_json_object(path)
    if type(results.get('final_step')) is not int or results['final_step'] < 1:
      raise ValueError('no final_step of at least 1')
  except (OSError, UnicodeDecodeError, ValueError) as e:
    raise WorkdirError(f'{path} is damaged ({type(e).__name__}: {str(e)[:80]}); move it away '
                       'and run the same command to write it again from the final '
                       'checkpoint') from None
  return results


def keep_earlier_results(workdir: str) -> str | None:
  """A run extended past an earlier finish keeps the earlier results.json as
  results-step<N>.json (N its final step) instead of overwriting it later; returns that path."""
  results = read_results(workdir)
  if results is None:
    return None
  target = base = os.path.join(workdir, f'results-step{results["final_step"]}')
  count = 1
  while os.path.lexists(f'{target}.json'):  # the same step finished twice: keep both
    count += 1
    target = f'{base}-{count}'
  os.replace(os.path.join(workdir, RESULTS_FILE), f'{target}.json')
  return f'{target}.json'


def check_new_file(path: str, option: str, force: bool) -> None:
  """Refuses an output file (named by the command-line `option`) that is a directory, would
  replace a file without --force, or lies in a folder that does not exist or cannot be
  written; before anything is computed."""
  if os.path.isdir(path):
    raise UserError(f'{option} {path} is a directory; name a file')
  if os.path.lexists(path) and not force:
    raise UserError(f'{option} {path} exists; pass --force to replace it, or name another file')
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(parent):
    raise UserError(f'{option} {path}: the folder {parent} does not exist')
  if not os.access(parent, os.W_OK):
    raise UserError(f'{option} {path}: the folder {parent} is not writable')
