"""Fine-tuning strategies beyond hard freezing: BitFit and norm-only presets, layer-wise
learning-rate decay, L2-SP and gradual unfreezing (LoRA: tests/test_lora.py for the adapters,
tests/test_lora_runs.py for runs with them)."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from helpers import REPO, cut_run_resumes_bit_exact, latest_state, small_config, write_npz

from tljax import build, freeze, optim, train, unfreeze
from tljax.errors import UserError
from tljax.models import MODELS, build_model, get_entry, init_variables
from tljax.resolve import resolve_config


def _flat(tree):
  """`a/b/c` -> array, for the array leaves of `tree` (optax.MaskedNode left out)."""
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep='/').items()
          if isinstance(v, (jax.Array, np.ndarray))}


def _batch(size=16, classes=3, seed=0):
  rng = np.random.default_rng(seed)
  return dict(image=jnp.asarray(rng.normal(size=(16, size, size, 3)), jnp.float32),
              label=jnp.asarray(rng.integers(0, classes, 16), jnp.int32))


# -- BitFit and norm-only -----------------------------------------------------------------------

def _norm_modules(params):
  """Ground truth from structure, not names: a module holding a `scale` is a norm layer."""
  flat = freeze.flat_paths(params)
  modules = {p.rsplit('/', 1)[0] for p in flat if p.endswith('/scale')}
  return {p for p in flat if p.rsplit('/', 1)[0] in modules}


@pytest.mark.parametrize('name', sorted(n for n in MODELS if n not in ('vit_l16', 'bert_base')))
def test_the_norm_pattern_matches_exactly_the_norm_layers_of_every_model(name):
  entry = get_entry(name)
  model = build_model(name, num_classes=3)
  size = 16 if entry.modality == 'text' else 32
  shapes = init_variables(model, size, 3, 0, entry.example_input, shapes_only=True)['params']
  matched = {p for p in freeze.flat_paths(shapes) if re.fullmatch(freeze.NORM_PARAMS, p)}
  assert matched == _norm_modules(shapes), name  # (layered_cnn has none)


@pytest.mark.slow
@pytest.mark.parametrize('preset', ['bitfit', 'norm'])
def test_bitfit_and_norm_train_only_their_leaves_and_the_head(preset):
  """ViT-Ti (biases in every Dense, LayerNorms): after steps, exactly the preset's leaves have
  changed, and SGD momentum holds one float32 per trainable parameter."""
  config = small_config(**{'freeze.preset': preset, 'optim.groups': [('.*', {})],
                           'data.image_size': 32})
  config.model = dict(name='vit_ti16', num_classes=3)
  built = build.build(resolve_config(config, source_given=True), 10)
  step = jax.jit(built.train_step())
  state = built.state
  for i in range(3):
    state, _ = step(state, _batch(32, seed=i))
  before, after = _flat(built.params), _flat(state.params)
  changed = {p for p in before if not np.array_equal(before[p], after[p])}
  norm = _norm_modules(built.params)
  expected = {p for p in before if p.startswith('head/') or p in norm
              or (preset == 'bitfit' and p.endswith('/bias'))}
  assert changed == expected
  if preset == 'bitfit':
    assert any(p.endswith('/bias') and p not in norm and not p.startswith('head/')
               for p in changed)
  trainable = sum(before[p].size for p in expected)
  arrays = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x)]
  assert sum(x.size for x in arrays) == trainable
  assert sum(x.nbytes for x in arrays) == 4 * trainable


# -- layer-wise learning-rate decay --------------------------------------------------------------

def _decay_config(**overrides):
  return small_config(**{'optim.momentum': 0.0, 'optim.lr': 0.1,
                         'optim.schedule.name': 'constant', 'optim.groups': [('.*', {})],
                         'optim.layer_decay': 0.5, **overrides})


@pytest.mark.parametrize('preset,frozen', [(None, 0), ('stages:1', 1)])
def test_layer_decay_groups_and_the_compiled_update_follow_the_stages(preset, frozen):
  """small_cnn STAGES = stem, stage1, stage2, head: the head learns at 0.1, stage2 at 0.05,
  stage1 at 0.025, the stem at 0.0125 (or is frozen under stages:1)."""
  config = _decay_config(**({'freeze.preset': preset} if preset else {}))
  built = build.build(resolve_config(config, source_given=True), 10)
  stages = get_entry('small_cnn').stages
  expected = {stage: 0.1 * 0.5 ** (len(stages) - 1 - i) for i, stage in enumerate(stages)}
  rows = freeze.summary_rows(built.params, built.groups, 0.1)
  trained = [r for r in rows if r['status'] == 'trainable']
  assert [r['lr'] for r in trained] == pytest.approx(
      [expected[s] for s in reversed(stages[frozen:])])
  table = freeze.format_table(rows)
  for stage in stages[frozen:]:
    assert f'{expected[stage]:.3g}' in table
  ones = jax.tree.map(jnp.ones_like, built.params)
  update = jax.jit(built.optimizer.update)
  updates, _ = update(ones, built.state.opt_state, built.params)
  for path, value in _flat(updates).items():
    stage = path.split('/')[0]
    want = 0.0 if stages.index(stage) < frozen else -expected[stage]
    np.testing.assert_allclose(value, want, rtol=1e-6, err_msg=path)


def test_layer_decay_multiplies_each_groups_own_rate():
  config = _decay_config(**{'optim.groups': [('head/.*', {'lr_mult': 10.0}),
                                             ('stem/.*', None), ('.*', {})]})
  built = build.build(resolve_config(config, source_given=True), 10)
  rows = freeze.summary_rows(built.params, built.groups, 0.1)
  assert sorted(r['lr'] for r in rows if r['status'] == 'trainable') == pytest.approx(
      [0.025, 0.05, 1.0])


@pytest.mark.parametrize('value', [0, 0.0, -0.5, 1.5, float('nan')])
def test_layer_decay_outside_zero_one_is_refused_naming_the_key(value):
  with pytest.raises(UserError, match=r'optim\.layer_decay'):
    resolve_config(_decay_config(**{'optim.layer_decay': value}), source_given=True)


# -- L2-SP ---------------------------------------------------------------------------------------

def test_l2sp_pulls_towards_the_pretrained_start_not_zero(earlier_run):
  """A constructed case: every leaf moved off its pretrained value, data gradients zero, the
  learning rate on. Trainable leaves decay towards their start by (1 - lr * l2sp) per step;
  the frozen stem stays where it was put."""
  run_dir, _ = earlier_run
  config = small_config(**{'init.pretrained': str(run_dir), 'optim.l2sp': 1.0,
                           'optim.momentum': 0.0, 'optim.lr': 0.1,
                           'optim.schedule.name': 'constant', 'optim.weight_decay': 0.5})
  built = build.build(resolve_config(config, source_given=True), 10)
  start = _flat(built.params)
  assert any(np.abs(v).max() > 0.05 for p, v in start.items() if p.endswith('kernel'))
  moved = jax.tree.map(lambda p: p + 1.0, built.params)
  params, opt_state = moved, built.state.opt_state
  zeros = jax.tree.map(jnp.zeros_like, built.params)
  for _ in range(10):
    updates, opt_state = built.optimizer.update(zeros, opt_state, params)
    params = jax.tree.map(lambda m, p, u: p + u if m else p, built.mask, params, updates)
  final = _flat(params)
  for path, value in final.items():
    if path.startswith('stem/'):
      np.testing.assert_array_equal(value, start[path] + 1.0)
    else:  # 1.0 * 0.9**10 away from the start, whatever weight_decay says
      np.testing.assert_allclose(value - start[path], 0.9 ** 10, rtol=1e-4, err_msg=path)


def test_l2sp_holds_the_start_once_for_trainable_leaves_only(earlier_run):
  run_dir, _ = earlier_run
  base = {'init.pretrained': str(run_dir), 'optim.momentum': 0.0}
  plain = build.build(resolve_config(small_config(**base), source_given=True), 10)
  pulled = build.build(resolve_config(small_config(**base, **{'optim.l2sp': 0.1}),
                                      source_given=True), 10)
  trainable = sum(x.nbytes for x, m in zip(jax.tree.leaves(plain.params),
                                           jax.tree.leaves(plain.mask), strict=True) if m)
  assert (optim.state_leaf_stats(pulled.state.opt_state)[1]
          - optim.state_leaf_stats(plain.state.opt_state)[1]) == trainable
  assert f'({trainable // 4:,} params) pulled' in build.l2sp_line(pulled)
  assert build.l2sp_line(plain) is None


def test_l2sp_without_pretrained_weights_is_refused_naming_the_key():
  with pytest.raises(UserError, match=r'optim\.l2sp'):
    build.build(resolve_config(small_config(**{'optim.l2sp': 0.1}), source_given=True), 10)
  with pytest.raises(UserError, match=r'optim\.l2sp'):
    resolve_config(small_config(**{'optim.l2sp': -1.0}), source_given=True)


# -- gradual unfreezing --------------------------------------------------------------------------

SMALL_STAGES = ('stem', 'stage1', 'stage2', 'head')


@pytest.mark.parametrize('key,value,message', [
    ('freeze.unfreeze', ((2, 'stage9'),), r"freeze\.unfreeze\[0\].*'stage9' is not a stage"),
    ('freeze.unfreeze', ((4, 'stage2'), (2, 'stage1')), r'freeze\.unfreeze\[1\].*increasing'),
    ('freeze.unfreeze', ((2, 'stage1'), (4, 'stage2')), r'freeze\.unfreeze\[1\].*already'),
    ('freeze.unfreeze', ((2, 'stem'),), r"freeze\.unfreeze\[0\].*'stem' stays frozen"),
    ('freeze.unfreeze', ((0, 'stage2'),), r'freeze\.unfreeze\[0\].*an integer in \[1, '),
    ('freeze.unfreeze', ((2, 'stage2', 3),), r'freeze\.unfreeze\[0\].*pair'),
    ('freeze.unfreeze', (), r'freeze\.unfreeze'),
    ('freeze.unfreeze_every', 0, r'freeze\.unfreeze_every'),
])
def test_a_bad_unfreeze_schedule_is_refused_naming_the_key(key, value, message):
  config = small_config(**{key: value})  # the stem is frozen by the groups
  with pytest.raises(UserError, match=message):
    build.build(resolve_config(config, source_given=True), 10)


def test_unfreezing_a_linear_probe_or_with_both_keys_is_refused():
  probe = small_config(**{'freeze.preset': 'linear_probe', 'optim.groups': [('.*', {})],
                          'freeze.unfreeze_every': 2})
  with pytest.raises(UserError, match='nothing to unfreeze'):
    build.build(resolve_config(probe, source_given=True), 10)
  both = small_config(**{'freeze.unfreeze_every': 2, 'freeze.unfreeze': ((2, 'stage2'),)})
  with pytest.raises(UserError, match='both set'):
    build.build(resolve_config(both, source_given=True), 10)


def test_phases_follow_the_schedule():
  every = unfreeze.phases({'unfreeze_every': 5}, SMALL_STAGES, 0)
  assert [(p.after, p.frozen) for p in every] == [(0, 3), (5, 2), (10, 1), (15, 0)]
  assert [unfreeze.phase_at(every, s) for s in (0, 1, 5, 6, 10, 11, 100)] == [0, 0, 0, 1, 1, 2, 3]
  listed = unfreeze.phases({'unfreeze': ((3, 'stage2'), (7, 'stage1'))}, SMALL_STAGES, 1)
  assert [(p.after, p.frozen) for p in listed] == [(0, 3), (3, 2), (7, 1)]


def _unfreeze_config(**overrides):
  return small_config(**{'optim.groups': [('.*', {})], 'freeze.unfreeze_every': 2,
                         'optim.schedule.name': 'constant', **overrides})


@pytest.mark.slow
def test_flops_of_each_phase_equal_the_static_stages_run():
  """A frozen stage costs only its forward pass in every phase: phase i's compiled step has
  exactly the FLOPs of a static run freezing the same stages."""
  built = build.build(resolve_config(_unfreeze_config(), source_given=True), 10)
  batch = _batch()
  assert [unfreeze.phase_at(built.unfreezing, s) for s in (1, 2, 3, 5, 7)] == [0, 0, 1, 2, 3]
  for index, spec in enumerate(built.unfreezing):
    state = built.state_for_phase(built.state, index)
    phased = jax.jit(built.train_step(phase=index)).lower(state, batch).compile()
    static = build.build(resolve_config(small_config(**{
        'optim.groups': [('.*', {})], 'optim.schedule.name': 'constant',
        'freeze.preset': f'stages:{spec.frozen}'}), source_given=True), 10)
    fixed = jax.jit(static.train_step()).lower(static.state, batch).compile()
    assert phased.cost_analysis()['flops'] == fixed.cost_analysis()['flops'], spec
    assert optim.state_leaf_stats(state.opt_state) == optim.state_leaf_stats(
        static.state.opt_state), spec


def test_entering_a_phase_keeps_the_moments_and_zeroes_the_newly_unfrozen():
  built = build.build(resolve_config(_unfreeze_config(), source_given=True), 10)
  step0 = jax.jit(built.train_step(phase=0))
  state, _ = step0(built.state, _batch())
  state, _ = step0(state, _batch(seed=1))
  moved = built.state_for_phase(state, 1)
  old = _flat(state.opt_state.inner_states['group0'].inner_state[0][0].trace)
  new = _flat(moved.opt_state.inner_states['group0'].inner_state[0][0].trace)
  assert set(old) == {p for p in new if p.startswith('head/')}
  for path, value in new.items():
    if path in old:
      np.testing.assert_array_equal(value, old[path])
      assert np.abs(value).max() > 0
    else:
      assert path.startswith('stage2/') and not value.any()
  counts = [x for x in jax.tree.leaves(moved.opt_state) if np.ndim(x) == 0]
  assert counts and all(int(c) == 2 for c in counts)


def _checkpoint_params(workdir, step):
  from tljax import checkpoint
  resume = checkpoint.restore_newest(str(workdir), None, only=step)
  return _flat(resume.state['params'])


@pytest.mark.slow
def test_a_stage_is_bitwise_unchanged_until_its_boundary_then_trains(tmp_path):
  """Boundaries every 2 steps: the head trains from step 1, stage2 from 3, stage1 from 5, the
  stem from 7; each checkpoint (one per step) shows a stage fixed before and moving after."""
  data = write_npz(tmp_path / 'data.npz')
  config = _unfreeze_config(**{'data.path': data, 'total_steps': 8, 'checkpoint_every': 1,
                               'keep_checkpoints': 10})
  results = train.run(config, str(tmp_path / 'run'))
  start = _flat(build.build(resolve_config(config), 8).params)
  by_step = {s: _checkpoint_params(tmp_path / 'run', s) for s in range(1, 9)}
  first_trained = {'head': 1, 'stage2': 3, 'stage1': 5, 'stem': 7}
  for stage, first in first_trained.items():
    paths = [p for p in start if p.startswith(f'{stage}/') and p.endswith('kernel')]
    for step, params in by_step.items():
      same = all(np.array_equal(params[p], start[p]) for p in paths)
      assert same == (step < first), (stage, step)
  phases = results['strategy']['unfreeze']
  assert [p['after'] for p in phases] == [0, 2, 4, 6]
  assert all(p['first_step_s'] > 0 for p in phases)


ENV = {**os.environ, 'JAX_PLATFORMS': 'cpu'}


def _command(workdir, data):
  return [sys.executable, '-m', 'tljax.train', f'--config={REPO}/configs/tests/arrays.py',
          f'--workdir={workdir}', f'--config.data.path={data}', '--config.total_steps=24',
          '--config.checkpoint_every=1', '--config.log_every=1', '--config.keep_checkpoints=2',
          '--config.freeze.unfreeze=((8, "stage2"), (16, "stage1"))',
          '--config.optim.schedule.name=cosine']





@pytest.mark.slow
def test_sigkill_in_phase_two_resumes_there_bit_exact(tmp_path):
  data = write_npz(tmp_path / 'data.npz')
  reference = tmp_path / 'reference'
  done = subprocess.run(_command(reference, data), cwd=REPO, env=ENV, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  killed = tmp_path / 'killed'
  process = subprocess.Popen(_command(killed, data), cwd=REPO, env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  checkpoints = killed / 'checkpoints'
  deadline = time.monotonic() + 600
  while time.monotonic() < deadline:  # a checkpoint of phase 2 (steps 9-16) is complete
    names = os.listdir(checkpoints) if checkpoints.is_dir() else []
    if any(n.isdigit() and 10 <= int(n) <= 14 for n in names):
      break
    assert process.poll() is None, 'finished before it could be killed'
    time.sleep(0.01)
  process.send_signal(signal.SIGKILL)
  process.wait()
  resumed = subprocess.run(_command(killed, data), cwd=REPO, env=ENV, capture_output=True,
                           text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  match = re.search(r'resumed from checkpoint at step (\d+)', resumed.stdout)
  assert match and 9 <= int(match.group(1)) <= 16, resumed.stdout[-2000:]
  expected, actual = latest_state(reference), latest_state(killed)
  assert expected.keys() == actual.keys()
  for key in expected:
    np.testing.assert_array_equal(expected[key], actual[key], err_msg=key)
  results = json.loads((killed / 'results.json').read_text())
  assert [p['frozen_stages'] for p in results['strategy']['unfreeze']] == [3, 2, 1]


def test_strategy_keys_reach_results_json(tmp_path):
  data = write_npz(tmp_path / 'data.npz')
  config = small_config(**{'data.path': data, 'optim.layer_decay': 0.8,
                           'optim.groups': [('.*', {})]})
  results = train.run(config, str(tmp_path / 'run'))
  saved = json.loads((tmp_path / 'run' / 'results.json').read_text())
  assert saved['strategy']['layer_decay'] == 0.8 == results['strategy']['layer_decay']
  assert saved['strategy']['unfreeze'] is None and saved['strategy']['lora'] is None



@pytest.mark.parametrize('bad,key', [
    ({'lora.rank': 2, 'lora.targets': ('nothing/kernel',)}, 'lora.targets[0]'),
    ({'freeze.unfreeze': ((2, 'stage9'),)}, 'freeze.unfreeze[0]'),
    ({'optim.l2sp': 0.1}, 'optim.l2sp'),
])
def test_a_sweep_refuses_a_bad_strategy_variant_before_the_first_runs(tmp_path, bad, key):
  from tljax import ablate
  from tljax.sweep import Sweep
  data = write_npz(tmp_path / 'data.npz')
  base = tmp_path / 'base.py'
  base.write_text('from helpers import small_config\n\n\ndef get_config(arg=None):\n'
                  f'  return small_config(**{{"data.path": {data!r}}})\n')
  sweep = Sweep(base=str(base), variants=[('fine', {}), ('bad', bad)])
  with pytest.raises(UserError, match=re.escape(key)) as raised:
    ablate.run_sweep(sweep, str(tmp_path / 'sweep'))
  assert "sweep variant 'bad'" in str(raised.value)
  assert not (tmp_path / 'sweep' / 'fine').exists()


def test_a_checkpoint_selected_in_an_earlier_phase_is_restored_and_evaluated(tmp_path):
  """select.mode='min' on accuracy picks an early, weak checkpoint: one of phase 0 or 1, whose
  optimizer state has another structure than the last phase's; it is restored into its own."""
  data = write_npz(tmp_path / 'data.npz')
  config = _unfreeze_config(**{'data.path': data, 'total_steps': 8, 'checkpoint_every': 100,
                               'eval_every': 2, 'data.val_split': 0.25,
                               'select.mode': 'min'})
  results = train.run(config, str(tmp_path / 'run'))
  assert results['selected_step'] <= 4 < results['final_step']
  assert results['best']['val']['accuracy'] <= results['last']['val']['accuracy']


