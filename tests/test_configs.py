"""The shipped configs: every sweep expands to valid runs, and PlantVillage trains on mock data."""

import glob
import os
import shlex

import pytest
import tensorflow_datasets as tfds
from helpers import REPO

from tljax import ablate, resolve, train
from tljax.config import apply_overrides, load_config_file
from tljax.sweep import command, expand, variant_config

SWEEPS = sorted(glob.glob(os.path.join(REPO, 'configs', 'ablations', '*.py')))
# Sweeps over the user's own data take its folder as their argument (any path expands).
SWEEP_ARGS = {'folder_freeze.py': ':tests'}


@pytest.mark.parametrize('path', SWEEPS, ids=os.path.basename)
def test_sweep_config_expands_to_valid_runs_in_a_usable_order(path, monkeypatch):
  monkeypatch.chdir(REPO)  # sweep files name their base config relative to the checkout
  arg = SWEEP_ARGS.get(os.path.basename(path), '')
  sweep = ablate.load_sweep(path + arg)
  base = load_config_file(sweep.base)
  variants = expand(sweep, '/sweep')
  assert len(variants) >= (3 if arg else 10)
  seen = set()
  for variant in variants:
    in_process = variant_config(base, variant)
    config = resolve.resolve_config(in_process)
    # The printed command runs this variant alone: its flags, read as tljax.train reads them,
    # give the config the in-process runner uses.
    words = shlex.split(command(sweep, variant, '/sweep', base))
    assert words[:5] == ['python', '-m', 'tljax.train', f'--config={sweep.base}',
                         f'--workdir=/sweep/{variant.name}']
    flags = [word.removeprefix('--config.').split('=', 1) for word in words[5:]]
    assert all(word.startswith('--config.') for word in words[5:]), words
    assert {key for key, _ in flags} == {k for k, v in variant.overrides.items()
                                         if v is not None}
    rebuilt = apply_overrides(load_config_file(sweep.base), flags)
    assert rebuilt.to_json_best_effort(sort_keys=True) == in_process.to_json_best_effort(
        sort_keys=True), variant.name
    pretrained = config.init.pretrained or ''
    if pretrained.startswith('/sweep/'):  # a transfer from another variant: it runs first
      assert os.path.basename(pretrained) in seen, (variant.name, pretrained)
    seen.add(variant.name)


def test_yosinski_transfers_copy_n_layers_frozen_or_fine_tuned(monkeypatch):
  monkeypatch.chdir(REPO)
  sweep = ablate.load_sweep('configs/ablations/yosinski_fmnist.py')
  base = load_config_file(sweep.base)
  by_name = {v.name: v for v in expand(sweep, '/s')}
  assert len(by_name) == (2 + 4 * 6) * 3
  anb = resolve.resolve_config(variant_config(base, by_name['AnB3-seed1']))
  assert anb.init.pretrained == '/s/baseA-seed1'
  assert anb.init.dont_load == ('(conv4|fc5|fc6|head)/.*',)
  assert tuple(anb.optim.groups[0]) == ('(conv1|conv2|conv3)/.*', None)
  plus = resolve.resolve_config(variant_config(base, by_name['BnBplus3-seed1']))
  assert plus.init.pretrained == '/s/baseB-seed1'
  assert all(g[1] is not None for g in plus.optim.groups)
  base_a = resolve.resolve_config(variant_config(base, by_name['baseA-seed0']))
  assert set(base_a.data.classes).isdisjoint(base.data.classes)


@pytest.mark.slow
def test_plant_village_config_trains_on_mock_data(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  config = load_config_file('configs/plant_village.py')
  config.data.update(image_size=32, resize_size=36, batch_size=8, eval_batch_size=8,
                     examples_per_class=2)
  config.freeze.preset = 'linear_probe'
  config.total_epochs, config.total_steps = None, 3
  with tfds.testing.mock_data(num_examples=400):
    results = train.run(config, str(tmp_path))
  assert results['pretrained'] == 'mobilenet_v2/imagenet'
  assert results['trainable_params'] == 1280 * 38 + 38  # the new 38-class head only
  assert results['frozen_stages'] == 9
  assert results['train_examples'] == 2 * 38
  assert results['eval']['examples'] > 0
