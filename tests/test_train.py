"""End-to-end training on TFDS mock data and a generated image folder, with frozen subtrees."""

import json
import os

import jax
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds
from helpers import small_config
from PIL import Image

from tljax import build, train
from tljax.config import base_config
from tljax.data import sources
from tljax.freeze import flat_paths
from tljax.weights.read import read_tljax_workdir, restore_latest


def _initial_variables(config):
  from tljax.config import resolve
  built = build.build(resolve(config))
  return flat_paths({'params': built.params, 'batch_stats': built.batch_stats})


def test_tfds_mock_20_steps_frozen_leaves_bitwise_unchanged(tmp_path):
  config = small_config(**{'data.source': 'tfds', 'data.name': 'plant_village',
                           'data.eval_split': 'train', 'data.augment': True,
                           'model.num_classes': 38, 'data.batch_size': 8,
                           'data.eval_batch_size': 8})
  config.optim.update(name='adamw', lr=0.01, weight_decay=0.1, clip_norm=1.0,
                      groups=[('stem/.*|stage1/.*', None), ('head/.*', dict(lr_mult=10.0)),
                              ('.*', {})])
  config.total_steps, config.checkpoint_every = 20, 10
  with tfds.testing.mock_data(num_examples=40):
    before = _initial_variables(config)
    results = train.run(config, str(tmp_path))
  after = read_tljax_workdir(str(tmp_path))
  frozen = [p for p in before if p.startswith(('params/stem/', 'params/stage1/',
                                                'batch_stats/stem/', 'batch_stats/stage1/'))]
  trainable = [p for p in before if p.startswith(('params/stage2/', 'params/head/'))]
  assert frozen and trainable
  for path in frozen:  # weights and BatchNorm statistics, bitwise
    assert np.array_equal(before[path], after[path]), path
  for path in trainable:
    assert not np.array_equal(before[path], after[path]), path
  # the trainable stage's BatchNorm statistics moved
  assert not np.array_equal(before['batch_stats/stage2/bn/mean'],
                            after['batch_stats/stage2/bn/mean'])

  # AdamW holds two moments per trainable tensor and nothing for frozen ones.
  trainable_bytes = sum(before[p].nbytes for p in trainable)
  assert results['trainable_params'] == sum(before[p].size for p in trainable)
  assert results['frozen_params'] == sum(before[p].size for p in frozen if 'params/' in p)
  opt_state = restore_latest(str(tmp_path))['opt_state']
  moments = [x for x in jax.tree.leaves(opt_state) if np.ndim(x) > 0]
  assert len(moments) == 2 * len(trainable)
  assert sum(x.nbytes for x in moments) == 2 * trainable_bytes
  assert results['eval']['examples'] == 40


def _write_folder(root, per_class, size=20):
  rng = np.random.default_rng(0)
  for split, n in per_class.items():
    for c, name in enumerate(['cat', 'dog']):
      os.makedirs(root / split / name)
      for i in range(n):
        pixels = rng.integers(0, 80, (size, size, 3)).astype(np.uint8)
        pixels[..., c] += 150
        Image.fromarray(pixels).save(root / split / name / f'{i}.png')


def test_image_folder_run_writes_the_workdir_contract(tmp_path):
  data = tmp_path / 'images'
  _write_folder(data, {'train': 12, 'test': 5})
  config = small_config(**{'data.source': 'folder', 'data.path': str(data),
                           'model.num_classes': 2, 'data.eval_batch_size': 8,
                           'data.augment': True})
  config.total_steps, config.eval_every = 6, 3
  workdir = tmp_path / 'run'
  results = train.run(config, str(workdir))
  assert results['eval']['examples'] == 10  # 2 classes x 5 test images, padding masked
  assert json.loads((workdir / 'config.json').read_text())['data']['path'] == str(data)
  lines = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [(m['step'], m['split']) for m in lines] == [
      (2, 'train'), (3, 'eval'), (4, 'train'), (6, 'train'), (6, 'eval')]
  assert all('loss' in m and 'accuracy' in m for m in lines)
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir))
  saved = json.loads((workdir / 'results.json').read_text())
  for key in ('eval', 'wall_time_s', 'trainable_params', 'frozen_params',
              'optimizer_state_bytes'):
    assert key in saved
  # The counts add up to the model's parameters, counted here from a fresh params pytree; the
  # frozen ones are the stem's (small_config freezes 'stem/.*').
  from tljax.config import resolve
  params = build.build(resolve(config)).params
  assert saved['trainable_params'] + saved['frozen_params'] == sum(
      int(np.size(leaf)) for leaf in jax.tree.leaves(params))
  assert saved['frozen_params'] == sum(int(np.size(leaf))
                                       for leaf in jax.tree.leaves(params['stem']))
  assert saved['frozen_params'] > 0 and saved['trainable_params'] > 0
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['3', '6']


def test_folder_source_labels_follow_sorted_class_folders(tmp_path):
  _write_folder(tmp_path, {'train': 2})
  source = sources.FolderSource(str(tmp_path))
  assert source.class_names == ['cat', 'dog']
  records = list(source.records('train').as_numpy_iterator())
  assert [(os.path.basename(os.path.dirname(r['image'].decode())), r['label'])
          for r in records] == [('cat', 0), ('cat', 0), ('dog', 1), ('dog', 1)]


def test_frozen_leaves_keep_negative_zero_bitwise():
  """Adding a zero update would turn -0.0 into +0.0; frozen leaves must not be touched."""
  import flax.linen as nn
  import jax.numpy as jnp

  from tljax.steps import TrainState, make_train_step

  class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return nn.Dense(2, name='head')(nn.Dense(3, name='body')(x))

  model = Tiny()
  params = model.init(jax.random.key(0), jnp.zeros((1, 4)))['params']
  params['body']['bias'] = jnp.array([-0.0, -0.0, 1.0])
  mask = {'body': {'bias': False, 'kernel': False}, 'head': {'bias': True, 'kernel': True}}
  labels = jax.tree.map(lambda m: 'train' if m else 'frozen', mask)
  optimizer = optax.multi_transform({'train': optax.sgd(0.1), 'frozen': optax.set_to_zero()},
                                    labels)
  step = make_train_step(model, optimizer, mask, lambda s: 0.1, seed=0)
  state = TrainState(jnp.asarray(0), params, {}, optimizer.init(params))
  batch = {'image': jnp.ones((2, 4)), 'label': jnp.array([0, 1])}
  state, _ = jax.jit(step)(state, batch)
  assert np.signbit(np.asarray(state.params['body']['bias'][:2])).all()


@pytest.mark.parametrize('schedule', ['cosine', 'linear', 'step', 'constant'])
def test_schedules_warm_up_then_decay(schedule):
  from tljax.optim import make_schedule
  base = 0.3
  section = base_config().optim.schedule
  section.update(name=schedule, warmup_steps=10)
  fn = make_schedule(section, base, 110)
  assert float(fn(0)) == 0.0 and float(fn(5)) == pytest.approx(base / 2)  # linear warmup
  after_warmup = [float(fn(step)) for step in (10, 11, 40, 80, 109)]
  assert after_warmup[0] == pytest.approx(base)
  if schedule == 'constant':
    assert after_warmup == pytest.approx([base] * 5)
  else:
    assert after_warmup == sorted(after_warmup, reverse=True)  # never rises again
    assert after_warmup[-1] < base / 2
