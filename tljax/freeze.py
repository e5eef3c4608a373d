"""Freeze groups: ordered (regex, rule) pairs -> one label per parameter leaf, and their summary.

A rule of `None` freezes the matched leaves; a dict may set `lr_mult` and `wd_mult`. Patterns are
matched with `re.fullmatch` on `a/b/c` paths, first match wins; a leaf that no pattern covers, a
pattern that matches nothing, or a configuration that freezes everything is an error.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flax import traverse_util

from tljax.errors import UserError

FROZEN = 'frozen'
ADAPTED = -1  # the index of the group tljax.build puts first to freeze LoRA-adapted kernels
RULE_KEYS = ('lr_mult', 'wd_mult')


class FreezeError(UserError):
  """A freeze-group configuration that cannot label every parameter exactly once."""


@dataclasses.dataclass(frozen=True)
class Group:
  index: int
  pattern: str
  lr_mult: float | None  # None: frozen
  wd_mult: float

  @property
  def frozen(self) -> bool:
    return self.lr_mult is None

  @property
  def label(self) -> str:
    return FROZEN if self.frozen else f'group{self.index}'


def parse_groups(groups: Sequence[Any]) -> list[Group]:
  """Validates the config's `optim.groups` list into Group records."""
  if not groups:
    raise FreezeError('optim.groups is empty: add at least (".*", {}) to train everything')
  parsed = []
  for index, item in enumerate(groups):
    if not isinstance(item, (tuple, list)) or len(item) != 2:
      raise FreezeError(f'optim.groups[{index}] must be a (regex, rule) pair, got {item!r}')
    pattern, rule = item
    try:
      re.compile(pattern)
    except (re.error, TypeError) as e:
      raise FreezeError(f'optim.groups[{index}] pattern {pattern!r} is not a regex: {e}'
                        ) from None
    if rule is None:
      parsed.append(Group(index, pattern, None, 0.0))
      continue
    rule = dict(rule)
    unknown = sorted(set(rule) - set(RULE_KEYS))
    if unknown:
      raise FreezeError(f'optim.groups[{index}] ({pattern!r}) has unknown rule keys {unknown}; '
                        f'allowed: {list(RULE_KEYS)}, or None to freeze')
    multipliers = {key: rule.get(key, 1.0) for key in RULE_KEYS}
    for key, value in multipliers.items():
      if (not isinstance(value, (int, float)) or isinstance(value, bool)
          or not math.isfinite(value) or value < 0):
        raise FreezeError(f'optim.groups[{index}] ({pattern!r}): {key}={value!r} must be a '
                          'number >= 0')
    parsed.append(Group(index, pattern, float(multipliers['lr_mult']),
                        float(multipliers['wd_mult'])))
  return parsed


def flat_paths(tree: Mapping[str, Any]) -> dict[str, Any]:
  """`{'a': {'b': x}}` -> `{'a/b': x}`, the path form every pattern is matched against."""
  return traverse_util.flatten_dict(tree, sep='/')


def assign_groups(params: Mapping[str, Any], groups: Sequence[Group]) -> dict[str, Group]:
  """Maps each `a/b/c` parameter path to the first group whose pattern fullmatches it."""
  compiled = [(group, re.compile(group.pattern)) for group in groups]
  assigned: dict[str, Group] = {}
  uncovered = []
  for path in flat_paths(params):
    match = next((group for group, regex in compiled if regex.fullmatch(path)), None)
    if match is None:
      uncovered.append(path)
    else:
      assigned[path] = match
  if uncovered:
    shown = ', '.join(uncovered[:5]) + (' ...' if len(uncovered) > 5 else '')
    raise FreezeError(f'{len(uncovered)} parameter(s) match no pattern in optim.groups: {shown}; '
                      "end the list with ('.*', {}) or (\".*\", None)")
  used = {group.index for group in assigned.values()}
  for group in groups:
    if group.index not in used:
      raise FreezeError(f'optim.groups[{group.index}] pattern {group.pattern!r} matches no '
                        'parameter (or only ones an earlier pattern took)')
  if all(group.frozen for group in assigned.values()):
    raise FreezeError('every parameter is frozen by optim.groups: nothing would train')
  return assigned


def label_tree(params: Mapping[str, Any], groups: Sequence[Group]) -> dict[str, Any]:
  """A pytree shaped like `params` holding each leaf's optimizer label."""
  assigned = assign_groups(params, groups)
  return traverse_util.unflatten_dict({k: g.label for k, g in assigned.items()}, sep='/')


