"""tljax: transfer learning in JAX/Flax."""

from __future__ import annotations

from typing import Any


def create(name: str, num_classes: int, image_size: int = 224, channels: int = 3, seed: int = 0,
           **model_kwargs: Any) -> tuple[Any, dict[str, Any]]:
  """The registered model `name` and fresh variables (`params`, `batch_stats`), timm-style."""
  from tljax.models import build_model, init_variables

  model = build_model(name, num_classes=num_classes, **model_kwargs)
  return model, init_variables(model, image_size, channels, seed)
