"""Sweep definitions: a base config, named override sets and axes, expanded into variants.

Sweep files (configs/ablations/) return a `Sweep` from `get_config(arg)`; `tljax.ablate` runs it.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import re
import shlex
import string
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from tljax import config as config_lib
from tljax.errors import UserError
from tljax.report import PlotSpec

SEED_KEY = 'seed'


@dataclasses.dataclass(frozen=True)
class Axis:
  """One dimension of the product: `key` (a dotted config key) takes each of `values`;
  each `linked` key takes the value at the same position (e.g. steps that fit the data size)."""
  name: str
  key: str
  values: Sequence[Any]
  linked: Mapping[str, Sequence[Any]] = dataclasses.field(default_factory=dict)

  def overrides(self, index: int) -> dict[str, Any]:
    for key, values in self.linked.items():
      if len(values) != len(self.values):
        raise UserError(f'axis {self.name!r}: linked key {key!r} has {len(values)} values '
                        f'for {len(self.values)} axis values')
    return {self.key: self.values[index], **{k: v[index] for k, v in self.linked.items()}}


@dataclasses.dataclass(frozen=True)
class Sweep:
  """A base config (`file.py[:arg]`), named override sets, and axes whose product each set
  is crossed with. String override values may use `{sweep_dir}` and `{<axis name>}`."""
  base: str
  variants: Sequence[tuple] = (('', {}),)  # (name, overrides) or (name, overrides, tags)
  axes: Sequence[Axis] = ()
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # for every variant
  plot: PlotSpec | None = None
  title: str = ''
  # Published results shown under the measured rows: (label, {accuracy key: fraction}).
  published: Sequence[tuple[str, Mapping[str, float]]] = ()


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str  # its directory under the sweep's workdir
  group: str  # the name without the seed: variants averaged together in the table
  overrides: dict[str, Any]
  tags: dict[str, Any]


def _label(value: Any) -> str:
  text = 'all' if value is None else str(value)
  return re.sub(r'[^A-Za-z0-9_.=-]+', '', text.replace(':', ''))


def _substitute(value: Any, substitutions: Mapping[str, Any], variant: str, key: str) -> Any:
  """`value` with {sweep_dir} and {<axis name>} filled in (strings only; `{{` is a brace)."""
  if not isinstance(value, str) or '{' not in value:
    return value
  try:
    fields = [field for _, field, _, _ in string.Formatter().parse(value) if field is not None]
    bad = [field for field in fields if not field.isidentifier()]  # no .attr, [index], !r
    if bad:
      raise ValueError(f'{{{bad[0]}}}: only plain {{name}} fields are filled in')
    return value.format(**substitutions)
  except (KeyError, IndexError, ValueError) as e:
    raise UserError(f'sweep variant {variant!r}: {key}={value!r} names {e} but only '
                    f'{sorted(substitutions)} can be filled in (write a literal brace as '
                    '{{ or }})') from None


SAFE_NAME = re.compile(r'[A-Za-z0-9_=+-][A-Za-z0-9_.=+-]*')


def _check_axes(axes: Sequence[Axis]) -> None:
  for axis in axes:
    if not isinstance(axis.values, (list, tuple)) or not axis.values:
      raise UserError(f'sweep axis {axis.name!r} ({axis.key}) must have a non-empty list or '
                      f'tuple of values, got {axis.values!r}')
    if not SAFE_NAME.fullmatch(axis.name):
      raise UserError(f'sweep axis name {axis.name!r} must be letters, digits, _ . = + - (it '
                      'starts every variant directory name)')


def expand(sweep: Sweep, sweep_dir: str) -> list[Variant]:
  """Every (override set x axis point) as a Variant, in run order: sets outer, axes inner.
  Variant names are directory names inside `sweep_dir`: anything else is refused."""
  _check_axes(sweep.axes)
  variants, names = [], set()
  for item in sweep.variants:
    if (not isinstance(item, (tuple, list)) or len(item) not in (2, 3)
        or not isinstance(item[0], str) or not isinstance(item[1], Mapping)
        or (len(item) == 3 and not isinstance(item[2], Mapping))):
      raise UserError(f'sweep variant {item!r:.100} must be (name, {{key: value}}[, {{tag: '
                      'value}}])')
    set_name, set_overrides = item[0], dict(item[1])
    set_tags = dict(item[2]) if len(item) == 3 else {}
    for point in itertools.product(*(range(len(axis.values)) for axis in sweep.axes)):
      labels = {axis.name: axis.values[i] for axis, i in zip(sweep.axes, point, strict=True)}
      parts = [set_name] if set_name else []
      group_parts = list(parts)
      axis_overrides = {}
      for axis, i in zip(sweep.axes, point, strict=True):
        parts.append(f'{axis.name}{_label(axis.values[i])}')
        axis_overrides.update(axis.overrides(i))
        if axis.key != SEED_KEY:
          group_parts.append(parts[-1])
      name = '-'.join(parts) or 'base'
      if not SAFE_NAME.fullmatch(name):
        raise UserError(f'sweep variant name {name!r} is not a safe directory name: use '
                        'letters, digits and _ . = + - (not starting with a dot)')
      if name in names:
        raise UserError(f'sweep variant name {name!r} occurs twice')
      names.add(name)
      # Axis values as they are spelled in variant names, so '{sweep_dir}/base-k{k}-seed{seed}'
      # names the directory of another variant.
      substitutions = dict(sweep_dir=sweep_dir, **{k: _label(v) for k, v in labels.items()})
      overrides = {**sweep.overrides, **set_overrides, **axis_overrides}
      overrides = {k: _substitute(v, substitutions, name, k) for k, v in overrides.items()}
      variants.append(Variant(name, '-'.join(group_parts) or 'base', overrides,
                              {**set_tags, **labels, 'set': set_name}))
  return variants


def variant_config(base: ml_collections.ConfigDict, variant: Variant
                   ) -> ml_collections.ConfigDict:
  """The base config (resolved against the defaults) with the variant's overrides set."""
  config = config_lib.resolve(base)
  for key, value in variant.overrides.items():
    try:
      config_lib.set_override(config, key, value)
    except UserError as e:
      raise UserError(f'sweep variant {variant.name!r}: {e}') from None
  return config


