"""tljax: transfer learning in JAX/Flax."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any


def create(name: str, num_classes: int | None = None, pretrained: str | bool | None = None,
           image_size: int | None = None, channels: int = 3, seed: int = 0,
           dont_load: Sequence[str] | None = None, layout: str | None = None,
           **model_kwargs: Any) -> tuple[Any, dict[str, Any]]:
  """The registered model `name` and its variables (`params`, `batch_stats`), timm-style.

  `pretrained` is a zoo name (`tljax.weights.zoo.ZOO`), True (the model's zoo weights, as timm
  takes it), a weights file (with `layout`) or a tljax workdir. Asking a zoo source for another
  `num_classes` gives a fresh zero head.
  """
  from tljax.models import build_model, get_entry, init_variables
  from tljax.weights import load, zoo

  if pretrained is not None and not isinstance(pretrained, (str, bool)):
    raise TypeError(f'create(pretrained=...) takes a zoo name, a file or workdir path, True or '
                    f'False, got {pretrained!r}')
  if pretrained is True:
    pretrained = zoo.default_for(name)
  pretrained = pretrained or None  # False: no pretrained weights
  entry = zoo.ZOO.get(pretrained) if pretrained else None
  if entry is not None:
    model_kwargs = {**dict(entry.model_kwargs), **model_kwargs}
    num_classes = num_classes or entry.num_classes or 2
    image_size = image_size or entry.preprocessing.image_size
    if dont_load is None:
      dont_load = ('head/.*',) if num_classes != entry.num_classes else ()
  if num_classes is None:
    raise TypeError('create() needs num_classes unless a zoo source gives it')
  model = build_model(name, num_classes=num_classes, **model_kwargs)
  init = functools.partial(init_variables, model, image_size or 224, channels, seed,
                           get_entry(name).example_input)
  if not pretrained:
    return model, init()
  variables, _ = load.load_pretrained_lazily(pretrained, name, model, init, dont_load or (),
                                             layout)
  return model, variables


def load(workdir: str, step: str | int = 'best') -> tuple[Any, dict[str, Any], dict[str, Any]]:
  """(model, variables, record) of a tljax run's checkpoint: `step` 'best' (selected on the
  validation split; the last without one), 'last' or a step number. `record` holds the class
  names, the preprocessing and the model config (tljax.saved_model)."""
  from tljax import saved_model
  return saved_model.load(workdir, step)
