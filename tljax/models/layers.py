"""Layers shared by the model families: freezable BatchNorm and a backend-aware depthwise conv."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class NormSpec:
  """How every BatchNorm of a model behaves; hashable so it can be a Module attribute.

  `frozen` holds the module paths (`layer1/block0/bn1`) of BatchNorms inside frozen groups:
  they always use running averages, so their statistics never change.
  """
  frozen: frozenset[str] = frozenset()
  axis_name: str | None = None
  momentum: float = 0.9
  epsilon: float = 1e-5


def batch_norm(parent: nn.Module, spec: NormSpec, name: str, x: jax.Array, train: bool
               ) -> jax.Array:
  """Applies a BatchNorm child of `parent` called `name`, frozen if its path is in `spec`."""
  path = '/'.join((*parent.scope.path, name))
  use_running_average = (not train) or path in spec.frozen
  return nn.BatchNorm(use_running_average=use_running_average, momentum=spec.momentum,
                      epsilon=spec.epsilon, axis_name=spec.axis_name, name=name)(x)


DEPTHWISE_IMPLS = ('auto', 'shifted', 'grouped')


def resolve_depthwise_impl(impl: str) -> str:
  """'auto' picks shifted multiply-adds on CPU (XLA:CPU grouped conv is 10-30x slower)."""
  if impl not in DEPTHWISE_IMPLS:
    raise ValueError(f'depthwise impl must be one of {DEPTHWISE_IMPLS}, got {impl!r}')
  if impl == 'auto':
    return 'shifted' if jax.default_backend() == 'cpu' else 'grouped'
  return impl


def _depthwise_shifted(x: jax.Array, kernel: jax.Array, stride: int,
                       padding: Sequence[tuple[int, int]]) -> jax.Array:
  kh, kw = kernel.shape[:2]
  x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  out_h = (x.shape[1] - kh) // stride + 1
  out_w = (x.shape[2] - kw) // stride + 1
  out = None
  for i in range(kh):
    for j in range(kw):
      window = jax.lax.slice(
          x, (0, i, j, 0),
          (x.shape[0], i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1, x.shape[3]),
          (1, stride, stride, 1))
      term = window * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


class DepthwiseConv(nn.Module):
  """k x k depthwise convolution, no bias; kernel stored HWIO as (k, k, 1, C) like nn.Conv.

  `impl='shifted'` computes k*k shifted multiply-adds, `'grouped'` calls XLA's grouped
  convolution; both give the same result (tested), 'auto' chooses per backend.
  """
  kernel_size: int = 3
  stride: int = 1
  padding: int | str = 1  # symmetric pixels (PyTorch) or 'SAME' (TensorFlow, asymmetric)
  impl: str = 'auto'
  kernel_init: nn.initializers.Initializer = nn.initializers.variance_scaling(
      2.0, 'fan_out', 'normal')

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    kernel = self.param('kernel', self.kernel_init,
                        (self.kernel_size, self.kernel_size, 1, channels), jnp.float32)
    kernel = kernel.astype(x.dtype)
    if self.padding == 'SAME':
      padding = jax.lax.padtype_to_pads(x.shape[1:3], (self.kernel_size,) * 2,
                                        (self.stride,) * 2, 'SAME')
    else:
      padding = ((self.padding, self.padding), (self.padding, self.padding))
    if resolve_depthwise_impl(self.impl) == 'shifted':
      return _depthwise_shifted(x, kernel, self.stride, padding)
    return jax.lax.conv_general_dilated(
        x, kernel, (self.stride, self.stride), padding,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=channels)


_CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class PointwiseConv(nn.Module):
  """A bias-free 1x1 convolution computed as a matrix product over the channel axis.

  Same parameters as `nn.Conv(features, (1, 1))` (kernel (1, 1, in, out)), so pretrained weights
  load unchanged. XLA:CPU runs this forward and backward 2-4x faster than its 1x1 convolution
  (benchmarks/README.md); on accelerators both lower to the same matmul.
  """
  features: int
  stride: int = 1
  kernel_init: nn.initializers.Initializer = _CONV_INIT

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', self.kernel_init, (1, 1, x.shape[-1], self.features),
                        jnp.float32)
    if self.stride > 1:  # a strided 1x1 conv reads every stride-th pixel ('SAME' pads nothing)
      x = x[:, ::self.stride, ::self.stride]
    return jnp.einsum('nhwc,cd->nhwd', x, kernel[0, 0].astype(x.dtype))


def conv(features: int, kernel: int, stride: int = 1, name: str | None = None,
         same: bool = False) -> nn.Module:
  """A bias-free conv with PyTorch-style symmetric padding, so torchvision weights fit;
  `same=True` pads like TensorFlow's 'SAME' (more at the end) for weights trained there.
  1x1 convolutions are matrix products (`PointwiseConv`)."""
  if kernel == 1:
    return PointwiseConv(features, stride, name=name)
  pad = (kernel - 1) // 2
  padding = 'SAME' if same else ((pad, pad), (pad, pad))
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding=padding,
                 use_bias=False, kernel_init=_CONV_INIT, name=name)
