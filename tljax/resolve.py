"""The config a run uses, from the one it was given: the defaults filled in, the pretrained
source's model arguments and normalisation, freeze presets written out as optim.groups, every
value checked; and the checks that need the resolved config (eval groupings, accumulation).

tljax.train, tljax.ablate (every variant before the first runs) and the benchmarks resolve
through here, so a config means the same everywhere.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import ml_collections
import numpy as np

from tljax import config as config_lib
from tljax import freeze, saved_model
from tljax.errors import UserError
from tljax.models import get_entry
from tljax.weights import zoo


def _with_zoo_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A zoo source brings its model arguments and input normalisation unless the config sets
  them; so does a tljax workdir its normalisation (a linear probe, then full fine-tuning of its
  result, sees the same inputs)."""
  pretrained = config.init.pretrained
  text = get_entry(config.model.name).modality == 'text'
  if pretrained and pretrained not in zoo.ZOO and os.path.isdir(pretrained) and (
      config.data.tokenizer is None if text else
      config.data.mean is None and config.data.std is None):
    record = saved_model.read_record(pretrained)
    config = config.copy_and_resolve_references()
    with config.unlocked():
      if text:
        config.data.tokenizer = os.path.join(pretrained, saved_model.TOKENIZER_FILE)
      else:
        config.data.mean = tuple(record['preprocessing']['mean'])
        config.data.std = tuple(record['preprocessing']['std'])
    return config
  if pretrained not in zoo.ZOO:
    return config
  entry = zoo.get(config.init.pretrained)
  if entry.model != config.model.name:
    raise UserError(f'init.pretrained={config.init.pretrained!r} holds {entry.model!r} weights '
                    f'but model.name is {config.model.name!r}')
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for key, value in entry.model_kwargs:
      if key not in config.model:
        config.model[key] = value
    if text and config.data.tokenizer is None:
      config.data.tokenizer = zoo.TOKENIZERS.get(pretrained)
    if not text and config.data.mean is None and config.data.std is None:
      config.data.mean, config.data.std = entry.preprocessing.mean, entry.preprocessing.std
  return config


def model_value(config: ml_collections.ConfigDict, key: str) -> Any:
  """model.<key> as the model is built: the config's value, else the constructor's default."""
  value = config.model.get(key)
  if value is None:
    value = inspect.signature(get_entry(config.model.name).build).parameters[key].default
  return value


def check_tokenizer_fits(config: ml_collections.ConfigDict) -> None:
  """Every token id of data.tokenizer has a row in the model's embedding table (an id past it
  would read garbage, not fail)."""
  from tljax.data import text
  tokenizer = text.load_tokenizer(config.data.tokenizer, config.data.max_length)
  ids, rows = tokenizer.id_count, model_value(config, 'vocab_size')
  if ids > rows:
    raise UserError(f'tokenizer {config.data.tokenizer} (data.tokenizer) has token ids up to '
                    f'{ids - 1:,} but model {config.model.name!r} embeds {rows:,} tokens '
                    '(model.vocab_size); use the tokenizer of the pretrained weights, or set '
                    f'model.vocab_size to at least {ids:,} for a model trained from scratch')


def _check_text(config: ml_collections.ConfigDict) -> None:
  """A text model needs a tokenizer, and no more tokens than it has positions."""
  entry = get_entry(config.model.name)
  if entry.modality != 'text':
    return
  if not config.data.tokenizer:
    raise UserError(f'model {config.model.name!r} reads text: set data.tokenizer to an HF '
                    'tokenizer.json, or init.pretrained to a source that brings one '
                    f'({", ".join(zoo.TOKENIZERS)} or a tljax workdir of a text run)')
  positions = model_value(config, 'max_positions')
  if config.data.max_length > positions:
    raise UserError(f'data.max_length={config.data.max_length} is more than the '
                    f'{positions} positions of model {config.model.name!r} '
                    '(model.max_positions); longer texts are truncated to data.max_length, so '
                    f'set it to at most {positions}')


def _with_presets(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`freeze.preset` and `init.load_stages` written out as optim.groups and init.dont_load.

  Idempotent: a config that already went through it comes out the same.
  """
  preset, load_stages = config.freeze.preset, config.init.load_stages
  if preset is None and load_stages is None:
    return config
  stages = get_entry(config.model.name).stages
  config = config.copy_and_resolve_references()
  with config.unlocked():
    if preset is not None:
      groups = freeze.preset_groups(preset, stages, config.freeze.head_lr_mult)
      if config.optim.groups is not None and repr(list(config.optim.groups)) not in (
          repr(list(config_lib.base_config().optim.groups)), repr(groups)):
        raise UserError(f'freeze.preset={preset!r} and optim.groups are both set; '
                        'use one of them')
      config.optim.groups = groups
      if preset == 'scratch':
        config.init.pretrained = None
    if load_stages is not None:
      if not 0 <= load_stages < len(stages):
        raise UserError(f'init.load_stages must be in [0, {len(stages) - 1}] for stages '
                        f'{list(stages)}, got {load_stages}')
      not_loaded = freeze.stage_patterns(stages[load_stages:])
      if not_loaded not in config.init.dont_load:
        config.init.dont_load = (*config.init.dont_load, not_loaded)
  return config


def resolve_config(config: ml_collections.ConfigDict, source_given: bool = False
                   ) -> ml_collections.ConfigDict:
  """The config a run uses: defaults filled in, zoo defaults applied, presets written out, every
  value checked (`source_given`: the data is a Source passed to `run`, not data.source)."""
  config = _with_presets(_with_zoo_defaults(config_lib.resolve(config)))
  if config.select.mode is None:  # lower is better for a loss, higher for the rest
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.select.mode = 'min' if config.select.metric == 'loss' else 'max'
  config_lib.check_values(config, source_given)
  _check_text(config)
  return config


def grouping_tables(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """`eval_groupings` as class -> group lookup tables; every class must be in one group."""
  tables = {}
  for name, groups in config.eval_groupings.items():
    if not (isinstance(groups, (tuple, list)) and all(
        isinstance(g, (tuple, list)) and all(isinstance(c, int) and not isinstance(c, bool)
                                             for c in g) for g in groups)):
      raise UserError(f'eval_groupings.{name} must be groups of class ids, e.g. ((0, 1), (2, 3)),'
                      f' got {groups!r:.100}')
    table = np.full(config.model.num_classes, -1, np.int32)
    for group_index, classes in enumerate(groups):
      for cls in classes:
        if not 0 <= cls < len(table) or table[cls] != -1:
          raise UserError(f'eval_groupings.{name}: class {cls} is out of range or listed twice')
        table[cls] = group_index
    if (table < 0).any():
      raise UserError(f'eval_groupings.{name} leaves out classes '
                      f'{np.flatnonzero(table < 0).tolist()}')
    tables[name] = table
  return tables


def grad_accum_steps(config: ml_collections.ConfigDict, data_devices: int) -> int:
  """optim.grad_accum_steps, checked against the batch each device of the 'data' axis sees."""
  count = int(config.optim.grad_accum_steps)
  per_device = config.data.batch_size // data_devices
  if count < 1 or per_device % count:
    raise UserError(f'optim.grad_accum_steps={count} must be >= 1 and divide the per-device '
                    f'batch of {per_device} (data.batch_size={config.data.batch_size} over '
                    f'{data_devices} devices)')
  return count