def test_unfreezing_reaches_down_to_trainable_adapters_of_a_linear_probe():
  config = small_config(**{'freeze.preset': 'linear_probe', 'optim.groups': [('.*', {})],
                           'lora.rank': 2, 'lora.targets': ('head/kernel',),
                           'freeze.unfreeze_every': 2})
  with pytest.raises(UserError, match='nothing to unfreeze'):  # adapters only in the head
    build.build(resolve_config(config, source_given=True), 10)
  labels = {'stage1': {'conv': {'kernel': 'frozen'}},
            'lora': {'stage1': {'conv': {'a': 'group0'}}}, 'head': {'kernel': 'group0'}}
  assert freeze.frozen_stage_count(labels, SMALL_STAGES) == 1  # stem only: stage1 adapts


def test_boundaries_past_the_last_step_are_named_in_a_warning():
  schedule = unfreeze.phases({'unfreeze': ((2, 'stage2'), (8, 'stage1'))}, SMALL_STAGES, 1)
  assert unfreeze.unreached(schedule, SMALL_STAGES, 9) is None
  late = unfreeze.unreached(schedule, SMALL_STAGES, 8)
  assert late.startswith('warning:') and 'stage1 never train' in late
  assert 'stage1, stage2 never train' in unfreeze.unreached(schedule, SMALL_STAGES, 2)
  with pytest.raises(UserError, match=r'freeze\.unfreeze\[0\]'):
    unfreeze.phases({'unfreeze': ((2**40, 'stage2'),)}, SMALL_STAGES, 1)


@pytest.mark.slow
def test_pmap_on_eight_devices_enters_phases_and_resumes_bit_exact(tmp_path):
  """pmap replicates the state over 8 simulated devices; entering a phase and restoring a
  checkpoint place host values on every device (committed arrays were refused before)."""
  data = write_npz(tmp_path / 'data.npz')
  config = _unfreeze_config(**{'data.path': data, 'parallel': 'pmap', 'total_steps': 8,
                               'checkpoint_every': 3})
  whole, resumed = cut_run_resumes_bit_exact(config, tmp_path, 8)
  assert whole['parallel'] == 'pmap' and whole['devices'] == 8
  assert resumed['resumed_from_step'] == 6
