"""What a newcomer meets on the way: each message is one `error:` line with the documented exit
status and no traceback, nothing is written before it, and the fix it suggests runs."""

import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO, array_source, small_config, write_npz

import tljax
from tljax import config as config_lib
from tljax import errors, export, train
from tljax.weights import zoo
from tljax.weights.errors import WeightsError

CONFIG = """
from tljax.config import base_config

def get_config(arg=None):
  c = base_config()
  c.model = dict(name={model!r}, num_classes=3)
  c.init.pretrained = {pretrained!r}
  c.init.dont_load = ('head/.*',)
  c.data.update(source='npz', path={data!r}, image_size=32, augment=False, batch_size=16)
  c.total_steps, c.log_every = 2, 1
  return c
"""


def _config_file(tmp_path, model, pretrained=None):
  data = write_npz(tmp_path / 'data.npz')
  path = tmp_path / f'{model}.py'
  path.write_text(CONFIG.format(model=model, pretrained=pretrained, data=data))
  return str(path)


def _train(args, env=None, timeout=600):
  return subprocess.run([sys.executable, '-m', 'tljax.train', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _one_error_line(result, status=errors.BAD_INPUT_EXIT_CODE):
  """The one `error:` line of a refused run, checked: its status, no traceback."""
  assert result.returncode == status, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr
  lines = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert len(lines) == 1, result.stderr[-3000:]
  return lines[0]


def _offline_env(tmp_path):
  """HOME in tmp_path (so the zoo's download cache too) and every https request refused."""
  env = dict(os.environ, HOME=str(tmp_path / 'home'), https_proxy='http://127.0.0.1:9',
             HTTPS_PROXY='http://127.0.0.1:9')
  env.pop('no_proxy', None)
  env.pop('NO_PROXY', None)
  return env


@pytest.mark.slow
def test_zoo_download_without_network_says_where_the_file_goes_and_the_file_fix_runs(tmp_path):
  config = _config_file(tmp_path, 'resnet18', 'resnet18/tv_in1k')
  workdir = tmp_path / 'run'
  env = _offline_env(tmp_path)
  line = _one_error_line(_train([f'--config={config}', f'--workdir={workdir}'], env))
  cache = os.path.join(str(tmp_path / 'home'), '.cache', 'tljax')
  assert "zoo entry 'resnet18/tv_in1k'" in line and 'resnet18-f37072fd.pth' in line
  assert re.search(rf'put it at {re.escape(cache)}/[0-9a-f]{{16}}/resnet18-f37072fd\.pth', line)
  assert not workdir.exists()
  assert set(os.listdir(cache)) <= {'xla'}  # the failed download left nothing (xla: compiles)
  # The suggested alternative, as printed, with FILE a torchvision-layout ResNet-18.
  flags = shlex.split(line.split('use the file directly: ')[1])
  assert flags == ['--config.init.pretrained=FILE', '--config.init.layout=torchvision']
  _, variables = tljax.create('resnet18', num_classes=1000, image_size=32)
  weights = tmp_path / 'resnet18_torchvision.safetensors'
  from safetensors.numpy import save_file
  save_file(export.tensors(variables, 'resnet18', 'torchvision'), str(weights))
  flags = [f.replace('FILE', str(weights)) for f in flags]
  result = _train([f'--config={config}', f'--workdir={workdir}', *flags], env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'loaded' in result.stdout and 'head' in result.stdout


def test_zoo_file_put_by_hand_is_found(tmp_path, monkeypatch):
  """The other fix the download error prints: the file put at the named path is used (and
  checked against its sha256)."""
  monkeypatch.setattr(zoo, 'CACHE', str(tmp_path / 'cache'))
  _, variables = tljax.create('small_cnn', num_classes=3, width=4, image_size=16)
  from safetensors.numpy import save_file
  weights = tmp_path / 'cnn.safetensors'
  save_file(export.tensors(variables, 'small_cnn', 'tljax'), str(weights))
  entry = zoo.ZooEntry('small_cnn', 'tljax', 'https://127.0.0.1:9/cnn.safetensors',
                       zoo.sha256_of(str(weights)), 3, model_kwargs=(('width', 4),))
  monkeypatch.setitem(zoo.ZOO, 'small_cnn/test', entry)
  monkeypatch.setenv('https_proxy', 'http://127.0.0.1:9')
  with pytest.raises(WeightsError) as error:
    zoo.fetch('small_cnn/test')
  where = re.search(r'put it at (\S+) \(it is checked', str(error.value)).group(1)
  os.makedirs(os.path.dirname(where), exist_ok=True)
  with open(where, 'wb') as f:
    f.write(b'not the file')
  with pytest.raises(WeightsError, match='sha256'):
    zoo.fetch('small_cnn/test')
  os.replace(weights, where)
  assert zoo.fetch('small_cnn/test') == where


def test_pretrained_true_takes_the_models_zoo_weights():
  model, variables = tljax.create('mobilenet_v2', pretrained=True, num_classes=3, image_size=32)
  _, reference = tljax.create('mobilenet_v2', pretrained='mobilenet_v2/imagenet', num_classes=3,
                              image_size=32)
  assert type(model).__name__ == 'MobileNetV2'
  np.testing.assert_array_equal(variables['params']['stem']['conv']['kernel'],
                                reference['params']['stem']['conv']['kernel'])
  with pytest.raises(WeightsError, match="no weights for model 'small_cnn'"):
    tljax.create('small_cnn', pretrained=True, num_classes=3)


@pytest.mark.parametrize('model, key, value', [
    ('mobilenet_v2', 'depthwise_impl', 'fast'),
    ('efficientnet_lite0', 'depthwise_impl', 'grouped_conv'),
    ('vit_ti16', 'pool', 'x'),
])
def test_a_model_choice_outside_its_names_is_one_line(tmp_path, model, key, value):
  config = _config_file(tmp_path, model)
  workdir = tmp_path / 'run'
  line = _one_error_line(_train([f'--config={config}', f'--workdir={workdir}',
                                 f'--config.model.{key}={value}']))
  assert line.startswith(f'error: model.{key}={value!r} is not one of ')
  assert not workdir.exists()


def test_vit_pool_never_falls_back_silently():
  model = tljax.models.build_model('vit_ti16', num_classes=3)
  with pytest.raises(ValueError, match='pool must be one of'):
    tljax.models.init_variables(model.clone(pool='cls'), 32)


@pytest.mark.slow
def test_feature_cache_refusal_writes_nothing_and_its_fix_runs(tmp_path):
  config = _config_file(tmp_path, 'vit_ti16')
  workdir = tmp_path / 'run'
  args = [f'--config={config}', f'--workdir={workdir}', '--config.model.dropout=0.1',
          '--config.freeze.preset=linear_probe', '--config.data.cache_features=true']
  line = _one_error_line(_train(args))
  assert 'random in training (dropout)' in line
  assert not workdir.exists()
  fix = re.search(r'set (--config\.\S+=\S+),', line).group(1)
  assert fix == '--config.model.dropout=0.0'
  result = _train([*args, fix])
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'cached the input of stage' in result.stdout
  # The other fix: caching off, as printed.
  off = re.search(r'turn caching off \((\S+)\)', line).group(1)
  result = _train([*args, off, f'--workdir={tmp_path / "uncached"}'])
  assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_divergence_exits_with_the_training_failed_status(tmp_path, npz_path):
  workdir = tmp_path / 'run'
  line = _one_error_line(_train(
      ['--config=configs/tests/arrays.py', f'--workdir={workdir}', f'--config.data.path={npz_path}',
       '--config.optim.lr=1e4', '--config.optim.schedule.name=constant',
       '--config.total_steps=12']), errors.TRAINING_FAILED_EXIT_CODE)
  assert 'non-finite values at step' in line


def test_training_failures_are_their_own_kind():
  from tljax import checkpoint, numerics
  for kind in (numerics.NonFiniteError, checkpoint.CheckpointWriteError):
    assert errors.exit_status(kind('x')) == errors.TRAINING_FAILED_EXIT_CODE
  assert errors.exit_status(errors.UserError('x')) == errors.BAD_INPUT_EXIT_CODE
  assert errors.TRAINING_FAILED_EXIT_CODE not in (
      0, errors.BAD_INPUT_EXIT_CODE, errors.PREEMPTED_EXIT_CODE, 1)


def test_none_unsets_a_key_whose_default_is_none():
  config = config_lib.base_config()
  config.init.pretrained = 'mobilenet_v2/imagenet'
  config = config_lib.apply_overrides(config, [('init.pretrained', 'None'),
                                               ('data.val_split', 'None')])
  assert config.init.pretrained is None and config.data.val_split is None
  # A key whose default is a string keeps the text.
  config = config_lib.apply_overrides(config_lib.base_config(), [('data.name', 'None')])
  assert config.data.name == 'None'


def test_in_process_training_failure_is_a_training_failed(tmp_path):
  config = small_config(**{'optim.lr': 1e4, 'optim.schedule.name': 'constant'})
  config.total_steps = 12
  with pytest.raises(errors.TrainingFailed):
    train.run(config, str(tmp_path / 'run'), source=array_source())
