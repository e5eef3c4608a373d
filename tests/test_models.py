"""Models: published parameter counts, STAGES covering every parameter in forward order,
depthwise formulations."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tljax.freeze import flat_paths
from tljax.models import MODELS, build_model
from tljax.models.layers import DepthwiseConv, PointwiseConv


def _param_shapes(name, size=64, **kwargs):
  model = build_model(name, **kwargs)
  inputs = MODELS[name].example_input(size, 3)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs, train=False))
  return flat_paths(variables['params'])


# Published parameter counts at 1000 classes (torchvision; timm for EfficientNet-Lite0).
@pytest.mark.parametrize('name,count', [('resnet18', 11_689_512), ('resnet50', 25_557_032),
                                        ('mobilenet_v2', 3_504_872),
                                        ('efficientnet_lite0', 4_652_008),
                                        ('vit_b16', 86_567_656)])
def test_parameter_counts_match_torchvision(name, count):
  shapes = _param_shapes(name, size=224, num_classes=1000)  # ViT's posemb depends on size
  assert sum(int(np.prod(s.shape)) for s in shapes.values()) == count


def _paths_in_definition_order(name, size=64, **kwargs):
  """Parameter paths in the order the model creates them (its forward order). Read inside the
  traced function: the tree eval_shape returns has its dict keys sorted."""
  model = build_model(name, **kwargs)
  inputs = MODELS[name].example_input(size, 3)
  paths = []

  def init():
    variables = model.init(jax.random.key(0), *inputs, train=False)
    paths.extend(flat_paths(variables['params']))
    return variables
  jax.eval_shape(init)
  return paths


@pytest.mark.parametrize('name', sorted(MODELS))
def test_stages_cover_every_parameter_in_order(name):
  stages = MODELS[name].stages
  paths = _paths_in_definition_order(name, num_classes=7)
  owners = [next((s for s in stages if p.startswith(s + '/')), None) for p in paths]
  assert None not in owners, [p for p, s in zip(paths, owners, strict=True) if s is None]
  # Each stage's parameters are one run, and the runs come in STAGES order: freezing the first
  # K stages freezes a prefix of the network.
  runs = [owner for i, owner in enumerate(owners) if i == 0 or owners[i - 1] != owner]
  assert runs == list(stages)
  assert stages[-1] == 'head'


def _assert_same_forward_and_backward(module, reference, params, x, grad_atol):
  """The same outputs, and the same gradients with respect to the parameters and the input."""
  out, out_ref = module.apply(params, x), reference.apply(params, x)
  assert out.shape == out_ref.shape
  np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-5)

  def loss(m):
    return lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)))
  grads = jax.grad(loss(module), argnums=(0, 1))(params, x)
  grads_ref = jax.grad(loss(reference), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=grad_atol)


@pytest.mark.parametrize('stride', [1, 2])
def test_depthwise_shifted_equals_grouped_conv(stride):
  x = jax.random.normal(jax.random.key(1), (2, 9, 10, 6))
  shifted = DepthwiseConv(stride=stride, impl='shifted')
  grouped = DepthwiseConv(stride=stride, impl='grouped')
  params = shifted.init(jax.random.key(2), x)
  _assert_same_forward_and_backward(shifted, grouped, params, x, grad_atol=1e-4)


def test_depthwise_matches_flax_conv_with_feature_groups():
  """An independent reference: nn.Conv with feature_group_count and the same kernel."""
  x = jax.random.normal(jax.random.key(3), (1, 8, 8, 4))
  ours = DepthwiseConv(stride=2, impl='shifted')
  params = ours.init(jax.random.key(4), x)
  ref = nn.Conv(4, (3, 3), (2, 2), padding=((1, 1), (1, 1)), feature_group_count=4,
                use_bias=False)
  out_ref = ref.apply({'params': {'kernel': params['params']['kernel']}}, x)
  np.testing.assert_allclose(ours.apply(params, x), out_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('stride,padding', [(1, 'pytorch'), (2, 'pytorch'), (2, 'SAME')])
def test_pointwise_conv_equals_flax_1x1_conv_forward_and_backward(stride, padding):
  """The matrix-product 1x1 conv against nn.Conv on the same kernel, odd sizes included."""
  x = jax.random.normal(jax.random.key(7), (2, 7, 10, 5))
  ours = PointwiseConv(6, stride)
  params = ours.init(jax.random.key(8), x)
  assert params['params']['kernel'].shape == (1, 1, 5, 6)
  ref = nn.Conv(6, (1, 1), (stride, stride), use_bias=False,
                padding='SAME' if padding == 'SAME' else ((0, 0), (0, 0)))
  _assert_same_forward_and_backward(ours, ref, params, x, grad_atol=1e-5)


@pytest.mark.slow
def test_mobilenet_v2_agrees_across_depthwise_impls():
  x = jax.random.normal(jax.random.key(5), (2, 32, 32, 3))
  shifted = build_model('mobilenet_v2', num_classes=4, width_mult=0.35, depthwise_impl='shifted')
  grouped = shifted.clone(depthwise_impl='grouped')
  variables = shifted.init(jax.random.key(6), x, train=False)
  variables = jax.tree.map(lambda v: v + 0.01, variables)  # a non-zero head
  np.testing.assert_allclose(shifted.apply(variables, x), grouped.apply(variables, x),
                             rtol=1e-4, atol=1e-4)


def test_create_returns_model_and_fresh_variables():
  import tljax
  model, variables = tljax.create('resnet18', num_classes=3, image_size=32)
  logits = model.apply(variables, jnp.ones((2, 32, 32, 3)), train=False)
  assert logits.shape == (2, 3)
  assert set(variables) == {'params', 'batch_stats'}
  assert variables['params']['head']['kernel'].shape == (512, 3)
