"""The workdir as a resumable record: checked before anything is written, files replaced whole.

A run writes nothing until its config, data and weights have been checked, so bad input leaves
an existing workdir as it was. Resuming needs the config the checkpoints were written with:
keys that change what the state means or how it evolves must match; a few (how long to train,
how often to log, where the data lives) may change between runs.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping
from typing import Any

from flax import traverse_util

from tljax.errors import UserError

CONFIG_FILE = 'config.json'
# Keys a resumed run may change without invalidating its checkpoints.
RESUMABLE_CHANGES = (
    'total_steps', 'total_epochs', 'log_every', 'eval_every', 'checkpoint_every',
    'keep_checkpoints', 'parallel', 'data.path', 'data.data_dir', 'data.cache_decoded',
    'data.eval_batch_size', 'data.skip_corrupt_images',
    # Layout only: checkpoints are resharded on restore.
    'sharding.rule', 'sharding.min_size_mb', 'sharding.model_axis',
)
RUN_FILES = (CONFIG_FILE, 'checkpoints', 'metrics.jsonl', 'results.json')


class WorkdirError(UserError):
  """A workdir that cannot be written, or holds checkpoints of another config."""


def check_writable(workdir: str) -> None:
  """Creates `workdir` if needed and proves a file can be written in it (and in checkpoints/)."""
  try:
    os.makedirs(workdir, exist_ok=True)
    for directory in (workdir, os.path.join(workdir, 'checkpoints')):
      if os.path.isdir(directory):
        with tempfile.TemporaryFile(dir=directory):
          pass
  except OSError as e:
    raise WorkdirError(f'workdir {workdir!r} is not writable: {e.strerror or e}') from None


def write_json(path: str, value: Any) -> None:
  """Writes to a temporary file and renames it, so a killed process never leaves half a file."""
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    f.write(value if isinstance(value, str) else json.dumps(value, indent=2))
  os.replace(tmp, path)


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
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise WorkdirError(f'{path}: cannot read the config of the earlier run in {workdir} '
                       f'({e}); pass --fresh to start over') from None


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
           if n in RUN_FILES or n.startswith('events.out.tfevents')]
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
