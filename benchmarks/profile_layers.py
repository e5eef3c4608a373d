"""Where a full fine-tuning step's time goes, by layer kind, in XLA and in PyTorch.

  python -m benchmarks.profile_layers [--models mobilenet_v2,resnet50,vit_s16] [--size 128]
      [--batch 32] [--out benchmarks/results/profile_cpu.json]

Every convolution and dense layer the model calls is recorded with its input shape (a Flax
method interceptor), then each distinct layer is timed alone, forward and backward (gradients of
input and weights), in jax.jit and in PyTorch. Times are summed by kind ("1x1 conv", "3x3 conv",
"depthwise 3x3", "dense"); the rest of the measured step (normalisation, activations, pooling,
attention products, the optimizer) is reported as "other".
"""

from __future__ import annotations

import argparse
import collections
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks import common
from tljax import build
from tljax.models.layers import DepthwiseConv, PointwiseConv


def record_layers(config) -> list[dict[str, Any]]:
  """Each conv / dense call of one training forward pass: kind and shapes."""
  built = build.build(config)
  model, params, batch_stats = built.model, built.params, built.batch_stats
  calls: list[dict[str, Any]] = []

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == '__call__' and args:
      shape = tuple(args[0].shape)
      if isinstance(module, DepthwiseConv):
        calls.append(dict(kind=f'depthwise {module.kernel_size}x{module.kernel_size}',
                          shape=shape, kernel=module.kernel_size, stride=module.stride,
                          features=shape[-1], groups=shape[-1]))
      elif isinstance(module, PointwiseConv):
        calls.append(dict(kind='1x1 conv', shape=shape, kernel=1, stride=module.stride,
                          features=module.features, groups=1))
      elif isinstance(module, nn.Conv):
        k, s = module.kernel_size[0], module.strides[0] if module.strides else 1
        calls.append(dict(kind=f'{k}x{k} conv', shape=shape, kernel=k, stride=s,
                          features=module.features, groups=module.feature_group_count))
      elif isinstance(module, (nn.Dense, nn.DenseGeneral)):
        features = module.features if isinstance(module.features, int) else int(
            np.prod(module.features))
        calls.append(dict(kind='dense', shape=shape, features=features))
    return next_fun(*args, **kwargs)

  images = jnp.zeros((config.data.batch_size, config.data.image_size, config.data.image_size, 3))
  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda v: model.apply(v, images, train=True, mutable=['batch_stats'],
                                         rngs={'dropout': jax.random.key(0)}),
                   {'params': params, 'batch_stats': batch_stats})
  return calls


def _jax_layer(call: dict[str, Any]):
  """(jitted forward+backward, its inputs) of one recorded layer."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=call['shape']), jnp.float32)
  if call['kind'] == 'dense':
    w = jnp.asarray(rng.normal(size=(call['shape'][-1], call['features'])), jnp.float32)
    forward = lambda x, w: x @ w
  elif call['kind'] == '1x1 conv':  # as tljax computes it: a matrix product
    module = PointwiseConv(call['features'], call['stride'])
    w = module.init(jax.random.key(0), x)
    forward = lambda x, w: module.apply(w, x)
  elif call['kind'].startswith('depthwise'):
    module = DepthwiseConv(call['kernel'], call['stride'], (call['kernel'] - 1) // 2)
    w = module.init(jax.random.key(0), x)
    forward = lambda x, w: module.apply(w, x)
  else:
    k, pad = call['kernel'], (call['kernel'] - 1) // 2
    w = jnp.asarray(rng.normal(size=(k, k, call['shape'][-1], call['features'])), jnp.float32)
    forward = lambda x, w: jax.lax.conv_general_dilated(
        x, w, (call['stride'],) * 2, ((pad, pad), (pad, pad)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  def forward_backward(x, w):
    y, vjp = jax.vjp(forward, x, w)
    return vjp(jnp.ones_like(y))

  return jax.jit(forward_backward), (x, w)


def _torch_layer(call: dict[str, Any]):
  shape = call['shape']
  if call['kind'] == 'dense':
    x = torch.randn(*shape, requires_grad=True)
    w = torch.randn(call['features'], shape[-1], requires_grad=True)
    forward = lambda: torch.nn.functional.linear(x, w)
  else:
    x = torch.randn(shape[0], shape[3], shape[1], shape[2], requires_grad=True)
    k, groups = call['kernel'], call['groups']
    w = torch.randn(call['features'], shape[3] // groups, k, k, requires_grad=True)
    forward = lambda: torch.nn.functional.conv2d(x, w, stride=call['stride'],
                                                 padding=(k - 1) // 2, groups=groups)

  def forward_backward():
    x.grad = w.grad = None
    forward().sum().backward()

  return forward_backward


def profile(name: str, args: argparse.Namespace) -> dict[str, Any]:
  config = common.make_config(name, 'full', args.size, args.batch)
  calls = record_layers(config)
  distinct = collections.Counter(json.dumps(c, sort_keys=True) for c in calls)
  by_kind: dict[str, dict[str, float]] = collections.defaultdict(
      lambda: dict(layers=0, jax_s=0.0, torch_s=0.0))
  for key, count in distinct.items():
    call = json.loads(key)
    call['shape'] = tuple(call['shape'])
    step, inputs = _jax_layer(call)
    jax_s = common.median(common.time_calls(
        lambda step=step, inputs=inputs: jax.block_until_ready(step(*inputs)), args.reps, 2))
    torch_s = common.median(common.time_calls(_torch_layer(call), args.reps, 2))
    row = by_kind[call['kind']]
    row['layers'] += count
    row['jax_s'] += count * jax_s
    row['torch_s'] += count * torch_s
  return dict(model=name, kinds=dict(by_kind))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default='mobilenet_v2,resnet50,vit_s16')
  parser.add_argument('--size', type=int, default=128)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--reps', type=int, default=7)
  parser.add_argument('--steps-from', default=f'benchmarks/results/finetune_'
                                              f'{jax.default_backend()}.json',
                      help='finetune.py results, for the whole-step times ("other")')
  parser.add_argument('--out', default=f'benchmarks/results/profile_{jax.default_backend()}'
                                       '.json')
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count() or 1)
  steps = {}
  if os.path.exists(args.steps_from):
    with open(args.steps_from) as f:
      steps = {r['model']: r for r in json.load(f)['rows'] if r['frozen_stages'] == 0}
  profiles = []
  for name in args.models.split(','):
    result = profile(name, args)
    if name in steps:
      layers_jax = sum(k['jax_s'] for k in result['kinds'].values())
      layers_torch = sum(k['torch_s'] for k in result['kinds'].values())
      result['kinds']['other'] = dict(layers=0, jax_s=steps[name]['step_s'] - layers_jax,
                                      torch_s=steps[name]['torch_step_s'] - layers_torch)
    profiles.append(result)
    print(result, flush=True)
  common.write_json(args.out, dict(machine=common.machine(), image_size=args.size,
                                   batch=args.batch, profiles=profiles))


if __name__ == '__main__':
  main()
