"""Bad input gets one clear error line naming the culprit, not a traceback."""

import subprocess
import sys

import pytest
from conftest import REPO, small_config

from tljax import train
from tljax.config import ConfigError
from tljax.errors import UserError
from tljax.freeze import FreezeError


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'tljax.train',
                         f'--config={REPO}/configs/tests/arrays.py', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def test_misspelt_override_names_the_key(tmp_path):
  result = _cli(f'--workdir={tmp_path}', '--config.optim.lrr=0.1')
  assert result.returncode != 0
  assert 'lrr' in result.stderr and 'Traceback' not in result.stderr


def test_user_error_is_one_line_without_traceback(tmp_path, npz_path):
  result = _cli(f'--workdir={tmp_path}', f'--config.data.path={npz_path}',
                '--config.model.name=resnet_9000')
  assert result.returncode == 2
  errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and "unknown model 'resnet_9000'" in errors[0]
  assert 'Traceback' not in result.stderr


def test_misspelt_key_in_a_config_file(tmp_path, npz_path):
  config = small_config(**{'data.path': npz_path})
  config.optim.lrr = 0.1
  with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'"):
    train.run(config, str(tmp_path))


@pytest.mark.parametrize('groups,message', [
    ([('stem/.*', None), ('stage7/.*', None), ('.*', {})], r"optim.groups\[1\] pattern 'stage7"),
    ([('stem/.*', None), ('head/.*', {})], r'match no pattern in optim.groups: stage1/'),
    ([('.*', None)], 'every parameter is frozen'),
])
def test_freeze_group_errors(tmp_path, npz_path, groups, message):
  config = small_config(**{'data.path': npz_path})
  config.optim.groups = groups
  with pytest.raises(FreezeError, match=message):
    train.run(config, str(tmp_path))


def test_batch_not_divisible_by_devices(tmp_path, npz_path):
  config = small_config(**{'data.path': npz_path, 'data.batch_size': 12})
  with pytest.raises(UserError, match='data.batch_size=12 is not divisible by the 8 devices'):
    train.run(config, str(tmp_path))


def test_missing_data_path_is_named(tmp_path):
  config = small_config(**{'data.path': str(tmp_path / 'nope.npz')})
  with pytest.raises(UserError, match='nope.npz'):
    train.run(config, str(tmp_path / 'run'))
