"""Runs with LoRA adapters: what trains, what the optimizer holds, FSDP and resume, export
with --merge-lora, and the one-line errors (the adapters themselves: tests/test_lora.py)."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from helpers import REPO, cut_run_resumes_bit_exact, small_config, write_npz

import tljax
from tljax import build, export, lora, saved_model, train
from tljax.resolve import resolve_config
from tljax.weights.read import restore_latest

FC = r'fc[56]/kernel'  # layered_cnn's two hidden Dense layers


def _lora_config(data='', **overrides):
  config = small_config(**{'data.path': data, 'lora.rank': 2, 'lora.alpha': 4.0,
                           'lora.targets': (FC,), 'optim.groups': [('lora/.*', {}),
                                                                   ('.*', None)],
                           **overrides})
  config.model = dict(name='layered_cnn', num_classes=3, conv_widths=(4, 4, 8, 8),
                      dense_width=16)
  return config


def _flat(tree):
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep='/').items()}


def _images(count=8, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(count, 16, 16, 3)), jnp.float32)


def test_at_step_zero_the_adapted_model_computes_the_base_model():
  adapted = build.build(resolve_config(_lora_config(), source_given=True), 6)
  plain = build.build(resolve_config(_lora_config(**{'lora.rank': 0, 'lora.targets': (),
                                                     'optim.groups': [('.*', {})]}),
                                     source_given=True), 6)
  assert isinstance(adapted.model, lora.LoraModel)
  variables = {'params': adapted.params, 'batch_stats': adapted.batch_stats}
  base = {'params': plain.params, 'batch_stats': plain.batch_stats}
  np.testing.assert_array_equal(adapted.model.apply(variables, _images(), train=False),
                                plain.model.apply(base, _images(), train=False))


@pytest.mark.slow
@pytest.mark.parametrize('name,moments', [('sgd', 1), ('adamw', 2)])
def test_only_the_adapters_train_and_the_optimizer_holds_them_alone(tmp_path, name, moments):
  """Base kernels bitwise unchanged; optimizer arrays = 4 bytes x adapter parameters per moment
  (SGD momentum: 1, AdamW: 2), besides the scalar step counts."""
  data = write_npz(tmp_path / 'data.npz')
  config = _lora_config(data, **{'optim.name': name,
                                 'optim.lr': 0.1 if name == 'sgd' else 0.01})
  results = train.run(config, str(tmp_path / 'run'))
  start = _flat(build.build(resolve_config(config), 6).params)
  final = _flat(restore_latest(str(tmp_path / 'run'))['params'])
  changed = {p for p in start if not np.array_equal(start[p], final[p])}
  adapters = lora.adapter_count(traverse_util.unflatten_dict(start, sep='/'))
  assert changed == {p for p in start if p.startswith('lora/') and p.endswith('/b')} | {
      p for p in start if p.startswith('lora/') and p.endswith('/a')}
  kernels = [start[f'{name}/kernel'].shape for name in ('fc5', 'fc6')]
  assert adapters == sum(2 * (fan_in + fan_out) for fan_in, fan_out in kernels)
  assert adapters == results['trainable_params']
  opt_state = restore_latest(str(tmp_path / 'run'))['opt_state']
  arrays = [x for x in jax.tree.leaves(opt_state) if np.ndim(x)]
  scalars = [x for x in jax.tree.leaves(opt_state) if not np.ndim(x)]
  assert sum(np.asarray(x).nbytes for x in arrays) == 4 * moments * adapters
  assert results['optimizer_state_bytes'] == 4 * moments * adapters + sum(
      np.asarray(x).nbytes for x in scalars)
  assert results['strategy']['lora']['adapter_params'] == adapters


@pytest.fixture(scope='module')
def lora_run(tmp_path_factory):
  """A finished LoRA run whose head trains too (adapters and head)."""
  root = tmp_path_factory.mktemp('lora')
  data = write_npz(root / 'data.npz')
  train.run(_lora_config(data, **{'optim.groups': [('lora/.*', {}), ('head/.*', {}),
                                                   ('.*', None)],
                                  'total_steps': 10}), str(root / 'run'))
  return root / 'run'


def test_the_merged_export_computes_the_adapted_model(lora_run, tmp_path):
  model, variables, record = saved_model.load(str(lora_run), 'last', merge_lora=False)
  assert lora.LORA in variables['params'] and record['lora'] == dict(rank=2, alpha=4.0)
  adapted = lora.LoraModel(model, lora.find_targets(variables['params'], (FC,)), 4.0, 2)
  expected = adapted.apply(variables, _images(), train=False)
  out = str(tmp_path / 'merged.safetensors')
  export.export(str(lora_run), out, 'last', merge_lora=True)
  merged_model, merged = tljax.create('layered_cnn', num_classes=3, pretrained=out,
                                      image_size=16, conv_widths=(4, 4, 8, 8), dense_width=16)
  assert lora.LORA not in merged['params']
  logits = merged_model.apply(merged, _images(), train=False)
  np.testing.assert_allclose(logits, expected, atol=1e-5)
  b = _flat(variables['params'])['lora/fc5/b']
  assert np.abs(b).max() > 0  # the adapters trained, so merging changed the kernels
  predicted = saved_model.load(str(lora_run), 'last')  # what predict uses: merged
  np.testing.assert_allclose(predicted[0].apply(predicted[1], _images(), train=False),
                             expected, atol=1e-5)


def test_an_outside_layout_needs_merge_lora(lora_run, tmp_path):
  """The tljax layout keeps the adapters apart; torchvision's (MobileNetV2, one training step)
  has no place for them, so it asks for --merge-lora, and with it writes the merged kernel."""
  kept = str(tmp_path / 'kept.safetensors')
  export.export(str(lora_run), kept, 'last')
  from safetensors.numpy import load_file
  assert any(k.startswith('params/lora/') for k in load_file(kept))
  config = small_config(**{'data.path': write_npz(tmp_path / 'data.npz'), 'total_steps': 1,
                           'lora.rank': 2, 'lora.targets': ('head/kernel',),
                           'optim.groups': [('.*', {})], 'freeze.preset': 'linear_probe'})
  config.model = dict(name='mobilenet_v2', num_classes=3)
  train.run(config, str(tmp_path / 'mobilenet'))
  with pytest.raises(tljax.errors.UserError, match='--merge-lora'):
    export.export(str(tmp_path / 'mobilenet'), str(tmp_path / 'tv.safetensors'), 'last',
                  layout='torchvision')
  export.export(str(tmp_path / 'mobilenet'), str(tmp_path / 'tv.safetensors'), 'last',
                layout='torchvision', merge_lora=True)
  merged = load_file(str(tmp_path / 'tv.safetensors'))
  _, variables, _ = saved_model.load(str(tmp_path / 'mobilenet'), 'last')
  np.testing.assert_allclose(merged['classifier.1.weight'],
                             np.asarray(variables['params']['head']['kernel']).T, atol=1e-6)


@pytest.mark.slow
def test_fsdp_with_adapters_resumes_bit_exact(tmp_path):
  """8 simulated devices, every leaf split over them (adapters included); a run cut after its
  step-3 checkpoint resumes and ends bitwise where the uninterrupted run ends."""
  data = write_npz(tmp_path / 'data.npz')
  config = _lora_config(data, **{'sharding.rule': 'fsdp', 'sharding.min_size_mb': 0.0,
                                 'optim.groups': [('lora/.*', {}), ('head/.*', {}),
                                                  ('.*', None)]})
  results, resumed = cut_run_resumes_bit_exact(config, tmp_path, 6)
  assert results['sharding']['split_leaves'] > 0 and results['devices'] == 8
  assert resumed['resumed_from_step'] == 3 and resumed['strategy']['lora']['adapter_params']


ENV = {**os.environ, 'JAX_PLATFORMS': 'cpu'}


@pytest.mark.parametrize('overrides,key', [
    ({'lora.targets': ('nothing/kernel',)}, 'lora.targets[0]'),
    ({'lora.targets': ('head/bias',)}, 'lora.targets[0]'),
    ({'lora.targets': ('stage1/conv/kernel',)}, 'lora.targets[0]'),
    ({'lora.targets': ('head/kernel', 'stem/.*')}, 'lora.targets[1]'),
    ({'lora.rank': 0}, 'lora.targets is set but lora.rank is 0'),
    ({'lora.rank': -1}, 'lora.rank'),
    ({'lora.rank': 4}, 'lora.rank=4'),  # the head is 16 x 3
    ({'lora.alpha': 0.0}, 'lora.alpha'),
    ({'lora.dropout': 1.0}, 'lora.dropout'),
])
def test_a_bad_lora_value_is_refused_naming_the_key_before_any_write(tmp_path, overrides, key):
  config = small_config(**{'data.path': write_npz(tmp_path / 'data.npz'), 'lora.rank': 2,
                           'lora.targets': ('head/kernel',), **overrides})
  with pytest.raises(tljax.errors.UserError) as raised:
    train.run(config, str(tmp_path / 'run'))
  assert key in str(raised.value)
  assert not (tmp_path / 'run').exists() or not os.listdir(tmp_path / 'run')


@pytest.mark.parametrize('flag,key', [('--config.lora.targets=("head/bias",)', 'lora.targets[0]'),
                                      ('--config.lora.rank=4', 'lora.rank=4')])
def test_on_the_command_line_it_is_one_error_line(tmp_path, flag, key):
  data = write_npz(tmp_path / 'data.npz')
  command = [sys.executable, '-m', 'tljax.train', f'--config={REPO}/configs/tests/arrays.py',
             f'--workdir={tmp_path / "run"}', f'--config.data.path={data}',
             '--config.lora.rank=2', '--config.lora.targets=("head/kernel",)', flag]
  done = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True,
                        timeout=300)
  lines = done.stderr.strip().splitlines()
  assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith('error: '), \
      done.stderr[-2000:]
  assert key in lines[0]
  assert not (tmp_path / 'run').exists() or not os.listdir(tmp_path / 'run')


def test_adapters_of_frozen_stages_still_train_with_a_feature_cache(tmp_path):
  """A stage whose kernels are frozen but whose adapters train is not frozen: the cache cuts
  before the first adapted stage (fc5), not at the head, and the adapters move."""
  data = write_npz(tmp_path / 'data.npz')
  config = _lora_config(data, **{'optim.groups': [('.*', {})], 'freeze.preset': 'linear_probe',
                                 'data.cache_features': True})
  results = train.run(config, str(tmp_path / 'run'))
  assert results['feature_cache']['stage'] == 'fc5' and results['frozen_stages'] == 4
  final = _flat(restore_latest(str(tmp_path / 'run'))['params'])
  assert np.abs(final['lora/fc5/b']).max() > 0 and np.abs(final['lora/fc6/b']).max() > 0


def test_a_group_the_adapters_empty_is_named_as_the_user_wrote_it():
  config = _lora_config(**{'optim.groups': [('fc5/kernel', {'lr_mult': 2.0}), ('.*', {})]})
  with pytest.raises(tljax.errors.UserError, match=r"optim\.groups\[0\] pattern 'fc5/kernel'"):
    build.build(resolve_config(config, source_given=True), 6)
  built = build.build(resolve_config(_lora_config(), source_given=True), 6)
  from tljax import freeze
  table = freeze.format_table(freeze.summary_rows(built.params, built.groups, 0.1))
  assert table.splitlines()[2].startswith('lora ')


def test_a_lora_workdir_as_pretrained_weights_is_the_merged_model(lora_run, tmp_path):
  model, variables, _ = saved_model.load(str(lora_run), 'last', merge_lora=False)
  adapted = lora.LoraModel(model, lora.find_targets(variables['params'], (FC,)), 4.0, 2)
  expected = adapted.apply(variables, _images(), train=False)
  kwargs = dict(num_classes=3, image_size=16, conv_widths=(4, 4, 8, 8), dense_width=16)
  loaded_model, loaded = tljax.create('layered_cnn', pretrained=str(lora_run), **kwargs)
  np.testing.assert_allclose(loaded_model.apply(loaded, _images(), train=False), expected,
                             atol=1e-5)
  kept = str(tmp_path / 'kept.safetensors')
  export.export(str(lora_run), kept, 'last')
  with pytest.raises(tljax.errors.UserError, match='--merge-lora'):
    tljax.create('layered_cnn', pretrained=kept, **kwargs)


@pytest.mark.parametrize('record', [{'rank': 2}, 5, 'x', {'rank': 'two', 'alpha': 4.0},
                                    {'rank': 2, 'alpha': -1.0}, {'rank': True, 'alpha': 4.0}])
def test_a_damaged_lora_record_is_one_error_naming_the_file(lora_run, tmp_path, record):
  copy = tmp_path / 'run'
  shutil.copytree(lora_run, copy)
  path = copy / 'model.json'
  saved = json.loads(path.read_text())
  path.write_text(json.dumps({**saved, 'lora': record}))
  with pytest.raises(tljax.errors.UserError, match='model.json'):
    saved_model.load(str(copy), 'last')
  with pytest.raises(tljax.errors.UserError, match='model.json'):
    export.export(str(copy), str(tmp_path / 'out.safetensors'), 'last')


def test_without_a_record_the_config_json_says_rank_and_alpha(lora_run, tmp_path):
  copy = tmp_path / 'run'
  shutil.copytree(lora_run, copy)
  path = copy / 'model.json'
  path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items()
                              if k != 'lora'}))
  metadata = export.export(str(copy), str(tmp_path / 'kept.safetensors'), 'last')
  assert json.loads(metadata['lora']) == dict(rank=2, alpha=4.0)


def test_an_outside_layout_the_model_lacks_is_named_before_merging(lora_run, tmp_path):
  with pytest.raises(tljax.errors.UserError, match="--layout torchvision: model 'layered_cnn'"):
    export.export(str(lora_run), str(tmp_path / 'tv.safetensors'), 'last',
                  layout='torchvision')
