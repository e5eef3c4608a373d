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


def nonfinite_flags(loss: jax.Array, tree: Any) -> jax.Array:
  """[loss is not finite, leaf 0 of `tree` holds a NaN or Inf, leaf 1 ...] as one bool vector."""
  leaves = [~jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.stack([~jnp.isfinite(loss), *leaves])


def cast_floats(tree: Any, dtype: Any) -> Any:
  """Floating-point leaves cast to `dtype` (the compute copy of float32 parameters)."""
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def model_inputs(batch: dict[str, jax.Array], input_keys: tuple[str, ...],
                 compute_dtype: Any = None) -> list[jax.Array]:
  """The arrays a model is called with, in its argument order; floating ones (images,
  cached features) cast to `compute_dtype`, token ids left as they are."""
  inputs = [batch[key] for key in input_keys]
  return cast_floats(inputs, compute_dtype) if compute_dtype is not None else inputs


def _microbatches(batch: dict[str, jax.Array], count: int) -> dict[str, jax.Array]:
  """(count, B / count, ...) with microbatch i = rows i, i + count, ...: every device's shard
  of the batch axis holds rows of every microbatch, so each microbatch still spans all devices."""
  def split(x):
    if x.shape[0] % count:
      raise ValueError(f'batch of {x.shape[0]} does not split into {count} microbatches '
                       '(optim.grad_accum_steps)')
    return jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation, mask: Any,
                    schedule: optax.Schedule, seed: int, label_smoothing: float = 0.0,
                    axis_name: str | None = None, compute_dtype: Any = None,
                    grad_accum_steps: int = 1, input_keys: tuple[str, ...] = ('image',)
                    ) -> Callable:
  """Returns train_step(state, batch) -> (state, metrics).

  `metrics['nonfinite']` flags a non-finite loss and each trainable gradient leaf
  (tljax.numerics names them).

  `mask` is the static boolean pytree of trainable leaves. Under pmap, `axis_name` names the
  device axis over which gradients and metrics are averaged. `compute_dtype` (e.g. bfloat16)
  casts parameters and images for the forward and backward passes; parameters, gradients and
  optimizer state stay float32. `grad_accum_steps` > 1 runs the batch as that many sequential
  microbatches and averages their gradients (BatchNorm statistics update once per microbatch).
  """
  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    trainable, frozen = split_trainable(state.params, mask)
    dropout_rng = jax.random.fold_in(jax.random.key(seed), state.step)
    if axis_name is not None:
      dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axis_name))

    def loss_fn(trainable_params, batch_stats, micro, rng):
      params = merge_trainable(mask, trainable_params, frozen)
      if compute_dtype is not None:
        params = cast_floats(params, compute_dtype)
      logits, updates = model.apply(
          {'params': params, 'batch_stats': batch_stats},
          *model_inputs(micro, input_keys, compute_dtype), train=True,
          mutable=['batch_stats'], rngs={'dropout': rng})
      loss = jnp.mean(cross_entropy(logits, micro['label'], label_smoothing))
      correct = jnp.mean(jnp.argmax(logits, -1) == micro['label'])
      return loss, (correct, updates['batch_stats'])

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum_steps == 1:
      (loss, (accuracy, batch_stats)), grads = grad_fn(trainable, state.batch_stats, batch,
                                                       dropout_rng)
    else:
      def accumulate(carry, inputs):
        grad_sum, loss_sum, correct_sum, stats = carry
        index, micro = inputs
        (loss, (correct, stats)), grads = grad_fn(trainable, stats, micro,
                                                  jax.random.fold_in(dropout_rng, index))
        grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
        return (grad_sum, loss_sum + loss, correct_sum + correct, stats), None

      zeros = jax.tree.map(jnp.zeros_like, trainable)
      (grads, loss, accuracy, batch_stats), _ = jax.lax.scan(
          accumulate, (zeros, 0.0, 0.0, state.batch_stats),
          (jnp.arange(grad_accum_steps), _microbatches(batch, grad_accum_steps)))
      grads, loss, accuracy = jax.tree.map(lambda x: x / grad_accum_steps,
                                           (grads, loss, accuracy))
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
                   lr=schedule(state.step), nonfinite=nonfinite_flags(loss, grads))
    return TrainState(state.step + 1, params, batch_stats, opt_state), metrics

  return train_step


def make_eval_step(model: nn.Module, axis_name: str | None = None,
                   groupings: dict[str, Any] | None = None, compute_dtype: Any = None,
                   input_keys: tuple[str, ...] = ('image',)) -> Callable:
  """Returns eval_step(state, batch) -> summed metrics; `batch['mask']` zeroes padding.

  `confusion[true, predicted]` counts the batch's examples (on device, exact integers), from
  which tljax.class_metrics derives per-class results. `groupings` maps a name to a class ->
  group table; `correct_<name>` counts predictions in the right group (e.g. defective or not,
  from four defect grades).
  """
  tables = {name: jnp.asarray(table) for name, table in (groupings or {}).items()}

  def eval_step(state: TrainState, batch: dict[str, jax.Array]):
    params = state.params
    if compute_dtype is not None:
      params = cast_floats(params, compute_dtype)
    logits = model.apply({'params': params, 'batch_stats': state.batch_stats},
                         *model_inputs(batch, input_keys, compute_dtype), train=False)
    mask = batch['mask'].astype(jnp.float32)
    losses = cross_entropy(logits, batch['label'])
    predicted = jnp.argmax(logits, -1)
    correct = (predicted == batch['label']).astype(jnp.float32)
    num_classes = logits.shape[-1]
    confusion = jnp.zeros((num_classes, num_classes), jnp.int32).at[
        batch['label'], predicted].add(batch['mask'].astype(jnp.int32))
    sums = dict(loss=jnp.sum(losses * mask), correct=jnp.sum(correct * mask),
                count=jnp.sum(mask), confusion=confusion)
    for name, table in tables.items():
      right_group = (table[predicted] == table[batch['label']]).astype(jnp.float32)
      sums[f'correct_{name}'] = jnp.sum(right_group * mask)
    if axis_name is not None:
      sums = jax.lax.psum(sums, axis_name)
    return sums

  return eval_step
