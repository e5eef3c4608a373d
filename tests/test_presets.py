"""Freeze-depth presets, loading only the first stages, and grouped eval accuracies."""

import types

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import make_arrays, small_config

from tljax import build, freeze, resolve, steps, train
from tljax.data.sources import ArraySource
from tljax.errors import UserError
from tljax.freeze import FreezeError, flat_paths
from tljax.weights.read import read_tljax_workdir

SMALL_STAGES = ('stem', 'stage1', 'stage2', 'head')


def _preset_config(preset, **overrides):
  config = small_config(**overrides)
  config.optim.groups = [('.*', {})]
  config.freeze.preset = preset
  return config


@pytest.mark.parametrize('preset,frozen', [('full', 0), ('scratch', 0), ('stages:1', 1),
                                           ('stages:2', 2), ('linear_probe', 3)])
def test_presets_freeze_a_prefix_of_the_model_stages(preset, frozen):
  config = resolve.resolve_config(_preset_config(preset))
  labels = build.build(config).labels
  assert freeze.frozen_stage_count(labels, SMALL_STAGES) == frozen
  flat = flat_paths(labels)
  for path, label in flat.items():
    stage = SMALL_STAGES.index(path.split('/')[0])
    assert (label == freeze.FROZEN) == (stage < frozen), path


def test_head_learning_rate_multiplier_applies_to_the_head_only():
  config = resolve.resolve_config(_preset_config('stages:1', **{'freeze.head_lr_mult': 10.0}))
  assert config.optim.groups[-2] == ('head/.*', {'lr_mult': 10.0})
  probe = resolve.resolve_config(_preset_config('linear_probe', **{'freeze.head_lr_mult': 10.0}))
  assert [g[1] for g in probe.optim.groups] == [None, {'lr_mult': 10.0}]


def test_scratch_drops_the_pretrained_init():
  config = _preset_config('scratch')
  config.init.pretrained = '/runs/pretrained'
  assert resolve.resolve_config(config).init.pretrained is None
  config.freeze.preset = 'full'
  assert resolve.resolve_config(config).init.pretrained == '/runs/pretrained'


@pytest.mark.parametrize('preset,message', [
    ('stages:x', "got 'stages:x'"), ('probe', "got 'probe'"),
    ('stages:4', r"freeze.preset='stages:4' must freeze 0 to 3 stages")])
def test_bad_presets_are_named(preset, message):
  with pytest.raises(FreezeError, match=message):
    resolve.resolve_config(_preset_config(preset))


def test_preset_and_explicit_groups_together_are_refused():
  config = small_config()  # sets optim.groups
  config.freeze.preset = 'full'
  with pytest.raises(UserError, match='freeze.preset.*optim.groups'):
    resolve.resolve_config(config)


def test_load_stages_copies_only_the_first_stages(tmp_path):
  source = small_config(**{'data.source': 'npz'})
  images, labels = make_arrays()
  data = ArraySource({'train': (images, labels), 'test': (images[:8], labels[:8])})
  train.run(source, str(tmp_path / 'pretrained'), source=data)
  pretrained = read_tljax_workdir(str(tmp_path / 'pretrained'))

  def initial(**init):
    config = small_config(seed=7)
    config.init.update(init)
    built = build.build(resolve.resolve_config(config))
    return flat_paths({'params': built.params, 'batch_stats': built.batch_stats})

  fresh = initial()
  loaded = initial(pretrained=str(tmp_path / 'pretrained'), load_stages=1)
  stem = [p for p in fresh if p.split('/')[1] == 'stem']
  rest = [p for p in fresh if p.split('/')[1] in ('stage1', 'stage2')]
  assert stem and rest
  for path in stem:
    assert np.array_equal(loaded[path], pretrained[path]), path
  for path in rest:
    assert np.array_equal(loaded[path], fresh[path]), path
    assert not np.array_equal(loaded[path], pretrained[path]), path
  with pytest.raises(UserError, match=r'init.load_stages must be in \[0, 3\]'):
    initial(pretrained=str(tmp_path / 'pretrained'), load_stages=4)


class _Echo(nn.Module):
  """Logits are the input: the test chooses every prediction."""

  @nn.compact
  def __call__(self, x, train):
    return x


def test_grouped_accuracy_counts_predictions_in_the_right_group():
  predicted = np.array([0, 1, 2, 3, 1])
  labels = np.array([1, 1, 3, 0, 2])
  batch = dict(image=jnp.eye(4)[predicted], label=jnp.asarray(labels),
               mask=jnp.array([1, 1, 1, 1, 0]))
  config = small_config(**{'model.num_classes': 4})
  config.eval_groupings = dict(binary=((0, 1), (2, 3)))
  eval_step = steps.make_eval_step(_Echo(), groupings=resolve.grouping_tables(config))
  sums = eval_step(types.SimpleNamespace(params={}, batch_stats={}), batch)
  # exact: only example 1; same group: 0 (0~1), 1, 2 (2~3); example 4 is padding
  assert float(sums['correct']) == 1 and float(sums['correct_binary']) == 3
  assert float(sums['count']) == 4


@pytest.mark.parametrize('groups,message', [(((0, 1), (2,)), r'leaves out classes \[3\]'),
                                            (((0, 1), (1, 2, 3)), 'class 1'),
                                            (((0, 1), (2, 3, 4)), 'class 4')])
def test_bad_groupings_are_named(groups, message):
  config = small_config(**{'model.num_classes': 4})
  config.eval_groupings = dict(binary=groups)
  with pytest.raises(UserError, match=f'eval_groupings.binary.*{message}'):
    resolve.grouping_tables(config)


def test_resolving_twice_changes_nothing():
  config = _preset_config('stages:2', **{'freeze.head_lr_mult': 5.0})
  config.init.update(pretrained='/runs/a', load_stages=2)
  once = resolve.resolve_config(config)
  assert resolve.resolve_config(once).to_json_best_effort() == once.to_json_best_effort()
  assert once.init.dont_load == ('(stage2|head)/.*',)


def test_a_preset_with_optim_groups_set_to_none_writes_the_preset_out():
  # --config.optim.groups=None beside a preset means "no groups of my own" (it crashed).
  config = resolve.resolve_config(small_config(**{'optim.groups': None,
                                                  'freeze.preset': 'stages:1'}))
  assert [pattern for pattern, _ in config.optim.groups] == ['(stem)/.*', '.*']
  assert config.optim.groups[0][1] is None  # the stem frozen
