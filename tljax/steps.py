"""Pure step functions: loss, train_step and eval_step, free of any device placement.

The train step differentiates with respect to the trainable leaves only, so XLA never computes
backward work for frozen layers, whatever else (clipping, norms) reads the gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any

  def to_dict(self) -> dict[str, Any]:
    return dict(step=self.step, params=self.params, batch_stats=self.batch_stats,
                opt_state=self.opt_state)


def split_trainable(tree: Any, mask: Any) -> tuple[Any, Any]:
  """(trainable, frozen) copies of `tree`, with None where a leaf belongs to the other part."""
  trainable = jax.tree.map(lambda m, x: x if m else None, mask, tree)
  frozen = jax.tree.map(lambda m, x: None if m else x, mask, tree)
  return trainable, frozen


def merge_trainable(mask: Any, trainable: Any, frozen: Any) -> Any:
  return jax.tree.map(lambda m, t, f: t if m else f, mask, trainable, frozen)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
                  ) -> jax.Array:
  """Per-example softmax cross-entropy with integer labels."""
  targets = jax.nn.one_hot(labels, logits.shape[-1])
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation, mask: Any,
                    schedule: optax.Schedule, seed: int, label_smoothing: float = 0.0,
                    axis_name: str | None = None) -> Callable:
  """Returns train_step(state, batch) -> (state, metrics).

  `mask` is the static boolean pytree of trainable leaves. Under pmap, `axis_name` names the
  device axis over which gradients and metrics are averaged.
  """
  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    trainable, frozen = split_trainable(state.params, mask)
    dropout_rng = jax.random.fold_in(jax.random.key(seed), state.step)
    if axis_name is not None:
      dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axis_name))

    def loss_fn(trainable_params):
      params = merge_trainable(mask, trainable_params, frozen)
      logits, updates = model.apply(
          {'params': params, 'batch_stats': state.batch_stats}, batch['image'], train=True,
          mutable=['batch_stats'], rngs={'dropout': dropout_rng})
      loss = jnp.mean(cross_entropy(logits, batch['label'], label_smoothing))
      return loss, (logits, updates['batch_stats'])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
    if axis_name is not None:
      grads, loss, accuracy = jax.lax.pmean((grads, loss, accuracy), axis_name)
    # Frozen leaves get constant zeros: set_to_zero ignores them and clipping sees norm 0.
    full_grads = merge_trainable(mask, grads, jax.tree.map(jnp.zeros_like, frozen))
    updates, opt_state = optimizer.update(full_grads, state.opt_state, state.params)
    # Add updates to trainable leaves only, so frozen leaves stay bitwise identical.
    params = jax.tree.map(lambda m, p, u: p + u.astype(p.dtype) if m else p,
                          mask, state.params, updates)
    grad_norm = optax.tree.norm(grads)
    metrics = dict(loss=loss, accuracy=accuracy, grad_norm=grad_norm,
                   lr=schedule(state.step))
    return TrainState(state.step + 1, params, batch_stats, opt_state), metrics

  return train_step


def make_eval_step(model: nn.Module, axis_name: str | None = None,
                   groupings: dict[str, Any] | None = None) -> Callable:
  """Returns eval_step(state, batch) -> summed metrics; `batch['mask']` zeroes padding.

  `groupings` maps a name to a class -> group table; `correct_<name>` counts predictions in
  the right group (e.g. defective or not, from four defect grades).
  """
  tables = {name: jnp.asarray(table) for name, table in (groupings or {}).items()}

  def eval_step(state: TrainState, batch: dict[str, jax.Array]):
    logits = model.apply({'params': state.params, 'batch_stats': state.batch_stats},
                         batch['image'], train=False)
    mask = batch['mask'].astype(jnp.float32)
    losses = cross_entropy(logits, batch['label'])
    predicted = jnp.argmax(logits, -1)
    correct = (predicted == batch['label']).astype(jnp.float32)
    sums = dict(loss=jnp.sum(losses * mask), correct=jnp.sum(correct * mask),
                count=jnp.sum(mask))
    for name, table in tables.items():
      right_group = (table[predicted] == table[batch['label']]).astype(jnp.float32)
      sums[f'correct_{name}'] = jnp.sum(right_group * mask)
    if axis_name is not None:
      sums = jax.lax.psum(sums, axis_name)
    return sums

  return eval_step