def trainable_mask(labels: Mapping[str, Any]) -> dict[str, Any]:
  """Boolean pytree: True where the leaf trains."""
  flat = flat_paths(labels)
  return traverse_util.unflatten_dict({k: v != FROZEN for k, v in flat.items()}, sep='/')


def frozen_norm_paths(labels: Mapping[str, Any], batch_stats: Mapping[str, Any]
                      ) -> frozenset[str]:
  """Module paths of BatchNorms whose scale is frozen: they run on their running averages."""
  flat_labels = flat_paths(labels)
  modules = {path.rsplit('/', 1)[0] for path in flat_paths(batch_stats)}
  return frozenset(m for m in modules if flat_labels.get(f'{m}/scale') == FROZEN)


def stage_groups(stages: Sequence[str], frozen_stages: int,
                 head_rule: Mapping[str, float] | None = None) -> list[tuple[str, Any]]:
  """Groups freezing the first `frozen_stages` of a model's ordered STAGES.

  `frozen_stages=len(stages) - 1` is a linear probe (everything but the head frozen).
  """
  if not 0 <= frozen_stages < len(stages):
    raise FreezeError(f'freeze.preset=\'stages:{frozen_stages}\' must freeze 0 to '
                      f'{len(stages) - 1} stages of {list(stages)}')
  groups: list[tuple[str, Any]] = []
  if frozen_stages:
    groups.append((stage_patterns(stages[:frozen_stages]), None))
  if frozen_stages == len(stages) - 1:  # only the head is left: one group, with its rule
    return [*groups, ('.*', dict(head_rule or {}))]
  if head_rule is not None:
    groups.append((f'{re.escape(stages[-1])}/.*', dict(head_rule)))
  groups.append(('.*', {}))
  return groups


PRESETS = ('full', 'linear_probe', 'scratch', 'stages:K', 'bitfit', 'norm')

# Normalisation layers' parameters: every tljax model names its BatchNorm and LayerNorm modules
# `*bn*`, `*norm*` or `ln<N>` (tests/test_strategies.py holds each registered model to it).
NORM_PARAMS = r'(.*/)?(\w*bn\d*|\w*norm\d*|ln\d*)/(scale|bias)'
BIASES = r'(.*/)?bias'


def _tuning_groups(preset: str, stages: Sequence[str], head_rule: Mapping[str, float]
                   ) -> list[tuple[str, Any]]:
  """BitFit (Ben Zaken et al. 2022: every bias and the normalisation parameters) or norm-only
  tuning: those leaves and the head train, everything else is frozen."""
  trained = NORM_PARAMS if preset == 'norm' else f'{BIASES}|{NORM_PARAMS}'
  return [(f'{re.escape(stages[-1])}/.*', dict(head_rule)), (trained, {}), ('.*', None)]


def preset_groups(preset: str, stages: Sequence[str], head_lr_mult: float = 1.0
                  ) -> list[tuple[str, Any]]:
  """`optim.groups` for a named freeze depth, so common configs need no regex.

  'full' and 'scratch' train everything (scratch also drops the pretrained init, in train.py),
  'linear_probe' trains only the head, 'stages:K' freezes the first K of the model's STAGES,
  'bitfit' and 'norm' train the biases and normalisation parameters (or the latter only) and
  the head.
  """
  if preset in ('bitfit', 'norm'):
    return _tuning_groups(preset, stages, dict(lr_mult=head_lr_mult) if head_lr_mult != 1.0
                          else {})
  if preset in ('full', 'scratch'):
    frozen = 0
  elif preset == 'linear_probe':
    frozen = len(stages) - 1
  else:
    kind, _, count = preset.partition(':')
    if kind != 'stages' or not count.isdigit():
      raise FreezeError(f'freeze.preset must be one of {list(PRESETS)}, got {preset!r}')
    frozen = int(count)
  head_rule = None if head_lr_mult == 1.0 else dict(lr_mult=head_lr_mult)
  return stage_groups(stages, frozen, head_rule)


def preset_line(preset: str | None, stages: Sequence[str], model_name: str) -> str | None:
  """What a `stages:K` preset freezes, by name: K counts STAGES from the stem, so on
  MobileNetV2 'stages:7' freezes stem and stage1-6, and stage7 trains."""
  if not preset or not preset.startswith('stages:'):
    return None
  count = int(preset.partition(':')[2])
  frozen, trained = stages[:count], stages[count:]
  return (f'freeze.preset={preset!r}: the first {count} of {model_name}\'s {len(stages)} STAGES '
          f'(counted from the stem) are frozen: {", ".join(frozen)}; trained: '
          f'{", ".join(trained)}')


