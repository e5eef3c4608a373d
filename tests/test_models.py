"""Models: published parameter counts, STAGES covering every parameter, depthwise formulations."""

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


@pytest.mark.parametrize('name', sorted(MODELS))
def test_stages_cover_every_parameter_in_order(name):
  stages = MODELS[name].stages
  paths = list(_param_shapes(name, num_classes=7))
  owner = {p: next((s for s in stages if p.startswith(s + '/')), None) for p in paths}
  assert None not in owner.values(), [p for p, s in owner.items() if s is None]
  assert set(owner.values()) == set(stages)
  assert stages[-1] == 'head'


@pytest.mark.parametrize('stride', [1, 2])
def test_depthwise_shifted_equals_grouped_conv(stride):
  x = jax.random.normal(jax.random.key(1), (2, 9, 10, 6))
  shifted = DepthwiseConv(stride=stride, impl='shifted')
  grouped = DepthwiseConv(stride=stride, impl='grouped')
  params = shifted.init(jax.random.key(2), x)
  out_s, out_g = shifted.apply(params, x), grouped.apply(params, x)
  assert out_s.shape == out_g.shape
  np.testing.assert_allclose(out_s, out_g, rtol=1e-5, atol=1e-5)

  def loss(module):
    return lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))
  grads_s = jax.grad(loss(shifted), argnums=(0, 1))(params, x)
  grads_g = jax.grad(loss(grouped), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(grads_s), jax.tree.leaves(grads_g), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


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

  def loss(module):
    return lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))
  out, out_ref = ours.apply(params, x), ref.apply(params, x)
  assert out.shape == out_ref.shape
  np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-5)
  grads = jax.grad(loss(ours), argnums=(0, 1))(params, x)
  grads_ref = jax.grad(loss(ref), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


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
