"""optax from config: the schedule, and ONE multi_transform in which frozen groups set to zero."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tljax.errors import UserError
from tljax.freeze import FROZEN, Group


def schedule_steps(config: Mapping[str, Any], total_steps: int) -> int:
  """The steps the schedule spans, warmup included: optim.schedule.steps, else the run's (a
  config.json of an older tljax has no such key)."""
  return int(config.get('steps') or total_steps)


# Schedules by name: (optim.schedule section, base lr, decay steps) -> optax schedule.
ScheduleFactory = Callable[[Mapping[str, Any], float, int], optax.Schedule]
SCHEDULES: dict[str, ScheduleFactory] = {
    'constant': lambda config, lr, steps: optax.constant_schedule(lr),
    'cosine': lambda config, lr, steps: optax.cosine_decay_schedule(
        lr, steps, alpha=float(config['end_factor'])),
    'linear': lambda config, lr, steps: optax.linear_schedule(
        lr, lr * float(config['end_factor']), steps),
    # boundaries are fractions of the steps after warmup; each multiplies the lr by the factor
    'step': lambda config, lr, steps: optax.piecewise_constant_schedule(
        lr, {int(b * steps): float(config['decay_factor']) for b in config['boundaries']}),
}


def make_schedule(config: Mapping[str, Any], base_lr: float, total_steps: int
                  ) -> optax.Schedule:
  """Warmup (linear from 0) followed by a decay of SCHEDULES over `schedule_steps(config,
  total_steps)` steps; past them the learning rate stays at its end. `config` is a resolved
  optim.schedule section (every key set)."""
  name, warmup = config['name'], int(config['warmup_steps'])
  if name not in SCHEDULES:
    raise UserError(f'optim.schedule.name must be one of {tuple(SCHEDULES)}, got {name!r}')
  decay = SCHEDULES[name](config, base_lr, max(1, schedule_steps(config, total_steps) - warmup))
  if not warmup:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, base_lr, warmup), decay], [warmup])


def _scaled(schedule: optax.Schedule, factor: float) -> optax.Schedule:
  return lambda step: factor * schedule(step)


def _decay_mask(anchored: Any = None) -> Callable[[Any], Any]:
  """Weight decay only on kernels and embeddings (ndim > 1), never on biases or norm scales,
  nor on leaves that L2-SP pulls towards their pretrained values (`anchored`, a bool tree)."""
  def mask(params: Any) -> Any:
    if anchored is None:
      return jax.tree.map(lambda p: p.ndim > 1, params)
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731 (another group's leaf)
    return jax.tree.map(lambda p, a: p if masked(p) else p.ndim > 1 and not a, params,
                        anchored, is_leaf=masked)
  return mask


class L2SPState(NamedTuple):
  anchor: Any  # the starting point of each pulled leaf (optax.MaskedNode elsewhere)


def l2sp(strength: float, anchored: Any) -> optax.GradientTransformation:
  """L2-SP (Li et al. 2018, "Explicit inductive bias for transfer learning"): adds
  `strength * (w - w0)` to the gradient of each leaf where `anchored` is True, w0 being its
  value when the state was initialised (the pretrained weights). The starting point is held
  once, in this transformation's state (so checkpoints keep it), for those leaves only."""
  def init(params):  # a copy: the train step donates the parameters' buffers
    return L2SPState(jax.tree.map(jnp.array, params))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError('l2sp needs the parameters passed to update')
    updates = jax.tree.map(lambda g, p, w0: g + strength * (p - w0).astype(g.dtype),
                           updates, params, state.anchor)
    return updates, state

  return optax.masked(optax.GradientTransformation(init, update), anchored)


def _sgd(config: Mapping[str, Any], learning_rate: optax.Schedule, weight_decay: float,
         decay_mask: Callable[[Any], Any]) -> optax.GradientTransformation:
  parts = [optax.add_decayed_weights(weight_decay, mask=decay_mask)] if weight_decay else []
  parts.append(optax.sgd(learning_rate, momentum=config['momentum'] or None,
                         nesterov=bool(config['nesterov'])))
  return optax.chain(*parts)


def _adam(config: Mapping[str, Any], learning_rate: optax.Schedule, weight_decay: float,
          decay_mask: Callable[[Any], Any], decoupled: bool) -> optax.GradientTransformation:
  return optax.adamw(learning_rate, b1=float(config['b1']), b2=float(config['b2']),
                     eps=float(config['eps']), weight_decay=weight_decay if decoupled else 0.0,
                     mask=decay_mask)


# Optimizers by name: (optim section, group lr schedule, group weight decay) -> transformation.
OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    'sgd': _sgd,
    'adamw': functools.partial(_adam, decoupled=True),
    'adam': functools.partial(_adam, decoupled=False),  # weight_decay does not apply
}


def _group_transform(config: Mapping[str, Any], schedule: optax.Schedule, group: Group,
                     decay_mask: Callable[[Any], Any]) -> optax.GradientTransformation:
  name = config['name']
  if name not in OPTIMIZERS:
    raise UserError(f'optim.name must be one of {tuple(OPTIMIZERS)}, got {name!r}')
  weight_decay = float(config['weight_decay']) * group.wd_mult
  return OPTIMIZERS[name](config, _scaled(schedule, group.lr_mult), weight_decay, decay_mask)


def make_optimizer(config: Mapping[str, Any], groups: Sequence[Group], labels: Any,
                   total_steps: int, anchored: Any = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """One optax.multi_transform over `labels`; frozen leaves get set_to_zero (and no state).

  Gradient clipping comes first, over the global norm of the gradients it is given: the train
  step passes zeros for frozen leaves, so the norm is that of the trainable leaves only. With
  optim.l2sp, `anchored` (a bool tree: trainable leaves with a pretrained start) says which
  leaves L2-SP pulls towards their start, after clipping and before each group's optimizer.
  """
  schedule = make_schedule(config['schedule'], float(config['lr']), total_steps)
  strength = float(config.get('l2sp') or 0.0)
  if strength and anchored is None:
    raise UserError('optim.l2sp needs the leaves with a pretrained start (anchored)')
  decay_mask = _decay_mask(anchored if strength else None)
  used = set(jax.tree.leaves(labels))
  transforms: dict[str, optax.GradientTransformation] = {FROZEN: optax.set_to_zero()}
  for group in groups:
    if not group.frozen and group.label in used:
      transforms[group.label] = _group_transform(config, schedule, group, decay_mask)
  parts = [optax.multi_transform(transforms, labels)]
  if strength:
    parts.insert(0, l2sp(strength, anchored))
  clip_norm = config['clip_norm']
  if clip_norm:
    parts.insert(0, optax.clip_by_global_norm(float(clip_norm)))
  return (parts[0] if len(parts) == 1 else optax.chain(*parts)), schedule


def state_leaf_stats(opt_state: Any) -> tuple[int, int]:
  """(number of array leaves, bytes) held by an optimizer state."""
  leaves = [x for x in jax.tree.leaves(opt_state) if hasattr(x, 'nbytes')]
  return len(leaves), int(sum(x.nbytes for x in leaves))