def stage_patterns(stages: Sequence[str]) -> str:
  """One regex matching every parameter path under any of `stages`."""
  return '({})/.*'.format('|'.join(re.escape(s) for s in stages))


def stage_of(path: str, stages: Sequence[str]) -> int | None:
  """Index in `stages` of the stage a parameter path lies under (an adapter under `lora/` lies
  under its kernel's stage); None for a path under no stage."""
  parts = path.split('/')
  if parts[0] == 'lora':
    parts = parts[1:]
  return next((i for i, stage in enumerate(stages) if parts[0] == stage), None)


def decay_groups(groups: Sequence[Group], params: Mapping[str, Any], stages: Sequence[str],
                 decay: float) -> list[Group]:
  """Layer-wise learning-rate decay written out as groups: each trainable group splits into one
  group per stage whose leaves it takes, with lr_mult times decay**(stages from it to the head,
  the head itself 0). Frozen groups, and leaves under no stage, keep their group as it is."""
  assigned = assign_groups(params, groups)
  result: list[Group] = []
  for group in groups:
    taken = [path for path, g in assigned.items() if g.index == group.index]
    if group.frozen:  # (the LoRA-adapted kernels' group keeps its own index, ADAPTED)
      result.append(group if group.index == ADAPTED else
                    dataclasses.replace(group, index=len(result)))
      continue
    by_stage = {stage_of(path, stages) for path in taken}
    for index in sorted((i for i in by_stage if i is not None), reverse=True):
      stage = re.escape(stages[index])
      pattern = (f'(lora/)?{stage}/.*' if group.pattern == '.*' else
                 f'(?=(lora/)?{stage}/)(?:{group.pattern})')
      result.append(Group(len(result), pattern,
                          group.lr_mult * decay ** (len(stages) - 1 - index), group.wd_mult))
    if None in by_stage:  # leaves under no stage: the group's own rule
      result.append(dataclasses.replace(group, index=len(result)))
  return result


def frozen_stage_count(labels: Mapping[str, Any], stages: Sequence[str]) -> int:
  """How many leading STAGES are entirely frozen (stages without parameters count as frozen)."""
  flat = flat_paths(labels)
  by_stage = {path: stage_of(path, stages) for path in flat}
  count = 0
  for index in range(len(stages)):  # a stage's LoRA adapters (lora/<stage>/...) count as its own
    stage_labels = [v for k, v in flat.items() if by_stage[k] == index]
    if not all(label == FROZEN for label in stage_labels):
      break
    count += 1
  return count


def summary_rows(params: Mapping[str, Any], groups: Sequence[Group], base_lr: float
                 ) -> list[dict[str, Any]]:
  """One row per group: pattern, tensors, parameters, trainable or frozen, learning rate."""
  assigned = assign_groups(params, groups)
  flat = flat_paths(params)
  rows = []
  for group in groups:
    leaves = [flat[p] for p, g in assigned.items() if g.index == group.index]
    rows.append(dict(group=group.index, pattern=group.pattern, tensors=len(leaves),
                     params=int(sum(np.prod(np.shape(x)) for x in leaves)),
                     status='frozen' if group.frozen else 'trainable',
                     lr=None if group.frozen else base_lr * group.lr_mult,
                     wd_mult=None if group.frozen else group.wd_mult))
  return rows


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """Plain-text table of `summary_rows`, with a total line."""
  header = ('group', 'pattern', 'tensors', 'params', 'status', 'lr')
  body = [('lora' if r['group'] == ADAPTED else str(r['group']), r['pattern'], str(r['tensors']),
           f"{r['params']:,}", r['status'],
           '-' if r['lr'] is None else f"{r['lr']:.3g}") for r in rows]
  trainable = sum(r['params'] for r in rows if r['status'] == 'trainable')
  total = sum(r['params'] for r in rows)
  body.append(('', 'total', str(sum(r['tensors'] for r in rows)), f'{total:,}',
               f'{trainable:,} trainable', ''))
  widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
  line = lambda cells: '  '.join(c.ljust(w) for c, w in zip(cells, widths, strict=True))
  return '\n'.join([line(header), line(['-' * w for w in widths])] + [line(b) for b in body])
