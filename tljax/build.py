"""One building step from a resolved config to what a run trains: the model (its frozen
BatchNorm layers set), the first TrainState (pretrained weights loaded), the freeze groups and
labels, the trainable mask, the optimizer and the schedule. train.py, the tests and the
benchmarks all build through `build`, so the optimizer-to-step wiring exists once.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import ml_collections
import optax

from tljax import freeze, optim, parallel, steps
from tljax.models import build_model, get_entry, init_variables
from tljax.models.layers import NormSpec
from tljax.weights import load as weights_load


@dataclasses.dataclass(frozen=True)
class Built:
  """What `build` returns: everything the train loop needs before device placement."""
  config: ml_collections.ConfigDict  # resolved (tljax.resolve.resolve_config)
  model: Any  # the Linen module
  state: steps.TrainState  # step 0: pretrained or fresh variables, zero optimizer state
  groups: list[freeze.Group]
  labels: Any  # the params pytree with each leaf's group label
  mask: Any  # the params pytree with True where a leaf trains
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule
  load_report: dict[str, list[str]] | None  # pretrained merge report; None when not loaded

  @property
  def params(self) -> Any:
    return self.state.params

  @property
  def batch_stats(self) -> Any:
    return self.state.batch_stats

  def train_step(self, model: Any = None, **options: Any) -> Callable:
    """steps.make_train_step for this build (`model`: another view of it, e.g. the feature
    cache's); `options` are make_train_step's keyword arguments."""
    return steps.make_train_step(model or self.model, self.optimizer, self.mask, self.schedule,
                                 self.config.seed, self.config.optim.label_smoothing, **options)


def _variables(config: ml_collections.ConfigDict, model: Any
               ) -> tuple[dict[str, Any], dict[str, list[str]] | None]:
  entry = get_entry(config.model.name)
  size = config.data.max_length if entry.modality == 'text' else config.data.image_size
  init = functools.partial(init_variables, model, size, config.data.channels, config.seed,
                           entry.example_input)
  if not config.init.pretrained:
    return init(), None
  return weights_load.load_pretrained_lazily(
      config.init.pretrained, config.model.name, model, init, config.init.dont_load,
      config.init.layout)


def build(config: ml_collections.ConfigDict, total_steps: int | None = None) -> Built:
  """The model, first state and optimizer of a resolved `config`, the schedule spanning
  `total_steps` (default: config.total_steps)."""
  model_kwargs = {k: v for k, v in config.model.to_dict().items() if k != 'name'}
  model = build_model(config.model.name, **model_kwargs)
  variables, report = _variables(config, model)
  params, batch_stats = variables['params'], variables.get('batch_stats', {})
  groups = freeze.parse_groups(config.optim.groups)
  labels = freeze.label_tree(params, groups)
  if isinstance(getattr(model, 'norm', None), NormSpec):  # BatchNorm models
    norm = dataclasses.replace(
        model.norm, frozen=freeze.frozen_norm_paths(labels, batch_stats),
        axis_name=parallel.PMAP_AXIS if config.parallel == 'pmap' else None)
    model = model.clone(norm=norm)
  optimizer, schedule = optim.make_optimizer(config.optim, groups, labels,
                                             total_steps or config.total_steps)
  state = steps.TrainState(jnp.asarray(0, jnp.int32), params, batch_stats,
                           optimizer.init(params))
  return Built(config, model, state, groups, labels, freeze.trainable_mask(labels), optimizer,
               schedule, report)


def load_line(built: Built) -> str | None:
  """What loading the pretrained weights did, in one line (None without them)."""
  report = built.load_report
  if report is None:
    return None
  return (f'pretrained {built.config.init.pretrained}: loaded {len(report["loaded"])} arrays, '
          f'kept {len(report["kept_fresh"])} fresh ({", ".join(report["kept_fresh"])})'
          + (f', resized {report["resized"]}' if report['resized'] else ''))

