"""Imports TensorFlow for tf.data only: no GPU/TPU memory taken from JAX, and its start-up
notices (written by its C++ logging straight to file descriptor 2, before any setting can
silence them) sent to the Python log, which a run keeps in its workdir, not on the terminal."""

import contextlib
import os
import sys
import tempfile

# What TensorFlow's native code printed while it was imported; tljax.console puts it in a run's
# log file.
NATIVE_OUTPUT: list[str] = []

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


@contextlib.contextmanager
def _native_stderr_collected(name: str):
  """Collects what native code writes to fd 2 meanwhile into NATIVE_OUTPUT, or gives it back on
  stderr if the block fails (it may say why)."""
  try:
    sys.stderr.flush()
    saved = os.dup(2)
  except (OSError, ValueError):  # no usable fd 2: nothing to collect
    yield
    return
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    failed = True
    try:
      yield
      failed = False
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      text = captured.read().decode(errors='replace')
      if failed:
        sys.stderr.write(text)
      elif text.strip():
        NATIVE_OUTPUT.append(f'{name} start-up output:\n{text.rstrip()}')


with _native_stderr_collected('tensorflow'):
  import tensorflow as tf  # noqa: E402

tf.config.set_visible_devices([], 'GPU')
try:
  tf.config.set_visible_devices([], 'TPU')
except (ValueError, RuntimeError):  # no TPU platform registered in this TF build
  pass
