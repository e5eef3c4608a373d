"""tljax and its tests from an environment that is not the checkout's `.venv`: the launch scripts
take the interpreter the caller runs (`$PYTHON`, else the active environment's, else `.venv`)."""

import os
import shutil
import site
import subprocess
import sys

import pytest
from helpers import REPO, write_npz

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def _other_environment(tmp_path):
  """A copy of the checkout (.git too, as a clone) without `.venv`, and a virtual environment
  named `other-env` that sees this one's installed packages (a .pth file) but not its name."""
  checkout = tmp_path / 'checkout'
  shutil.copytree(REPO, checkout, ignore=shutil.ignore_patterns(
      '.venv', 'workdirs', '__pycache__', '.pytest_cache', '.ruff_cache'))
  env_dir = tmp_path / 'other-env'
  subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(env_dir)], check=True)
  packages = site.getsitepackages()[0]
  version = f'python{sys.version_info.major}.{sys.version_info.minor}'
  (env_dir / 'lib' / version / 'site-packages' / 'shared.pth').write_text(
      f'import site; site.addsitedir({packages!r})\n')
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHON', 'PYTHONPATH', 'CONDA_PREFIX')}
  env.update(VIRTUAL_ENV=str(env_dir), PYTHONPATH=str(checkout), JAX_PLATFORMS='cpu',
             PATH=f'{env_dir / "bin"}{os.pathsep}{os.environ["PATH"]}')
  return checkout, env_dir, env


def test_launch_scripts_and_tests_run_from_a_venv_not_named_dot_venv(tmp_path):
  checkout, env_dir, env = _other_environment(tmp_path)
  assert not (checkout / '.venv').exists()
  python = str(env_dir / 'bin' / 'python')
  where = subprocess.run([python, '-c', 'import tljax; print(tljax.__file__)'], env=env,
                         capture_output=True, text=True, check=True, cwd=checkout).stdout
  assert where.startswith(str(checkout)), where  # this checkout's code, that env's python
  # The launch scripts, with no $PYTHON: the active environment's interpreter.
  data = write_npz(tmp_path / 'data.npz')
  result = subprocess.run(
      ['bash', 'launch/local.sh', 'configs/tests/arrays.py', str(tmp_path / 'local'),
       f'--config.data.path={data}'], cwd=checkout, env=env, capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (tmp_path / 'local' / 'results.json').exists()
  result = subprocess.run(
      ['bash', 'launch/multiprocess.sh', '2', 'configs/tests/arrays.py', str(tmp_path / 'two'),
       f'--config.data.path={data}'], cwd=checkout, env={**env, 'DEVICES_PER_PROCESS': '2'},
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert (tmp_path / 'two' / 'results.json').exists()
  # The tests that drive the launch scripts, run by that environment's pytest.
  result = subprocess.run(
      [python, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', 'tests/test_launch.py'],
      cwd=checkout, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-3000:]
  assert ' passed' in result.stdout and 'failed' not in result.stdout
