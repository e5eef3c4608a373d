"""LoRA: strict target patterns, adapters that start as a no-op, a merge that computes what the
adapted model computes, gradients to the adapters, adapter dropout, and the feature cache."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tljax import features, lora
from tljax.freeze import flat_paths
from tljax.models import build_model
from tljax.models.layers import PointwiseConv

IMAGES = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
TOKENS = (jax.random.randint(jax.random.key(2), (2, 16), 0, 100),
          jnp.array([[1] * 16, [1] * 10 + [0] * 6]), jnp.zeros((2, 16), jnp.int32))


def _random_variables(model, inputs, seed=0):
  """Variables of `model` with random values (no zero head), made without running its
  initialisers: eager init of a whole network compiles each initialiser and takes seconds."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs, train=False))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name in ('var', 'scale'):
      return jnp.ones(leaf.shape, leaf.dtype)
    if name == 'kernel':
      attention_in = leaf.ndim == 3 and path[-2].key != 'out'  # (in, heads, head_dim)
      fan_in = leaf.shape[0] if attention_in else int(np.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.normal(0, 1 / np.sqrt(fan_in), leaf.shape), leaf.dtype)
    return jnp.asarray(rng.normal(0, 0.02, leaf.shape), leaf.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def _with_random_b(params, seed=5):
  """Adapters with nonzero B, so the adapted model differs from the base."""
  rng = np.random.default_rng(seed)
  return {**params, lora.LORA: jax.tree.map(
      lambda x: jnp.asarray(x + rng.normal(0, 0.2, x.shape), x.dtype), params[lora.LORA])}


def _apply(model, variables, inputs, **kwargs):
  """`model.apply` compiled: running a whole network op by op compiles every op on its own."""
  return jax.jit(lambda v, xs: model.apply(v, *xs, **kwargs))(variables, inputs)


MOBILENET_TARGETS = [r'stage\d/block\d/(expand|project)_conv/kernel', 'final/conv/kernel',
                     'head/kernel']
ATTENTION_TARGETS = [r'layer\d/attn/(query|key|value|out)/kernel', r'layer\d/fc[12]/kernel']
RESNET_TARGETS = [r'layer\d/block0/downsample/conv/kernel', 'head/kernel']  # 1x1, stride 2


@pytest.fixture(scope='module')
def resnet():
  model = build_model('resnet18', num_classes=3, width=8)
  return model, _random_variables(model, (IMAGES,)), (IMAGES,)


@pytest.fixture(scope='module')
def minilm():
  model = build_model('minilm_l6', num_classes=3, depth=2, vocab_size=100, dropout=0.0)
  return model, _random_variables(model, TOKENS), TOKENS


# ---------------------------------------------------------------- targets and rank


def test_find_targets_takes_exactly_the_pointwise_convs_of_mobilenet():
  model = build_model('mobilenet_v2', num_classes=3)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), IMAGES, train=False))['params']
  targets = lora.find_targets(params, [r'.*(expand|project)_conv/kernel|final/conv/kernel'])
  pointwise = {path: (leaf.shape[2], leaf.shape[3]) for path, leaf in flat_paths(params).items()
               if leaf.ndim == 4 and leaf.shape[:2] == (1, 1)}
  assert targets == pointwise
  assert len(targets) == 16 * 2 + 1 + 1  # 16 expanding blocks, stage1's project, final
  assert targets['stage3/block0/expand_conv/kernel'] == (24, 144)
  assert targets['final/conv/kernel'] == (320, 1280)


def test_find_targets_reads_attention_kernels_as_matrices():
  model = build_model('minilm_l6', num_classes=3)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), *TOKENS, train=False))['params']
  targets = lora.find_targets(params, ATTENTION_TARGETS)
  assert len(targets) == 6 * 6
  for i in range(6):  # query/key/value (384, 12, 32) -> (384, 384); out (12, 32, 384) likewise
    for name in ('query', 'key', 'value', 'out'):
      assert targets[f'layer{i}/attn/{name}/kernel'] == (384, 384)
    assert targets[f'layer{i}/fc1/kernel'] == (384, 1536)
    assert targets[f'layer{i}/fc2/kernel'] == (1536, 384)


