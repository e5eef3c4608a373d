"""Cost features, checked by results and compiled programs (never by timings): feature caching,
trainable-only differentiation, mixed precision and gradient accumulation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import small_config, step_parts

from tljax import build, features, freeze, resolve, steps, train
from tljax import config as config_lib
from tljax.errors import UserError
from tljax.weights.read import read_tljax_workdir


def _run(tmp_path, name, npz_path, **overrides):
  config = small_config(**{'data.path': npz_path, 'data.augment': False, **overrides})
  config.optim.groups = [('.*', {})]
  config.total_steps, config.checkpoint_every = 10, 10  # 48 examples: 3 steps/epoch, reshuffled
  workdir = tmp_path / name
  results = train.run(config, str(workdir))
  return results, read_tljax_workdir(str(workdir))


@pytest.mark.slow
@pytest.mark.parametrize('preset', ['linear_probe', 'stages:2'])
def test_cached_features_train_the_same_parameters_as_images(tmp_path, npz_path, preset):
  plain, plain_vars = _run(tmp_path, 'plain', npz_path, **{'freeze.preset': preset})
  cached, cached_vars = _run(tmp_path, 'cached', npz_path, **{'freeze.preset': preset,
                                                               'data.cache_features': True})
  assert plain['feature_cache'] is None
  assert cached['feature_cache']['stage'] == ('head' if preset == 'linear_probe' else 'stage2')
  assert cached['feature_cache']['examples'] == 48
  initial = _initial(npz_path, preset)
  trainable = [p for p in initial if p.startswith(('params/head/', 'params/stage2/'))
               and (preset != 'linear_probe' or p.startswith('params/head/'))]
  assert trainable
  for path in initial:
    if path in trainable:
      assert not np.array_equal(initial[path], plain_vars[path]), path
      np.testing.assert_allclose(cached_vars[path], plain_vars[path], rtol=1e-5, atol=1e-6,
                                 err_msg=path)
    elif path.startswith('params/'):  # frozen: bitwise the initial values in both runs
      assert np.array_equal(cached_vars[path], initial[path]), path
  np.testing.assert_allclose(cached['eval']['loss'], plain['eval']['loss'], rtol=1e-5)


def _probe_config(npz_path, preset='linear_probe'):
  config = small_config(**{'data.path': npz_path, 'freeze.preset': preset})
  config.optim.groups = [('.*', {})]
  return resolve.resolve_config(config)


def _initial(npz_path, preset):
  config = _probe_config(npz_path, preset)
  built = build.build(config)
  return freeze.flat_paths({'params': built.params, 'batch_stats': built.batch_stats})


def test_cached_step_compiles_without_the_frozen_prefix(npz_path):
  model, optimizer, mask, schedule, state = step_parts(_probe_config(npz_path), 10)
  images = jnp.zeros((16, 16, 16, 3))
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  cached = features.compute(model, variables, [dict(image=images, label=np.zeros(16))], 'head')
  plain_batch = dict(image=images, label=jnp.zeros(16, jnp.int32))
  cached_batch = dict(features=jnp.asarray(cached['features']), label=plain_batch['label'])
  flops = {}
  for name, step_model, batch, keys in (
      ('plain', model, plain_batch, ('image',)),
      ('cached', features.FromCut(model, 'head', (16, 16, 3)), cached_batch, ('features',))):
    step = jax.jit(steps.make_train_step(step_model, optimizer, mask, schedule, 0,
                                         input_keys=keys))
    flops[name] = step.lower(state, batch).compile().cost_analysis()['flops']
  assert cached['features'].shape == (16, 16)  # the pooled features the head reads
  assert flops['cached'] < 0.05 * flops['plain'], flops


def test_cache_refuses_augmentation_an_unfrozen_model_and_random_prefixes():
  stages = ('stem', 'stage1', 'head')
  with pytest.raises(UserError, match='data.augment=False'):
    features.cut_stage(stages, 2, augment=True)
  with pytest.raises(UserError, match=r"data.cache_features needs frozen leading stages .*; none "
                                      r"of \['stem', 'stage1', 'head'\] is frozen"):
    features.cut_stage(stages, 0, augment=False)

  class DropoutBeforeHead(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      x = nn.Dense(8, name='stem')(x)
      x = nn.Dropout(0.5, deterministic=not train)(x)
      return nn.Dense(2, name='head')(x)

  model = DropoutBeforeHead()
  x = jnp.ones((4, 3))
  variables = model.init(jax.random.key(0), x)
  with pytest.raises(UserError, match=r"the frozen layers before stage 'head' are random in "
                                      r"training \(dropout\); set the model's dropout before"):
    features.compute(model, variables, [dict(image=x, label=np.zeros(4))], 'head')


def _layered_setup(groups, **optim_overrides):
  config = small_config()
  config.model = dict(name='layered_cnn', num_classes=3, conv_widths=(4, 4, 8, 8),
                      dense_width=16)
  config.optim.update(groups=groups, **optim_overrides)
  model, optimizer, mask, schedule, state = step_parts(config_lib.resolve(config), 10)
  rng = np.random.default_rng(0)
  batch = dict(image=jnp.asarray(rng.normal(size=(16, 16, 16, 3)), jnp.float32),
               label=jnp.asarray(rng.integers(0, 3, 16), jnp.int32))
  return model, optimizer, mask, schedule, state, batch


@pytest.mark.slow
def test_gradients_of_frozen_layers_are_not_computed_even_with_clipping():
  """XLA FLOPs per step fall with freeze depth although clipping and grad_norm read the
  gradients; a plain value_and_grad over all leaves keeps them."""
  stages = ('conv1', 'conv2', 'conv3', 'conv4', 'fc5', 'fc6', 'head')
  flops = []
  for depth in (0, 2, 4, 6):
    model, optimizer, mask, schedule, state, batch = _layered_setup(
        freeze.stage_groups(stages, depth), clip_norm=1.0)
    step = jax.jit(steps.make_train_step(model, optimizer, mask, schedule, 0))
    flops.append(step.lower(state, batch).compile().cost_analysis()['flops'])

  def plain_step(state, batch):  # gradients of every leaf, frozen ones zeroed by the optimizer
    def loss_fn(params):
      return jnp.mean(steps.cross_entropy(model.apply({'params': params}, batch['image']),
                                          batch['label']))
    grads = jax.grad(loss_fn)(state.params)
    updates, _ = optimizer.update(grads, state.opt_state, state.params)
    return optax.apply_updates(state.params, updates), optax.tree.norm(grads)

  plain = jax.jit(plain_step).lower(state, batch).compile().cost_analysis()['flops']
  assert flops == sorted(flops, reverse=True) and len(set(flops)) == 4, flops
  assert flops[-1] < 0.5 * plain, (flops, plain)  # linear probe: forward plus the head


@pytest.mark.slow
def test_grad_accumulation_matches_one_full_batch():
  groups = [('conv1/.*', None), ('.*', {})]
  results = []
  for accumulate in (1, 4):
    model, optimizer, mask, schedule, state, batch = _layered_setup(groups)
    step = jax.jit(steps.make_train_step(model, optimizer, mask, schedule, 0,
                                         grad_accum_steps=accumulate))
    for _ in range(3):
      state, metrics = step(state, batch)
    results.append((state.params, metrics))
  (full, full_metrics), (accumulated, accumulated_metrics) = results
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6),
               full, accumulated)
  np.testing.assert_allclose(full_metrics['loss'], accumulated_metrics['loss'], rtol=1e-5)
  assert np.array_equal(full['conv1']['kernel'], _layered_setup(groups)[4].params['conv1'][
      'kernel'])


def test_grad_accumulation_must_divide_the_per_device_batch(tmp_path, npz_path):
  config = small_config(**{'data.path': npz_path, 'optim.grad_accum_steps': 3})
  with pytest.raises(UserError, match='optim.grad_accum_steps=3 must be >= 1 and divide the '
                                      'per-device batch of 2'):
    train.run(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run' / 'checkpoints').exists()


def test_bfloat16_training_computes_in_bfloat16_and_stays_finite(tmp_path, npz_path):
  config = small_config(**{'data.path': npz_path, 'compute_dtype': 'bfloat16'})
  config.total_steps = 12
  results = train.run(config, str(tmp_path / 'bf16'))
  after = read_tljax_workdir(str(tmp_path / 'bf16'))
  assert all(np.all(np.isfinite(v)) for v in after.values())
  assert all(v.dtype == np.float32 for k, v in after.items() if k.startswith('params/'))
  assert np.isfinite(results['eval']['loss']) and results['compute_dtype'] == 'bfloat16'
  # The convolutions of the compiled step really run in bfloat16.
  model, optimizer, mask, schedule, state = step_parts(resolve.resolve_config(config), 10)
  batch = dict(image=jnp.zeros((16, 16, 16, 3)), label=jnp.zeros(16, jnp.int32))
  step = steps.make_train_step(model.clone(dtype=jnp.bfloat16), optimizer, mask, schedule, 0,
                               compute_dtype=jnp.bfloat16)
  convolutions = [line for line in jax.jit(step).lower(state, batch).as_text().splitlines()
                  if 'stablehlo.convolution' in line]
  assert convolutions and all('bf16' in line and 'f32' not in line for line in convolutions)


def test_compute_dtype_is_checked(tmp_path, npz_path):
  config = small_config(**{'data.path': npz_path, 'compute_dtype': 'fp8'})
  with pytest.raises(UserError, match="compute_dtype must be one of .* got 'fp8'"):
    train.run(config, str(tmp_path / 'run'))
