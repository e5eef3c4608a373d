"""optax from config: the schedule, and ONE multi_transform in which frozen groups set to zero."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import optax

from tljax.errors import UserError
from tljax.freeze import FROZEN, Group

SCHEDULES = ('constant', 'cosine', 'linear', 'step')
OPTIMIZERS = ('sgd', 'adamw', 'adam')


def schedule_steps(config: Mapping[str, Any], total_steps: int) -> int:
  """The steps the schedule spans, warmup included: optim.schedule.steps, else the run's."""
  return int(config.get('steps') or total_steps)


def make_schedule(config: Mapping[str, Any], base_lr: float, total_steps: int
                  ) -> optax.Schedule:
  """Warmup (linear from 0) followed by constant, cosine, linear or step decay over
  `schedule_steps(config, total_steps)` steps; past them the learning rate stays at its end."""
  name = config.get('name', 'cosine')
  warmup = int(config.get('warmup_steps', 0))
  decay_steps = max(1, schedule_steps(config, total_steps) - warmup)
  if name == 'constant':
    decay = optax.constant_schedule(base_lr)
  elif name == 'cosine':
    decay = optax.cosine_decay_schedule(base_lr, decay_steps,
                                        alpha=float(config.get('end_factor', 0.0)))
  elif name == 'linear':
    decay = optax.linear_schedule(base_lr, base_lr * float(config.get('end_factor', 0.0)),
                                  decay_steps)
  elif name == 'step':
    # boundaries are fractions of the steps after warmup; each multiplies the lr by the factor
    factor = float(config.get('decay_factor', 0.1))
    decay = optax.piecewise_constant_schedule(
        base_lr, {int(b * decay_steps): factor for b in config.get('boundaries', (0.5, 0.75))})
  else:
    raise UserError(f'optim.schedule.name must be one of {SCHEDULES}, got {name!r}')
  if not warmup:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, base_lr, warmup), decay], [warmup])


def _scaled(schedule: optax.Schedule, factor: float) -> optax.Schedule:
  return lambda step: factor * schedule(step)


def _decay_mask(params: Any) -> Any:
  """Weight decay only on kernels and embeddings (ndim > 1), never on biases or norm scales."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def _group_transform(config: Mapping[str, Any], schedule: optax.Schedule, group: Group
                     ) -> optax.GradientTransformation:
  name = config['name']
  learning_rate = _scaled(schedule, group.lr_mult)
  weight_decay = float(config.get('weight_decay', 0.0)) * group.wd_mult
  if name == 'sgd':
    parts = []
    if weight_decay:
      parts.append(optax.add_decayed_weights(weight_decay, mask=_decay_mask))
    parts.append(optax.sgd(learning_rate, momentum=config.get('momentum') or None,
                           nesterov=bool(config.get('nesterov', False))))
    return optax.chain(*parts)
  if name in ('adamw', 'adam'):
    return optax.adamw(learning_rate, b1=float(config.get('b1', 0.9)),
                       b2=float(config.get('b2', 0.999)), eps=float(config.get('eps', 1e-8)),
                       weight_decay=weight_decay if name == 'adamw' else 0.0, mask=_decay_mask)
  raise UserError(f'optim.name must be one of {OPTIMIZERS}, got {name!r}')


def make_optimizer(config: Mapping[str, Any], groups: Sequence[Group], labels: Any,
                   total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """One optax.multi_transform over `labels`; frozen leaves get set_to_zero (and no state).

  Gradient clipping comes first, over the global norm of the gradients it is given: the train
  step passes zeros for frozen leaves, so the norm is that of the trainable leaves only.
  """
  schedule = make_schedule(config.get('schedule', {}), float(config['lr']), total_steps)
  used = set(jax.tree.leaves(labels))
  transforms: dict[str, optax.GradientTransformation] = {FROZEN: optax.set_to_zero()}
  for group in groups:
    if not group.frozen and group.label in used:
      transforms[group.label] = _group_transform(config, schedule, group)
  optimizer = optax.multi_transform(transforms, labels)
  clip_norm = config.get('clip_norm')
  if clip_norm:
    optimizer = optax.chain(optax.clip_by_global_norm(float(clip_norm)), optimizer)
  return optimizer, schedule


def state_leaf_stats(opt_state: Any) -> tuple[int, int]:
  """(number of array leaves, bytes) held by an optimizer state."""
  leaves = [x for x in jax.tree.leaves(opt_state) if hasattr(x, 'nbytes')]
  return len(leaves), int(sum(x.nbytes for x in leaves))
