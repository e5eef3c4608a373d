"""Non-finite values: found on device, named on the host, never saved.

The train step returns one flag per checked value (the loss, then every trainable gradient leaf);
the loop reads each step's flags one step late, so the host never waits for the step it has just
dispatched, and always before writing a checkpoint.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tljax.errors import TrainingFailed


class NonFiniteError(TrainingFailed):
  """A NaN or Inf in the loss, a gradient or the state; the message names the step and leaf."""


def leaf_paths(tree: Any) -> list[str]:
  """`a/b/c` for every leaf of `tree` (None is no leaf), in `jax.tree.leaves` order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return ['/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
                   for k in path) for path, _ in flat]


def _flagged(names: list[str], flags: np.ndarray) -> list[str]:
  return [name for name, flag in zip(names, flags, strict=True) if flag]


def first_nonfinite(flags: np.ndarray, names: list[str]) -> str | None:
  """A description of what `flags` (steps.nonfinite_flags) found, or None when all is finite."""
  flags = np.asarray(flags).reshape(-1, len(names) + 1)[0]  # pmap: every replica agrees
  if not flags.any():
    return None
  bad = _flagged(names, flags[1:])
  loss = 'the loss is not finite' if flags[0] else 'the loss is finite'
  if not bad:
    return loss
  return (f'{loss}; first non-finite gradient: {bad[0]} ({len(bad)} of {len(names)} '
          'trainable leaves)')


class StepCheck:
  """Holds the newest step's flags and checks the previous step's when the next one arrives."""

  def __init__(self, names: list[str]):
    self.names = names
    self.pending: tuple[int, jax.Array] | None = None

  def push(self, step: int, flags: jax.Array) -> None:
    self.flush()
    self.pending = (step, flags)

  def flush(self) -> None:
    """Checks the held flags (waiting for their step); raises NonFiniteError if any is set."""
    if self.pending is None:
      return
    step, flags = self.pending
    self.pending = None
    found = first_nonfinite(jax.device_get(flags), self.names)
    if found:
      raise NonFiniteError(f'non-finite values at step {step}: {found}. The run stopped before '
                           'saving them; its checkpoints hold finite values only. Lower '
                           'optim.lr, set optim.clip_norm, or check the data')


@jax.jit
def _state_flags(state: Any) -> jax.Array:
  return jnp.stack([~jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(state)])


def check_state(state: Any, step: int) -> None:
  """Refuses to let a state holding NaN or Inf reach a checkpoint."""
  names = leaf_paths(state)
  bad = _flagged(names, np.asarray(jax.device_get(_state_flags(state))))
  if bad:
    raise NonFiniteError(f'non-finite values in the state at step {step}, first in {bad[0]} '
                         f'({len(bad)} leaves); not writing this checkpoint')