PARAMS = {'stem': {'conv': {'kernel': np.zeros((3, 3, 3, 6))},
                   'bn': {'scale': np.ones(6), 'bias': np.zeros(6)}},
          'block': {'dw': {'kernel': np.zeros((3, 3, 1, 6))},
                    'pw': {'kernel': np.zeros((1, 1, 6, 8))},
                    'grouped': {'kernel': np.zeros((3, 3, 2, 6))}},
          'embed': {'embedding': np.zeros((10, 6))},
          'attn': {'query': {'kernel': np.zeros((6, 2, 4))},
                   'out': {'kernel': np.zeros((2, 4, 6))}},
          'head': {'kernel': np.zeros((8, 3)), 'bias': np.zeros(3)}}


def test_find_targets_on_each_kind_of_matrix():
  targets = lora.find_targets(PARAMS, ['block/pw/kernel', 'attn/.*/kernel', 'head/kernel'])
  assert targets == {'block/pw/kernel': (6, 8), 'attn/query/kernel': (6, 8),
                     'attn/out/kernel': (8, 6), 'head/kernel': (8, 3)}


@pytest.mark.parametrize('patterns,message', [
    (['head/kernel', 'stage9/.*'], r"lora\.targets\[1\] 'stage9/\.\*' matches no parameter"),
    (['head/.*'], r'lora\.targets\[0\].*head/bias.*not a kernel'),
    (['block/pw/kernel', 'stem/.*/kernel'], r'lora\.targets\[1\].*stem/conv/kernel.*3x3 conv'),
    (['block/.*/kernel'], r'lora\.targets\[0\].*block/dw/kernel.*depthwise 3x3'),
    (['block/grouped/kernel'], r'lora\.targets\[0\].*block/grouped/kernel.*3x3 conv'),
    (['embed/.*'], r'lora\.targets\[0\].*embed/embedding.*not a kernel'),
    (['head/kernel', '(head'], r'lora\.targets\[1\] .*is not a regex'),
    ([], r'lora\.targets must be a non-empty list'),
    ('head/kernel', r'lora\.targets must be a non-empty list'),
])
def test_bad_target_is_refused_by_its_index_and_path(patterns, message):
  with pytest.raises(lora.LoraError, match=message):
    lora.find_targets(PARAMS, patterns)


def test_adapter_subtree_is_never_a_target():
  params = lora.init_adapters(PARAMS, {'head/kernel': (8, 3)}, 2, 0)
  assert lora.find_targets(params, ['head/kernel|.*/a']) == {'head/kernel': (8, 3)}
  with pytest.raises(lora.LoraError, match=r'lora\.targets\[0\].*matches no parameter'):
    lora.find_targets(params, ['lora/.*'])


@pytest.mark.parametrize('rank', [0, -1, 2.0, True, None])
def test_rank_must_be_a_positive_integer(rank):
  with pytest.raises(lora.LoraError, match=r'lora\.rank'):
    lora.check_rank(rank, {'head/kernel': (8, 3)})


def test_rank_above_the_smallest_side_names_that_kernel():
  shapes = {'big/kernel': (64, 64), 'head/kernel': (8, 3), 'mid/kernel': (4, 16)}
  lora.check_rank(3, shapes)
  with pytest.raises(lora.LoraError, match=r'lora\.rank=4 .*head/kernel \(matrix 8x3\).*at most 3'):
    lora.check_rank(4, shapes)


