"""Model registry: names -> (Linen module factory, STAGES)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from tljax.errors import UserError
from tljax.models import (
  bert,
  efficientnet_lite,
  layered_cnn,
  layers,
  mobilenet_v2,
  resnet,
  small_cnn,
  vit,
)


def _image_input(size: int, channels: int) -> tuple[jax.Array]:
  return (jnp.zeros((1, size, size, channels), jnp.float32),)


def _token_input(length: int, channels: int) -> tuple[jax.Array]:
  del channels
  return (jnp.zeros((1, length), jnp.int32),)


Converter = Callable[..., dict]


@dataclasses.dataclass(frozen=True)
class ModelEntry:
  """A registered model: its factory, ordered STAGES, converters from outside layouts, shape
  adapters applied when loading (e.g. ViT position embeddings), an example input maker, and
  exporters to outside layouts (the converters' inverses)."""
  build: Callable[..., nn.Module]
  stages: tuple[str, ...]
  converters: Mapping[str, Converter] = dataclasses.field(default_factory=dict)
  resizers: Mapping[str, Callable] = dataclasses.field(default_factory=dict)
  example_input: Callable[[int, int], tuple] = _image_input
  exporters: Mapping[str, Callable[[Mapping], dict]] = dataclasses.field(default_factory=dict)
  # Model arguments that take one of a few names, checked before the model is built.
  choices: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
  # The batch keys the model is called with, in the order of its arguments.
  inputs: tuple[str, ...] = ('image',)

  @property
  def modality(self) -> str:
    """'text' for models of token ids, else 'image'."""
    return 'text' if 'input_ids' in self.inputs else 'image'


_DEPTHWISE = dict(depthwise_impl=layers.DEPTHWISE_IMPLS)
_RESNET = dict(torchvision=resnet.from_torchvision, timm=resnet.from_torchvision, hf=resnet.from_hf)


def _resnet(stage_sizes: tuple[int, ...], block: type[nn.Module]) -> ModelEntry:
  return ModelEntry(functools.partial(resnet.ResNet, stage_sizes=stage_sizes, block=block),
                    resnet.STAGES, _RESNET, exporters=dict(torchvision=resnet.to_torchvision))


def _efficientnet_lite(variant: int) -> ModelEntry:
  width, depth, _ = efficientnet_lite.VARIANTS[variant]
  return ModelEntry(functools.partial(efficientnet_lite.EfficientNetLite, width_mult=width,
                                      depth_mult=depth),
                    efficientnet_lite.STAGES,
                    dict(lite_pytorch=efficientnet_lite.from_lite_pytorch), choices=_DEPTHWISE)


def _vit(size: str, patch: int) -> ModelEntry:
  return ModelEntry(functools.partial(vit.build, size, patch),
                    vit.stages(vit.SIZES[size][1]),
                    dict(hf=vit.from_hf, timm=vit.from_timm, big_vision=vit.from_big_vision),
                    vit.RESIZERS, choices=dict(pool=vit.POOLS))


def _bert(width: int, depth: int, heads: int, pool: str) -> ModelEntry:
  return ModelEntry(functools.partial(bert.Bert, width=width, depth=depth, num_heads=heads,
                                      mlp_dim=4 * width, pool=pool),
                    bert.stages(depth), dict(hf=bert.from_hf), example_input=_token_input,
                    exporters=dict(hf=bert.to_hf), choices=dict(pool=bert.POOLS),
                    inputs=bert.INPUTS)


MODELS: dict[str, ModelEntry] = {
    'small_cnn': ModelEntry(small_cnn.SmallCNN, small_cnn.STAGES),
    'layered_cnn': ModelEntry(layered_cnn.LayeredCNN, layered_cnn.STAGES),
    'resnet18': _resnet((2, 2, 2, 2), resnet.BasicBlock),
    'resnet34': _resnet((3, 4, 6, 3), resnet.BasicBlock),
    'resnet50': _resnet((3, 4, 6, 3), resnet.Bottleneck),
    'resnet101': _resnet((3, 4, 23, 3), resnet.Bottleneck),
    'mobilenet_v2': ModelEntry(mobilenet_v2.MobileNetV2, mobilenet_v2.STAGES,
                               dict(torchvision=mobilenet_v2.from_torchvision),
                               exporters=dict(torchvision=mobilenet_v2.to_torchvision),
                               choices=_DEPTHWISE),
    **{f'efficientnet_lite{v}': _efficientnet_lite(v) for v in efficientnet_lite.VARIANTS},
    'vit_ti16': _vit('ti', 16), 'vit_s16': _vit('s', 16), 'vit_b16': _vit('b', 16),
    'vit_b32': _vit('b', 32), 'vit_l16': _vit('l', 16),
    'bert_base': _bert(768, 12, 12, 'cls'), 'minilm_l6': _bert(384, 6, 12, 'mean'),
}


def get_entry(name: str) -> ModelEntry:
  if name not in MODELS:
    raise UserError(f"unknown model {name!r} (config key model.name); known: "
                   f"{', '.join(sorted(MODELS))}")
  return MODELS[name]


def build_model(name: str, **kwargs) -> nn.Module:
  """Builds the Linen module registered as `name` with its keyword arguments."""
  entry = get_entry(name)
  for key, allowed in entry.choices.items():
    if key in kwargs and kwargs[key] not in allowed:
      raise UserError(f'model.{key}={kwargs[key]!r} is not one of {", ".join(map(repr, allowed))}'
                      f' (model {name!r})')
  try:
    accepted = inspect.signature(entry.build).parameters
  except (TypeError, ValueError):
    accepted = kwargs
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in getattr(accepted, 'values', list)()):
    accepted = kwargs  # a builder passing **kwargs on: the module's own error below
  unknown = sorted(k for k in kwargs if k not in accepted)
  if unknown:
    known = sorted(k for k in accepted if k not in ('parent', 'name'))
    raise UserError(f'model {name!r} takes no argument(s) {unknown} (config keys model.*); '
                    f'it takes {", ".join(known)}')
  try:
    return entry.build(**kwargs)
  except TypeError as e:
    raise UserError(f'model {name!r} (config key model) does not accept the arguments '
                    f'{sorted(kwargs)}: {e}') from None


def init_variables(model: nn.Module, image_size: int, channels: int = 3, seed: int = 0,
                   example_input: Callable[[int, int], tuple] = _image_input,
                   shapes_only: bool = False) -> dict:
  """Fresh variables (`params`, `batch_stats`) of `model` for square images of `image_size`
  (or sequences of that length, with `example_input` of a text model). `shapes_only`: their
  jax.ShapeDtypeStructs from jax.eval_shape, which neither compiles nor runs the init (for
  variables a checkpoint then fills in)."""
  try:
    inputs = example_input(image_size, channels)
    init = lambda key: model.init(key, *inputs, train=False)  # noqa: E731
    key = jax.random.key(seed)
    return jax.eval_shape(init, key) if shapes_only else jax.jit(init)(key)
  except (TypeError, ValueError, ZeroDivisionError, jax.errors.JaxRuntimeError) as e:
    # e.g. a width of -4, or an image size whose activations do not fit in memory
    settings = {k: v for k, v in vars(model).items()  # the config's values, not internals
                if not k.startswith('_') and k not in ('parent', 'name')
                and isinstance(v, (int, float, str, bool, tuple, type(None)))}
    reason = ' '.join(str(e).split())[:300]
    raise UserError(f'model {type(model).__name__} cannot be built with {settings} for '
                    f'{image_size}x{image_size}x{channels} inputs (config keys model.*, '
                    f'data.image_size, data.channels): {reason}') from None
