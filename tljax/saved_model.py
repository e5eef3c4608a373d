"""A workdir as a model: what a run records to be used later, and loading it back.

A run writes `model.json` beside config.json before its first step: the class names (folder
names, TFDS label names, ELPV grades), the preprocessing its evaluation used (image size,
resize, channels, mean and std) and the model config. `load` rebuilds the model and restores
the variables of the checkpoint asked for: 'last', 'best' (the one selected on the validation
split) or a step number.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections

from tljax.errors import UserError

RECORD_FILE = 'model.json'
TOKENIZER_FILE = 'tokenizer.json'  # a text run's tokenizer, copied into its workdir


def copy_tokenizer(data: ml_collections.ConfigDict, workdir: str) -> None:
  """The run's tokenizer.json into the workdir (whole or not at all), so the workdir can be
  used as a model, or as init.pretrained, without the package it came from."""
  import shutil

  from tljax.data import text
  from tljax.errors import TrainingFailed
  source = text.load_tokenizer(data.tokenizer, data.max_length).path
  target = os.path.join(workdir, TOKENIZER_FILE)
  if os.path.abspath(source) == os.path.abspath(target):
    return
  partial = f'{target}.{os.getpid()}.partial'
  try:
    shutil.copyfile(source, partial)
    os.replace(partial, target)
  except OSError as e:
    if os.path.exists(partial):
      os.remove(partial)
    raise TrainingFailed(f'could not write {target}: {e.strerror or e}') from None


def make_record(config: ml_collections.ConfigDict, class_names: Sequence[str] | None
                ) -> dict[str, Any]:
  """What `load` and `predict` need from a run, from its resolved config."""
  from tljax.data import preprocess, sources
  from tljax.models import get_entry
  data = config.data
  names = list(class_names) if class_names and len(class_names) == config.model.num_classes \
      else None
  if get_entry(config.model.name).modality == 'text':
    preprocessing = dict(modality='text', max_length=data.max_length, tokenizer=TOKENIZER_FILE)
  else:
    preprocessing = dict(
        image_size=data.image_size,
        resize_size=preprocess.resize_size(data) if data.augment else data.image_size,
        resize_mode=data.resize_mode, channels=data.channels,
        mean=list(data.mean or preprocess.IMAGENET_MEAN),
        std=list(data.std or preprocess.IMAGENET_STD))
  return dict(model=config.model.to_dict(), class_names=names, preprocessing=preprocessing,
              select=(dict(config.select) if sources.validation_split(data) is not None
                      else None),
              lora=(dict(rank=config.lora.rank, alpha=config.lora.alpha)
                    if config.lora.rank else None))


def read_record(workdir: str) -> dict[str, Any]:
  """model.json of `workdir`; for a workdir written before tljax recorded it, the same
  fields from its config.json (without class names)."""
  if not os.path.isdir(workdir):
    state = 'is not a directory' if os.path.lexists(workdir) else 'does not exist'
    raise UserError(f'workdir {workdir} {state}; name the workdir of a tljax run')
  path = os.path.join(workdir, RECORD_FILE)
  config_path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path) and not os.path.isfile(config_path):
    raise UserError(f'{workdir} is not a tljax workdir: it has neither {RECORD_FILE} nor '
                    'config.json')
  try:
    if os.path.isfile(path):
      with open(path, encoding='utf-8') as f:
        record = json.load(f)
      if not isinstance(record, dict) or not isinstance(record.get('model'), dict) \
          or not isinstance(record.get('preprocessing'), dict):
        raise ValueError('not a tljax model record')
      return record
    path = config_path
    with open(config_path, encoding='utf-8') as f:
      config = ml_collections.ConfigDict(json.load(f))
  except (OSError, ValueError, TypeError) as e:
    raise UserError(f'{path} cannot be read ({type(e).__name__}: {str(e)[:100]})') from None
  if config.get('baseline'):
    raise UserError(f'{workdir} holds a {config.baseline} baseline (scikit-learn, results only), '
                    'not a trained model: predict and export need the workdir of a training run')
  from tljax import config as config_lib
  try:
    return make_record(config_lib.resolve(config), None)
  except (KeyError, TypeError, AttributeError, UserError) as e:
    raise UserError(f'{workdir}/config.json does not describe a tljax run ({e})') from None


def resolve_step(workdir: str, step: str | int, record: dict[str, Any]) -> int | None:
  """The step number `step` ('best', 'last' or a number) names in `workdir`; None for 'last'
  (the newest checkpoint that restores). 'best' without a validation split is the last."""
  from tljax import checkpoint
  directory = os.path.join(workdir, 'checkpoints')
  steps = checkpoint.step_names(directory)
  if not steps:
    raise UserError(f'{workdir} holds no checkpoints (no {directory}/<step>); train first, '
                    'or name the workdir of a run that saved one')
  if step == 'last':
    return None
  if step == 'best':
    select = record.get('select')
    if not select:
      return None
    checkpoint.check_metrics_files(directory)
    import orbax.checkpoint as ocp
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    with ocp.CheckpointManager(os.path.abspath(directory), options=options) as manager:
      best = checkpoint.best_step(manager, select['metric'], select['mode'])
    if best is None:
      raise UserError(f'{workdir}: no checkpoint was saved with validation metrics, so none is '
                      "selected; use --step last or a step number")
    _warn_if_not_reported(workdir, best)
    return best
  text = str(step)
  if isinstance(step, bool) or not (isinstance(step, int) or checkpoint.STEP_NAME.fullmatch(text)):
    raise UserError(f"step {step!r} must be 'best', 'last' or a step number")
  number = int(text)
  if number not in steps:
    raise UserError(f'{workdir} has no checkpoint of step {number}; it has steps '
                    f'{", ".join(map(str, sorted(steps)))}')
  return number


def lora_spec(workdir: str, record: dict[str, Any]) -> dict[str, Any]:
  """{'rank', 'alpha'} of the LoRA adapters a workdir's checkpoints hold: model.json's record,
  else config.json's lora section; refused, naming the file, when neither says them sensibly."""
  spec, where = record.get('lora'), os.path.join(workdir, RECORD_FILE)
  if spec is None:
    where = os.path.join(workdir, 'config.json')
    try:
      with open(where, encoding='utf-8') as f:
        spec = (json.load(f).get('lora') or None)
    except (OSError, ValueError, AttributeError):
      spec = None
  rank = spec.get('rank') if isinstance(spec, dict) else None
  alpha = spec.get('alpha') if isinstance(spec, dict) else None
  if (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1
      or isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0
      or alpha == float('inf')):
    raise UserError(f'{workdir}: the checkpoint holds LoRA adapters, but {where} does not say '
                    f'their rank and alpha (found {spec!r:.80}); restore the lora section '
                    "{'rank': R, 'alpha': A} the run was trained with")
  return dict(rank=rank, alpha=float(alpha))


