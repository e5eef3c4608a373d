"""tljax: transfer learning in JAX/Flax."""

from __future__ import annotations

from typing import Any


def create(name: str, num_classes: int, image_size: int = 224, channels: int = 3, seed: int = 0,
           **model_kwargs: Any) -> tuple[Any, dict[str, Any]]:
  """The registered model `name` and fresh variables (`params`, `batch_stats`), timm-style."""
  import jax
  import jax.numpy as jnp

  from tljax.models import build_model

  model = build_model(name, num_classes=num_classes, **model_kwargs)
  dummy = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
  variables = jax.jit(lambda key: model.init(key, dummy, train=False))(jax.random.key(seed))
  return model, variables