def test_alpha_and_dropout_are_checked():
  assert lora.scale(16, 8) == 2.0
  for alpha in (0, -1.0, float('nan'), '8'):
    with pytest.raises(lora.LoraError, match=r'lora\.alpha'):
      lora.scale(alpha, 4)
  for dropout in (-0.1, 1.0, 'x'):
    with pytest.raises(lora.LoraError, match=r'lora\.dropout'):
      lora.LoraModel(nn.Dense(3), {'kernel': (4, 3)}, 8.0, 2, dropout)


# ---------------------------------------------------------------- adapters


def test_init_adapters_mirrors_module_paths_and_is_seeded():
  targets = {'block/pw/kernel': (6, 8), 'attn/out/kernel': (8, 6), 'head/kernel': (8, 3)}
  params = lora.init_adapters(PARAMS, targets, 2, seed=0)
  adapters = params[lora.LORA]
  assert set(flat_paths(adapters)) == {'block/pw/a', 'block/pw/b', 'attn/out/a', 'attn/out/b',
                                       'head/a', 'head/b'}
  a, b = adapters['block']['pw']['a'], adapters['block']['pw']['b']
  assert a.shape == (6, 2) and b.shape == (2, 8) and a.dtype == b.dtype == jnp.float32
  assert not np.any(b) and np.all(np.abs(a) <= 1 / np.sqrt(6)) and np.std(a) > 0
  assert params['head'] is PARAMS['head']  # the base params are untouched
  again, other = (lora.init_adapters(PARAMS, targets, 2, seed) for seed in (0, 1))
  assert np.array_equal(again[lora.LORA]['head']['a'], adapters['head']['a'])
  assert not np.array_equal(other[lora.LORA]['head']['a'], adapters['head']['a'])
  assert lora.adapter_count(params) == 2 * (6 + 8) + 2 * (8 + 6) + 2 * (8 + 3)
  with pytest.raises(lora.LoraError, match='already hold'):
    lora.init_adapters(params, targets, 2, 0)


# ---------------------------------------------------------------- merge


