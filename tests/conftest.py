"""Test set-up: 8 simulated CPU devices (set before JAX's backend starts), then the fixtures.
Plain helpers the test files share are in helpers.py."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)
# The many small runs compile the same programs again and again: a persistent compilation
# cache, new for each session (nothing carried over from an earlier one), compiles each once.
# Open to every user: some tests run as `nobody`.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

_XLA_CACHE = tempfile.mkdtemp(prefix='tljax-tests-xla-')
os.chmod(_XLA_CACHE, 0o777)
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
jax.config.update('jax_compilation_cache_dir', _XLA_CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)

import pytest  # noqa: E402
from helpers import finished_run, write_npz  # noqa: E402


@pytest.fixture
def npz_path(tmp_path):
  """An .npz with train/test splits, for subprocess runs that cannot share in-memory arrays."""
  return write_npz(tmp_path / 'data.npz')


@pytest.fixture(scope='session')
def earlier_run(tmp_path_factory):
  """A finished 6-step run of `small_config` (checkpoints 3 and 6) and the npz it trained on,
  shared by every test that must leave it as it is (or copies it first)."""
  return finished_run(tmp_path_factory.mktemp('earlier'))