def _tuples(value: Any) -> Any:
  """JSON lists back to the tuples a model config holds (module fields must be hashable)."""
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _warn_if_not_reported(workdir: str, best: int) -> None:
  """A selected checkpoint removed since the run reported it leaves another as the best."""
  try:
    with open(os.path.join(workdir, 'results.json'), encoding='utf-8') as f:
      reported = json.load(f).get('selected_step')
  except (OSError, ValueError, AttributeError):
    return
  if isinstance(reported, int) and reported != best:
    print(f'warning: {workdir}/results.json reports step {reported} as selected, but its '
          f'checkpoint is gone; the best that remains is step {best}', file=sys.stderr,
          flush=True)


def load(workdir: str, step: str | int = 'best', merge_lora: bool = True
         ) -> tuple[Any, dict[str, Any], dict[str, Any]]:
  """(model, variables {'params', 'batch_stats'}, record) of a tljax workdir's checkpoint
  `step`: 'best' (selected on the validation split; the last without one), 'last' or a step
  number. `record` is model.json with the restored 'step' added. LoRA adapters are merged into
  their kernels (the model's outputs are the same), or with `merge_lora=False` kept in
  params['lora'] (the record's 'lora' says their rank and alpha)."""
  from tljax import checkpoint, lora
  from tljax.models import build_model
  record = read_record(workdir)
  number = resolve_step(workdir, step, record)
  resume = checkpoint.restore_newest(workdir, None, only=number)
  if resume.state is None:
    damaged = '; '.join(f'step {s}: {reason}' for s, reason in resume.damaged)
    raise UserError(f'{workdir}: no readable checkpoint' + (f' ({damaged})' if damaged else ''))
  kwargs = {k: _tuples(v) for k, v in record['model'].items() if k != 'name'}
  model = build_model(record['model']['name'], **kwargs)
  params = resume.state['params']
  if lora.LORA in params:
    spec = lora_spec(workdir, record)
    record = {**record, 'lora': spec}
    if merge_lora:
      params = lora.merge(params, spec['alpha'], spec['rank'])
  variables = {'params': params, 'batch_stats': resume.state.get('batch_stats') or {}}
  return model, variables, {**record, 'step': resume.step}