class _Strided(nn.Module):
  """flax's own 1x1 Conv (strided) and PointwiseConv (strided), then a Dense."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.Conv(8, (1, 1), strides=2, name='conv')(x))
    x = nn.relu(PointwiseConv(6, stride=2, name='pointwise')(x))
    return nn.Dense(3, name='head')(jnp.mean(x, axis=(1, 2)))


MERGE_CASES = {
    'mobilenet': (lambda: build_model('mobilenet_v2', num_classes=3, width_mult=0.35), (IMAGES,),
                  MOBILENET_TARGETS),
    'resnet_strided_downsample': (lambda: build_model('resnet18', num_classes=3, width=8),
                                  (IMAGES,), RESNET_TARGETS),
    'minilm_attention_and_mlp': (lambda: build_model('minilm_l6', num_classes=3, depth=2,
                                                     vocab_size=100), TOKENS, ATTENTION_TARGETS),
    'vit_attention_and_head': (lambda: build_model('vit_ti16', num_classes=3), (IMAGES,),
                               [r'block(0|11)/attn/(query|value|out)/kernel', 'head/kernel']),
    'flax_conv_and_pointwise': (_Strided, (IMAGES,), ['conv/kernel', 'pointwise/kernel',
                                                      'head/kernel']),
}


@pytest.mark.parametrize('case', sorted(MERGE_CASES))
def test_adapters_start_as_the_base_model_and_merge_exactly(case):
  """Step 0 (B zero) is the base model bit for bit; with B moved, the adapted model differs
  and the merged kernels compute what it computes."""
  make, inputs, patterns = MERGE_CASES[case]
  model = make()
  variables = _random_variables(model, inputs)
  targets = lora.find_targets(variables['params'], patterns)
  if case == 'resnet_strided_downsample':
    assert targets['layer2/block0/downsample/conv/kernel'] == (8, 16)
  adapted = jax.jit(lambda v, xs: lora.LoraModel(model, targets, 4.0, 2).apply(
      v, *xs, train=False))
  plain = jax.jit(lambda v, xs: model.apply(v, *xs, train=False))
  start = lora.init_adapters(variables['params'], targets, 2, 0)
  base = plain(variables, inputs)
  assert np.array_equal(adapted({**variables, 'params': start}, inputs), base)
  params = _with_random_b(start)
  moved = adapted({**variables, 'params': params}, inputs)
  assert np.max(np.abs(moved - base)) > 1e-2 * np.max(np.abs(base))
  merged_params = lora.merge(params, 4.0, 2)
  assert jax.tree.structure(merged_params) == jax.tree.structure(variables['params'])
  merged = plain({**variables, 'params': merged_params}, inputs)
  np.testing.assert_allclose(merged, moved, rtol=1e-5, atol=1e-5 * np.max(np.abs(moved)))


def test_merge_refuses_adapters_of_another_rank():
  params = lora.init_adapters(PARAMS, {'head/kernel': (8, 3)}, 2, 0)
  with pytest.raises(lora.LoraError, match=r'lora\.rank'):
    lora.merge(params, 4.0, 3)
  with pytest.raises(lora.LoraError, match='no .lora. subtree'):
    lora.merge(PARAMS, 4.0, 2)


# ---------------------------------------------------------------- refusals at apply


def test_a_kernel_of_a_module_lora_cannot_adapt_is_refused_at_apply(minilm):
  model, variables, inputs = minilm  # BERT's head multiplies its own kernel after pooling
  targets = lora.find_targets(variables['params'], ['head/kernel'])
  params = lora.init_adapters(variables['params'], targets, 2, 0)
  with pytest.raises(lora.LoraError, match=r'lora\.targets: head/kernel belongs to a _Head'):
    jax.eval_shape(lambda v: lora.LoraModel(model, targets, 4.0, 2).apply(v, *inputs),
                   {**variables, 'params': params})


def test_grouped_pointwise_conv_and_unused_targets_are_refused():
  grouped = nn.Conv(8, (1, 1), feature_group_count=2, use_bias=False)
  x = jnp.ones((1, 4, 4, 6))
  model = nn.Sequential([grouped])
  params = model.init(jax.random.key(0), x)['params']  # kernel (1, 1, 3, 8): reads as 3x8
  targets = lora.find_targets(params, ['layers_0/kernel'])
  assert targets == {'layers_0/kernel': (3, 8)}
  with pytest.raises(lora.LoraError, match='layers_0/kernel .*not a plain 1x1 convolution'):
    lora.LoraModel(model, targets, 2.0, 1).apply(
        {'params': lora.init_adapters(params, targets, 1, 0)}, x)
  dense = nn.Dense(3)
  dense_params = {'params': dense.init(jax.random.key(0), x)['params']}
  unused = {'elsewhere/kernel': (6, 3)}
  with pytest.raises(lora.LoraError, match='never calls the module of elsewhere/kernel'):
    lora.LoraModel(dense, unused, 2.0, 1).apply(
        {'params': lora.init_adapters(dense_params['params'], unused, 1, 0)}, x)
  with pytest.raises(lora.LoraError, match='no .lora. subtree'):
    lora.LoraModel(dense, unused, 2.0, 1).apply(dense_params, x)


# ---------------------------------------------------------------- training


def test_gradients_reach_b_at_step_zero_and_a_after(minilm):
  model, variables, inputs = minilm
  targets = lora.find_targets(variables['params'], ATTENTION_TARGETS)
  params = lora.init_adapters(variables['params'], targets, 2, 0)
  adapted = lora.LoraModel(model, targets, 4.0, 2)

  def loss(adapters, params):
    logits = adapted.apply({**variables, 'params': {**params, lora.LORA: adapters}}, *inputs,
                           train=False)
    return jnp.sum(jnp.sin(logits))

  grad = jax.jit(jax.grad(loss))
  grads = flat_paths(grad(params[lora.LORA], params))
  assert all(np.any(g) for path, g in grads.items() if path.endswith('/b')), 'B gets no gradient'
  assert not any(np.any(g) for path, g in grads.items() if path.endswith('/a'))  # B is zero
  moved = _with_random_b(params)
  grads = flat_paths(grad(moved[lora.LORA], moved))
  assert all(np.any(g) for g in grads.values())


def test_adapter_dropout_only_in_training_and_seeded(minilm):
  model, variables, inputs = minilm  # the base model's own dropout is 0
  targets = lora.find_targets(variables['params'], ATTENTION_TARGETS)
  params = _with_random_b(lora.init_adapters(variables['params'], targets, 4, 0))
  variables = {**variables, 'params': params}
  adapted = lora.LoraModel(model, targets, 8.0, 4, dropout=0.3)
  run = lambda train, seed: adapted.apply(  # noqa: E731
      variables, *inputs, train=train, rngs={'dropout': jax.random.key(seed)})
  evaluated = run(False, 0)
  assert np.array_equal(evaluated, adapted.apply(variables, *inputs, train=False))
  first, again, other = run(True, 0), run(True, 0), run(True, 1)
  assert not np.allclose(first, evaluated)
  assert np.array_equal(first, again)
  assert not np.allclose(first, other)
  no_dropout = lora.LoraModel(model, targets, 8.0, 4, dropout=0.0)
  assert np.array_equal(no_dropout.apply(variables, *inputs, train=True,
                                         rngs={'dropout': jax.random.key(0)}), evaluated)


def test_clone_keeps_adapters_and_attributes_are_the_base_models(resnet):
  model, variables, inputs = resnet
  targets = lora.find_targets(variables['params'], RESNET_TARGETS)
  adapted = lora.LoraModel(model, targets, 4.0, 2, dropout=0.1)
  assert adapted.norm is model.norm and adapted.width == 8
  assert not hasattr(adapted, 'no_such_attribute')
  half = adapted.clone(dtype=jnp.bfloat16)
  assert isinstance(half, lora.LoraModel) and half.dtype == jnp.bfloat16
  assert half.targets == targets and half.lora_dropout == 0.1 and model.dtype == jnp.float32
  params = _with_random_b(lora.init_adapters(variables['params'], targets, 2, 0))
  cast = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  logits = _apply(half, {**variables, 'params': cast}, inputs, train=False)
  full = _apply(adapted, {**variables, 'params': params}, inputs, train=False)
  assert logits.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(logits, np.float32), full, rtol=0.1,
                             atol=0.1 * np.max(np.abs(full)))


# ---------------------------------------------------------------- with the feature cache


@pytest.mark.parametrize('stage', ['layer3', 'head'])
def test_feature_cache_wraps_the_adapted_model(resnet, stage):
  """The cache's prefix and FromCut's suffix both see the adapters; at the head (itself a
  target) FromCut's replaced input is what the adapter reads."""
  model, variables, inputs = resnet
  targets = lora.find_targets(variables['params'], RESNET_TARGETS)
  params = _with_random_b(lora.init_adapters(variables['params'], targets, 2, 0))
  adapted, lora_variables = lora.LoraModel(model, targets, 4.0, 2), {**variables, 'params': params}
  prefix = lambda m: jax.jit(lambda v: features.prefix_features(m, v, inputs, stage))  # noqa: E731
  cached = prefix(adapted)(lora_variables)
  merged = prefix(model)({**variables, 'params': lora.merge(params, 4.0, 2)})
  np.testing.assert_allclose(cached, merged, rtol=1e-5, atol=1e-5 * np.max(np.abs(merged)))
  assert not np.allclose(cached, prefix(model)(variables))
  suffix = features.FromCut(adapted, stage, IMAGES.shape[1:])
  from_cut = jax.jit(lambda v, f: suffix.apply(v, f, train=False))(lora_variables, cached)
  whole = _apply(adapted, lora_variables, inputs, train=False)
  np.testing.assert_allclose(from_cut, whole, rtol=1e-6, atol=1e-6 * np.max(np.abs(whole)))
