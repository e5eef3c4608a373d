"""Gradual unfreezing (Howard & Ruder 2018, ULMFiT; fastai's `freeze_to`): phases of labels.

A run starts as a linear probe and, at each boundary, one more stage from the top trains, until
the depth the freeze groups set is reached. Each phase is the final labelling with the stages
below its frontier relabelled frozen, so the one optax.multi_transform stays the mechanism: a
phase compiles its own step (frozen stages cost only their forward pass, as in a static
`stages:K` run) and its own optimizer state, into which `carry_state` moves the earlier phase's
moments (newly unfrozen leaves start from zero).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from tljax.errors import UserError
from tljax.freeze import FROZEN, flat_paths, stage_of

MAX_STEP = 2**31 - 1  # the train state counts steps in int32


class UnfreezeError(UserError):
  """A gradual-unfreezing schedule that cannot be followed."""


@dataclasses.dataclass(frozen=True)
class Phase:
  after: int  # the phase trains steps after this one (0: from the start)
  frozen: int  # leading STAGES frozen in this phase


def _explicit(pairs: Any, stages: Sequence[str], floor: int) -> list[Phase]:
  """Phases from freeze.unfreeze = ((step, stage), ...)."""
  if not isinstance(pairs, (tuple, list)) or not pairs:
    raise UnfreezeError(f'freeze.unfreeze={pairs!r} must be a non-empty list of (step, stage) '
                        'pairs, e.g. ((100, "stage7"), (200, "stage6"))')
  phases = [Phase(0, len(stages) - 1)]
  for index, pair in enumerate(pairs):
    key = f'freeze.unfreeze[{index}]'
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
      raise UnfreezeError(f'{key}={pair!r} must be a (step, stage) pair')
    step, stage = pair
    if (isinstance(step, bool) or not isinstance(step, (int, np.integer))
        or not 1 <= step <= MAX_STEP):
      raise UnfreezeError(f'{key}: step {step!r} must be an integer in [1, {MAX_STEP}]')
    if stage not in stages:
      raise UnfreezeError(f'{key}: {stage!r} is not a stage of the model; its STAGES are '
                          f'{", ".join(stages)}')
    position = list(stages).index(stage)
    if step <= phases[-1].after:
      raise UnfreezeError(f'{key}: step {step} must come after step {phases[-1].after} of the '
                          'pair before (list the boundaries in increasing steps)')
    if position >= phases[-1].frozen:
      raise UnfreezeError(f'{key}: {stage!r} already trains by then; each pair must unfreeze '
                          f'a stage below the last ({stages[phases[-1].frozen]!r})')
    if position < floor:
      raise UnfreezeError(f'{key}: {stage!r} stays frozen by the freeze groups (the first '
                          f'{floor} stages are frozen throughout); unfreeze {stages[floor]!r} '
                          'or a stage above it')
    phases.append(Phase(int(step), position))
  return phases


def phases(freeze_config: Mapping[str, Any], stages: Sequence[str], floor: int
           ) -> list[Phase] | None:
  """The phases freeze.unfreeze_every or freeze.unfreeze ask for (None: neither is set).

  `floor`: the leading stages the freeze groups freeze throughout (the last phase's depth).
  """
  every, pairs = freeze_config.get('unfreeze_every'), freeze_config.get('unfreeze')
  if every is None and pairs is None:
    return None
  if every is not None and pairs is not None:
    raise UnfreezeError('freeze.unfreeze_every and freeze.unfreeze are both set; use one')
  if floor >= len(stages) - 1:
    key = 'freeze.unfreeze_every' if every is not None else 'freeze.unfreeze'
    raise UnfreezeError(f'{key}: the freeze groups train only the head, so there is nothing '
                        'to unfreeze; use freeze.preset full or stages:K with K < '
                        f'{len(stages) - 1}')
  if pairs is not None:
    return _explicit(pairs, stages, floor)
  return [Phase(every * i, len(stages) - 1 - i) for i in range(len(stages) - floor)]


def phase_at(schedule: Sequence[Phase], step: int) -> int:
  """Index of the phase that trains `step` (1-based); step 0 (nothing trained) is phase 0."""
  return max(i for i, phase in enumerate(schedule) if phase.after < max(step, 1))


def phase_labels(labels: Mapping[str, Any], stages: Sequence[str], frozen: int
                 ) -> dict[str, Any]:
  """`labels` with every leaf of the first `frozen` stages (adapters included) frozen."""
  flat = flat_paths(labels)
  relabelled = {path: FROZEN if (stage_of(path, stages) is not None
                                 and stage_of(path, stages) < frozen) else label
                for path, label in flat.items()}
  return traverse_util.unflatten_dict(relabelled, sep='/')


def _key(path: tuple) -> tuple:
  """A state leaf's path without the multi_transform label it lies under: a leaf keeps its key
  when its group's label changes (each label's state has the same structure)."""
  kept, skip = [], False
  for entry in path:
    if skip:
      skip = False
      continue
    kept.append(str(entry))
    skip = getattr(entry, 'name', None) == 'inner_states'
  return tuple(kept)


def carry_state(old: Any, new: Any) -> Any:
  """`new` (a phase's freshly initialised optimizer state) with every leaf that `old` (the
  earlier phase's) also holds taken from `old`: moments of leaves that trained stay, those of
  newly unfrozen leaves are zeros, step counts go on."""
  held = {_key(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(old)[0]}
  paths, treedef = jax.tree_util.tree_flatten_with_path(new)
  return jax.tree_util.tree_unflatten(
      treedef, [held.get(_key(path), leaf) for path, leaf in paths])


def unreached(schedule: Sequence[Phase], stages: Sequence[str], total_steps: int) -> str | None:
  """A warning when boundaries lie at or past the last step: their stages never train."""
  reached = [phase for phase in schedule if phase.after < total_steps]
  if len(reached) == len(schedule):
    return None
  never = stages[schedule[-1].frozen:reached[-1].frozen]
  return (f'warning: gradual unfreezing: a run of {total_steps} steps never passes the '
          f'boundaries at step {total_steps} or later, so {", ".join(never)} never train (the '
          'group table counts them as trainable); lower freeze.unfreeze_every or the steps of '
          'freeze.unfreeze, or raise total_steps')


def describe(schedule: Sequence[Phase], stages: Sequence[str]) -> str:
  """One line: which stages train from which step."""
  parts = [f'steps {phase.after + 1}+: {stages[phase.frozen]}..{stages[-1]}'
           for phase in schedule]
  return 'gradual unfreezing: ' + '; '.join(parts)
