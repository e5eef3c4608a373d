"""Where metrics go: TensorBoard (clu metric writers) and metrics.jsonl (the terminal's progress
line is tljax.console's).

Only process 0 writes files; every process may print.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

# isort: off
from tljax.data import tf_quiet  # noqa: F401  (first: clu imports TensorFlow)
from clu import metric_writers
# isort: on

from tljax.errors import TrainingFailed

METRICS_FILE = 'metrics.jsonl'
EVENTS_PREFIX = 'events.out.tfevents.'


class MetricsLog:
  """metrics.jsonl (one JSON object per logged step and split) plus TensorBoard events."""

  def __init__(self, workdir: str, is_main: bool = True, resume_step: int = 0):
    self.is_main = is_main
    self.path = os.path.join(workdir, METRICS_FILE)
    if is_main:  # before the writer opens a new events file
      _drop_after(self.path, resume_step)
      for name in sorted(os.listdir(workdir)):
        if name.startswith(EVENTS_PREFIX):
          _drop_events_after(os.path.join(workdir, name), resume_step)
    self.writer = metric_writers.create_default_writer(
        workdir, just_logging=not is_main, asynchronous=False)

  def write(self, step: int, split: str, values: Mapping[str, float]) -> None:
    self.writer.write_scalars(step, {f'{split}/{k}': v for k, v in values.items()})
    if self.is_main:
      try:
        with open(self.path, 'a') as f:
          f.write(json.dumps({'step': step, 'split': split, **values}) + '\n')
      except OSError as e:  # a line cut short is dropped when the run resumes
        raise TrainingFailed(f'could not write {self.path}: {e.strerror or e}; free space and run '
                        'the same command again to resume') from None

  def close(self) -> None:
    self.writer.flush()
    self.writer.close()


def _logged_step(line: str) -> int | None:
  """The step of a complete metrics line; None for a line cut short by a killed process."""
  try:
    return json.loads(line)['step']
  except (ValueError, KeyError, TypeError):
    return None


def _drop_after(path: str, step: int) -> None:
  """On resume, forget lines logged after the restored checkpoint (they will be redone), and
  a last line a killed process left unfinished."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    steps = [(line, _logged_step(line)) for line in f if line.endswith('\n')]
  lines = [line for line, logged in steps if logged is not None and logged <= step]
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.writelines(lines)
  os.replace(tmp, path)


def _drop_events_after(path: str, step: int) -> None:
  """On resume, TensorBoard events of steps after the restored checkpoint (they will be
  logged again: one point per step, not two), and a record cut short by a killed process."""
  tf = tf_quiet.tf
  kept, dropped = [], False
  try:
    for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
      event = tf.compat.v1.Event.FromString(record)
      if event.HasField('summary') and event.step > step:
        dropped = True
      else:
        kept.append(record)
  except (tf.errors.DataLossError, tf.errors.OutOfRangeError):  # cut short: keep what is whole
    dropped = True
  if not dropped:
    return
  tmp = os.path.join(os.path.dirname(path), '.tljax-events.tmp')  # not a name TensorBoard reads
  with tf.io.TFRecordWriter(tmp) as writer:
    for record in kept:
      writer.write(record)
  os.replace(tmp, path)
