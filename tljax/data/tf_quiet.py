"""Imports TensorFlow for tf.data only: no GPU/TPU memory taken from JAX, and its start-up
notices (written by its C++ logging straight to file descriptor 2, before any setting can
silence them) sent to the Python log, which a run keeps in its workdir, not on the terminal."""

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator

# What TensorFlow's native code printed while it was imported; tljax.console puts it in a run's
# log file.
NATIVE_OUTPUT: list[str] = []

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


@contextlib.contextmanager
def native_stderr_collected() -> Iterator[list[str]]:
  """Collects what native code writes to fd 2 meanwhile: the yielded list holds the text once
  the block ends (the caller decides whether to show it)."""
  collected: list[str] = []
  try:
    if sys.stderr is not None:
      sys.stderr.flush()
    saved = os.dup(2)
  except (OSError, ValueError):  # no usable fd 2: nothing to collect
    yield collected
    return
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield collected
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      collected.append(captured.read().decode(errors='replace'))


try:
  with native_stderr_collected() as _startup:
    import tensorflow as tf  # noqa: E402
except BaseException:
  if sys.stderr is not None:
    sys.stderr.write(''.join(_startup))  # it may say why the import failed
  raise
NATIVE_OUTPUT.extend(f'tensorflow start-up output:\n{text.rstrip()}' for text in _startup
                     if text.strip())
tf.config.set_visible_devices([], 'GPU')
try:
  tf.config.set_visible_devices([], 'TPU')
except (ValueError, RuntimeError):  # no TPU platform registered in this TF build
  pass
