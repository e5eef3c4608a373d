"""jit-over-a-mesh vs pmap, replicated vs FSDP vs 2-D layouts, one process vs two joined by
jax.distributed, and every example once per epoch across processes."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import REPO, array_source, small_config, step_parts

from tljax import parallel, resolve, steps, train
from tljax.data import pipeline
from tljax.data.sources import ArraySource
from tljax.errors import UserError
from tljax.partition import Layout, make_layout
from tljax.weights.read import read_tljax_workdir


def _assert_same_parameters(expected, actual):
  assert expected.keys() == actual.keys()
  for path in expected:
    np.testing.assert_allclose(actual[path], expected[path], rtol=1e-5, atol=1e-6, err_msg=path)


@pytest.mark.slow
def test_pmap_fsdp_and_2d_layouts_train_to_the_same_parameters_as_replicated_jit(tmp_path):
  assert jax.device_count() == 8
  finals, results = {}, {}
  for name, kind, rule, model_axis in (('replicated', 'jit', 'replicate', 1),
                                       ('pmap', 'pmap', 'replicate', 1),
                                       ('fsdp', 'jit', 'fsdp', 1),
                                       ('fsdp_2d', 'jit', 'fsdp', 2)):
    config = small_config(parallel=kind)
    config.optim.groups = [('.*', {})]  # BatchNorm trains: statistics synced over devices too
    config.total_steps = 5
    config.sharding.update(rule=rule, model_axis=model_axis, min_size_mb=0.0)
    results[name] = train.run(config, str(tmp_path / name), source=array_source())
    assert results[name]['parallel'] == kind and results[name]['devices'] == 8
    finals[name] = read_tljax_workdir(str(tmp_path / name))
  assert any(path.startswith('batch_stats/') for path in finals['replicated'])
  for name in ('pmap', 'fsdp', 'fsdp_2d'):
    _assert_same_parameters(finals['replicated'], finals[name])
  # The placed state of each run, as measured from its arrays' shardings.
  assert results['replicated']['sharding']['split_leaves'] == 0
  assert results['fsdp']['sharding']['mesh'] == {'data': 8}
  assert results['fsdp_2d']['sharding']['mesh'] == {'data': 4, 'model': 2}
  for name in ('fsdp', 'fsdp_2d'):
    summary = results[name]['sharding']
    assert summary['split_leaves'] > summary['leaves'] // 2
    assert summary['bytes_per_device'] < summary['bytes_replicated'] / 4


def _train_cli(workdir, config_args, extra=(), env=None):
  command = [sys.executable, '-m', 'tljax.train', f'--config={REPO}/configs/tests/arrays.py',
             f'--workdir={workdir}', *config_args, *extra]
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu', **(env or {})})


def _train_state(config):
  """Model, placed-ready TrainState and the jitted step pieces, as train.run builds them."""
  config = resolve.resolve_config(config)
  model, optimizer, mask, schedule, state = step_parts(config)
  return config, state, steps.make_train_step(model, optimizer, mask, schedule, 0)


def _shard_ids(array):
  return {tuple((s.start, s.stop) for s in shard.index) for shard in array.addressable_shards}


def test_fsdp_step_keeps_large_leaves_split_and_small_ones_replicated():
  config, state, step = _train_state(small_config())
  threshold = 256  # bytes: conv kernels and their momenta above it, biases below
  runner = parallel.JitRunner(Layout('fsdp', threshold / 2**20, data=8))
  placed = runner.place_state(state)
  train_step = runner.compile_train(step, placed)
  batch = next(pipeline.train_batches(array_source(), config.data, start_step=0, seed=0))
  new_state, _ = train_step(placed, batch)
  split = {'params': 0, 'batch_stats': 0, 'opt_state': 0}
  for path, leaf in jax.tree_util.tree_leaves_with_path(new_state):
    name = jax.tree_util.keystr(path)
    divisible = any(size % 8 == 0 for size in leaf.shape)
    if leaf.nbytes >= threshold and divisible:
      assert not leaf.sharding.is_fully_replicated, name
      assert len(_shard_ids(leaf)) == 8, name  # eight different slices, one per device
      assert all(s.data.size == leaf.size // 8 for s in leaf.addressable_shards), name
      split[path[0].name] += 1
    else:
      assert leaf.sharding.is_fully_replicated, name
  assert split['params'] and split['opt_state'], split

  # A 2-D mesh: large leaves split over 'data' and, on their last dimension, over 'model'.
  runner = parallel.JitRunner(Layout('fsdp', threshold / 2**20, data=4, model=2))
  placed = runner.place_state(state)
  new_state, _ = runner.compile_train(step, placed)(placed, batch)
  both = [leaf for leaf in jax.tree.leaves(new_state)
          if {'data', 'model'} <= set(leaf.sharding.spec)]
  assert both and all(len(_shard_ids(leaf)) == 8 and leaf.sharding.spec[-1] == 'model'
                      for leaf in both)


def test_layouts_that_cannot_work_are_refused_naming_the_key():
  good = dict(rule='fsdp', min_size_mb=4.0, model_axis=1)
  assert make_layout(good, 8, 8) == Layout('fsdp', 4.0, 8, 1)
  assert make_layout({**good, 'model_axis': 2}, 8, 4) == Layout('fsdp', 4.0, 4, 2)
  for bad, match in (({**good, 'rule': 'zero3'}, 'sharding.rule'),
                     ({**good, 'model_axis': 3}, r'sharding.model_axis=3.*divide the 4'),
                     ({**good, 'min_size_mb': -1.0}, 'sharding.min_size_mb'),
                     ({**good, 'min_size_mb': '4'}, 'sharding.min_size_mb'),
                     ({**good, 'model_axis': 2.0}, 'sharding.model_axis')):
    with pytest.raises(UserError, match=match):
      make_layout(bad, 8, 4)
  with pytest.raises(UserError, match="need parallel='jit'"):
    make_layout(good, 8, 8, parallel='pmap')
  with pytest.raises(UserError, match=r'batch_size=10 .* 4 devices of the mesh.s data axis'):
    parallel.check_batch_size(10, Layout('fsdp', 4.0, data=4, model=2))


def test_every_example_once_per_epoch_whatever_the_process_count():
  """Each process reads only its slice of every global batch: over one epoch the slices of all
  processes hold each example exactly once, in the order one process would see them."""
  for total in (60, 50):  # 50: the last global batch of the epoch runs into the next epoch
    labels = np.arange(total, dtype=np.int32)  # the label says which example it is
    images = np.zeros((total, 16, 16, 3), np.uint8)
    source = ArraySource({'train': (images, labels)})
    config = small_config().data
    config.batch_size = 12
    steps_per_epoch = -(-total // 12)
    one = [b['label'] for b, _ in zip(pipeline.train_batches(
        source, config, start_step=0, seed=3), range(steps_per_epoch), strict=False)]
    for processes in (2, 3, 4):
      streams = [pipeline.train_batches(source, config, start_step=0, seed=3,
                                        process_index=p, process_count=processes)
                 for p in range(processes)]
      for step in range(steps_per_epoch):
        slices = [next(stream)['label'] for stream in streams]
        assert all(len(s) == 12 // processes for s in slices)
        np.testing.assert_array_equal(np.concatenate(slices), one[step])
    epoch = np.concatenate(one)[:total]
    np.testing.assert_array_equal(np.sort(epoch), labels)


def _multiprocess(processes, devices_per_process, workdir, args):
  result = subprocess.run(
      ['bash', f'{REPO}/launch/multiprocess.sh', str(processes),
       f'{REPO}/configs/tests/arrays.py', str(workdir), *args], cwd=REPO, capture_output=True,
      text=True, timeout=300, env={**os.environ, 'DEVICES_PER_PROCESS': str(devices_per_process),
                                  'PYTHON': sys.executable})
  logs = [(workdir / f'process_{i}.log').read_text() for i in range(processes)]
  assert result.returncode == 0, ''.join(log[-2000:] for log in logs)
  return logs[0]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_checkpoints_move_between_two_processes_and_one(tmp_path, npz_path):
  """1 x 8 devices all the way; 2 x 4 all the way; 2 x 2 then 1 x 8; 1 x 8 then 2 x 4 on a 2-D
  mesh: the same parameters. Checkpoints written by every process of one topology restore into
  another."""
  args = [f'--config.data.path={npz_path}', '--config.optim.schedule.name=constant',
          '--config.sharding.rule=fsdp', '--config.sharding.min_size_mb=0']
  first_half, second_half = ['--config.total_steps=3'], ['--config.total_steps=6']
  reference = _train_cli(tmp_path / 'ref', args + second_half, ['--cpu_devices=8'])
  assert reference.returncode == 0, reference.stderr[-3000:]
  expected = read_tljax_workdir(str(tmp_path / 'ref'))

  # 2 processes x 4 devices from the first step to the last.
  _multiprocess(2, 4, tmp_path / 'two', args + second_half)
  _assert_same_parameters(expected, read_tljax_workdir(str(tmp_path / 'two')))

  # Written by 2 processes x 2 devices (FSDP over 4), resumed by 1 process x 8 (replicated).
  _multiprocess(2, 2, tmp_path / 'a', args + first_half)
  resumed = _train_cli(tmp_path / 'a', args + second_half + ['--config.sharding.rule=replicate'],
                       ['--cpu_devices=8'])
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'resumed from checkpoint at step 3' in resumed.stdout
  _assert_same_parameters(expected, read_tljax_workdir(str(tmp_path / 'a')))

  # Written by 1 process x 8, resumed by 2 processes x 4 on a ('data' 4, 'model' 2) mesh.
  first = _train_cli(tmp_path / 'b', args + first_half, ['--cpu_devices=8'])
  assert first.returncode == 0, first.stderr[-3000:]
  logs = _multiprocess(2, 4, tmp_path / 'b',
                       args + second_half + ['--config.sharding.model_axis=2'])
  assert 'resumed from checkpoint at step 3' in logs
  _assert_same_parameters(expected, read_tljax_workdir(str(tmp_path / 'b')))
  results = json.loads((tmp_path / 'b' / 'results.json').read_text())
  assert results['processes'] == 2 and results['devices'] == 8
  assert results['sharding']['mesh'] == {'data': 4, 'model': 2}

  # Metrics and summaries are written once, by process 0.
  lines = [json.loads(line) for line in (tmp_path / 'b' / 'metrics.jsonl').read_text().splitlines()]
  keys = [(line['step'], line['split']) for line in lines]
  assert len(keys) == len(set(keys)) and (6, 'eval') in keys and (2, 'train') in keys
  events = [n for n in os.listdir(tmp_path / 'b') if n.startswith('events.out.tfevents')]
  assert len(events) == 2  # one per run (the 1-process run, then process 0 of the 2)
