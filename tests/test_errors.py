"""Bad input to train.run is one error naming the culprit. (The command line's one-line errors
are test_cli_refusals'.)"""

import re

import pytest
from helpers import small_config

from tljax import train
from tljax.config import ConfigError
from tljax.errors import UserError
from tljax.freeze import FreezeError


def test_misspelt_key_in_a_config_file(tmp_path, npz_path):
  config = small_config(**{'data.path': npz_path})
  config.optim.lrr = 0.1
  with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'"):
    train.run(config, str(tmp_path))


@pytest.mark.parametrize('groups,message', [
    ([('stem/.*', None), ('stage7/.*', None), ('.*', {})], r"optim.groups\[1\] pattern 'stage7"),
    ([('stem/.*', None), ('head/.*', {})], r'match no pattern in optim.groups: stage1/'),
    ([('.*', None)], 'every parameter is frozen by optim.groups: nothing would train'),
])
def test_freeze_group_errors(tmp_path, npz_path, groups, message):
  config = small_config(**{'data.path': npz_path})
  config.optim.groups = groups
  with pytest.raises(FreezeError, match=message):
    train.run(config, str(tmp_path))


def test_missing_data_path_is_named(tmp_path):
  path = str(tmp_path / 'nope.npz')
  config = small_config(**{'data.path': path})
  with pytest.raises(UserError, match=re.escape(f'npz file {path!r} (data.path): no such file')):
    train.run(config, str(tmp_path / 'run'))