def current_value(config: ml_collections.ConfigDict, key: str) -> Any:
  """The value of the dotted `key` in `config` (None where a part is missing)."""
  return functools.reduce(lambda node, part: node.get(part) if node is not None else None,
                          key.split('.'), config)


def _flag_value(value: Any) -> str:
  """How `--config.key=` spells `value`: strings raw, everything else as a Python literal."""
  return value if isinstance(value, str) else repr(tuple(value) if isinstance(value, list)
                                                   else value)


def command(sweep: Sweep, variant: Variant, sweep_dir: str,
            base: ml_collections.ConfigDict) -> str:
  """The shell command that runs `variant` alone, as the in-process runner would.

  A None override is left out when the base config already holds None (config flags cannot
  spell None for a typed key), and is an error otherwise.
  """
  try:  # unknown keys and nonsense values fail here, named, as the run would refuse them
    config_lib.check_values(variant_config(base, variant))
  except UserError as e:
    message = str(e)
    raise UserError(message if message.startswith('sweep variant') else
                    f'sweep variant {variant.name!r}: {message}') from None
  resolved = config_lib.resolve(base)
  args = ['python', '-m', 'tljax.train', f'--config={sweep.base}',
          f'--workdir={os.path.join(sweep_dir, variant.name)}']
  for key, value in [('--config', sweep.base), ('--workdir', sweep_dir),
                     *variant.overrides.items()]:
    text = value if isinstance(value, str) else repr(value)
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
      raise UserError(f'sweep variant {variant.name!r}: {key}={text!r} holds a newline or other '
                      'control character, which one printed command line cannot carry')
  for key, value in variant.overrides.items():
    if value is None:
      current = current_value(resolved, key)
      if current is not None:
        raise UserError(f'sweep variant {variant.name!r}: {key}=None cannot be written as a '
                        f'command-line flag over the base value {current!r}; make None the '
                        'base value and set the others in the sweep')
      continue
    if isinstance(value, list) or isinstance(current_value(resolved, key), list):
      raise UserError(f'sweep variant {variant.name!r}: {key} is a list, which a command-line '
                      'flag cannot set; put it in the base config, or sweep freeze.preset')
    args.append(f'--config.{key}={_flag_value(value)}')
  return ' '.join(shlex.quote(a) for a in args)


def strategy_variants(pointwise: str, probe: dict, lora_lr: dict, unfreeze_every: int,
                      l2sp: float) -> tuple:
  """(name, overrides, tags) of the fine-tuning strategies the strategy sweeps compare: full,
  linear probe, stages:4, layer decay 0.65 and 0.8, gradual unfreezing, BitFit, LoRA rank 4
  and 16 on the kernels `pointwise` matches (beside the head), L2-SP. `probe` adds overrides
  to the linear probe, `lora_lr` to the LoRA and BitFit runs."""
  def lora(rank):
    return {'freeze.preset': 'linear_probe', 'lora.rank': rank, 'lora.alpha': float(rank),
            'lora.targets': (pointwise,), **lora_lr}
  rows = (
      ('full', {'freeze.preset': 'full'}),
      ('linear_probe', {'freeze.preset': 'linear_probe', **probe}),
      ('stages4', {'freeze.preset': 'stages:4'}),
      ('decay0.65', {'freeze.preset': 'full', 'optim.layer_decay': 0.65}),
      ('decay0.8', {'freeze.preset': 'full', 'optim.layer_decay': 0.8}),
      ('gradual', {'freeze.preset': 'full', 'freeze.unfreeze_every': unfreeze_every}),
      ('bitfit', {'freeze.preset': 'bitfit', **lora_lr}),
      ('lora4', lora(4)),
      ('lora16', lora(16)),
      ('l2sp', {'freeze.preset': 'full', 'optim.l2sp': l2sp}),
  )
  return tuple((name, overrides, {'strategy': name}) for name, overrides in rows)
