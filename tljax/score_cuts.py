"""`python -m tljax.transferability`: every stage cut of a model scored in one forward pass.

The features a cut gives are the input of the stage after it, globally pooled (images: the mean
over positions; texts: the mean over real tokens), computed for the config's training split
(its k-per-class subset, without the validation hold-out, preprocessed without augmentation)
by the same interception that feature caching uses (tljax.features). A cut is named by the
frozen stages it stands for: `stages:K` feeds the input of STAGES[K] to the trainable rest.
LEEP and NCE use the source model's own head where the pretrained weights have one (a zoo
classifier, or a tljax workdir), its softmax over the source classes on the target examples.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from tljax import cli, console, resolve, score_sweep, transferability
from tljax import config as config_lib
from tljax import workdir as workdir_lib
from tljax.errors import UserError, exit_status

RESULTS_FILE = 'transferability.json'
TABLE_FILE = 'transferability.md'
PLOT_FILE = 'transferability.png'
DEFAULT_SHOTS = 10


@dataclasses.dataclass
class Candidate:
  """One pretrained model to score: its resolved config and the cuts asked for."""
  label: str  # the weights it starts from (init.pretrained)
  config: ml_collections.ConfigDict
  cuts: list[str]  # stage names whose input is scored


def _parser() -> cli.ArgumentParser:
  parser = cli.ArgumentParser(prog='python -m tljax.transferability',
                              description=transferability.__doc__.split('\n')[0])
  parser.add_argument('--config', required=True, help='training config file[:arg], as tljax.train')
  parser.add_argument('--workdir', required=True,
                      help=f'where {RESULTS_FILE} and {TABLE_FILE} are written')
  parser.add_argument('--cuts', default='all',
                      help="'all' (every stage after the first) or stage names, comma-separated")
  parser.add_argument('--models', default='',
                      help='zoo weights to score beside the config\'s, comma-separated '
                           '(e.g. efficientnet_lite0/imagenet)')
  parser.add_argument('--shots', type=int, default=DEFAULT_SHOTS,
                      help='examples per class the ridge probe fits (the rest test it)')
  parser.add_argument('--per-class', type=int, default=None,
                      help='score at most this many training examples per class (a seeded '
                           'subset, as data.examples_per_class draws it); default: all')
  parser.add_argument('--sweep', default=None,
                      help='a finished tljax.ablate directory: rank agreement with its accuracies')
  return parser


def _pretrained_config(config: ml_collections.ConfigDict, weights: str
                       ) -> ml_collections.ConfigDict:
  """`config` for another zoo model: its model and weights, the same task and data."""
  from tljax.weights import zoo
  entry = zoo.get(weights)
  other = config_lib.base_config()
  other.update_from_flattened_dict({'model.name': entry.model,
                                    'model.num_classes': config.model.num_classes,
                                    'init.pretrained': weights})
  with other.unlocked():
    other.data = config.data.copy_and_resolve_references()
    other.seed = config.seed
    other.init.dont_load = ('head/.*',)  # a new head for the target, as the config's own
    for key in ('mean', 'std', 'tokenizer'):  # the model's own normalisation and tokenizer
      if key in other.data:
        other.data[key] = None
  return other


def _cut_names(stages: Sequence[str], cuts: str, model: str) -> list[str]:
  """The stages whose input is scored: every stage after the first, or those named."""
  if cuts == 'all':
    return list(stages[1:])
  names = {c.strip() for c in cuts.split(',') if c.strip()}
  unknown = sorted(c for c in names if c not in stages[1:])
  if unknown or not names:
    raise UserError(f'--cuts {cuts!r}: {unknown or "no stage"} is not a stage of {model!r} '
                    f'after its first; choose from {", ".join(stages[1:])} or \'all\'')
  return [stage for stage in stages[1:] if stage in names]  # in the model's order


def candidates(config: ml_collections.ConfigDict, cuts: str, models: str) -> list[Candidate]:
  """The config's model and every zoo model of --models, each resolved and checked."""
  from tljax.models import get_entry
  from tljax.weights import zoo
  resolved = resolve.resolve_config(config)
  if not resolved.init.pretrained:
    raise UserError('init.pretrained is unset: transferability scores rank pretrained '
                    'features; set --config.init.pretrained (a zoo name, file or workdir)')
  found = [Candidate(str(resolved.init.pretrained), resolved,
                     _cut_names(get_entry(resolved.model.name).stages, cuts,
                                resolved.model.name))]
  for weights in [m.strip() for m in models.split(',') if m.strip()]:
    if weights not in zoo.ZOO:
      raise UserError(f'--models: {weights!r} is not a zoo name; known: {", ".join(zoo.ZOO)}')
    if weights in {c.label for c in found}:
      continue
    entry = zoo.get(weights)
    if get_entry(entry.model).modality != get_entry(resolved.model.name).modality:
      raise UserError(f'--models: {weights!r} reads {get_entry(entry.model).modality}, the '
                      f'config\'s data is {get_entry(resolved.model.name).modality}')
    other = resolve.resolve_config(_pretrained_config(resolved, weights))
    found.append(Candidate(weights, other, _cut_names(get_entry(entry.model).stages, 'all',
                                                      entry.model)))
  return found


def _source_classes(config: ml_collections.ConfigDict) -> int | None:
  """How many classes the pretrained weights' own head predicts (None: no head, or unknown)."""
  from tljax import saved_model
  from tljax.weights import zoo
  weights = config.init.pretrained
  if weights in zoo.ZOO:
    entry = zoo.get(weights)
    return entry.num_classes if entry.labels is not None and entry.num_classes else None
  if os.path.isdir(weights):
    model = saved_model.read_record(weights)['model']
    if model.get('name') != config.model.name:
      return None
    classes = model.get('num_classes')
    if not isinstance(classes, int) or isinstance(classes, bool) or classes < 1:
      raise UserError(f'{os.path.join(weights, saved_model.RECORD_FILE)}: model.num_classes is '
                      f'{classes!r}, not a class count; the workdir is damaged (restore that '
                      'file, or name other weights in init.pretrained)')
    return classes
  return None


def source_model(config: ml_collections.ConfigDict) -> tuple[Any, dict[str, Any], bool]:
  """(model, variables, whether its output is the source head's): the pretrained weights with
  their own head where they have one, else the config's model (a fresh head)."""
  from tljax import build
  from tljax.models import build_model
  classes = _source_classes(config)
  if classes is not None:
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.model.num_classes, config.init.dont_load = classes, ()
  kwargs = {k: v for k, v in config.model.to_dict().items() if k != 'name'}
  model = build_model(config.model.name, **kwargs)
  variables, report = build.load_variables(config, model)
  head_loaded = classes is not None and not any(
      path.startswith('params/head/') for path in (report or {}).get('kept_fresh', ()))
  return model, variables, head_loaded


def _pool(value: Any, mask: Any) -> Any:
  """Global pooling of a stage's input: the mean over positions (images) or real tokens."""
  import jax.numpy as jnp
  x = value.astype(jnp.float32)
  if x.ndim == 2:
    return x
  if x.ndim == 3 and mask is not None:
    weights = mask.astype(jnp.float32)[..., None]
    return (x * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
  return x.reshape(x.shape[0], -1, x.shape[-1]).mean(1)


def extract(candidate: Candidate, source: Any) -> dict[str, Any]:
  """Pooled features at every cut, the source head's probabilities (None without one) and the
  labels of the candidate's training split, from one forward pass per batch."""
  import jax

  from tljax import features
  from tljax.data import pipeline
  from tljax.models import get_entry
  config = candidate.config
  entry = get_entry(config.model.name)
  model, variables, head = source_model(config)
  keys = entry.inputs
  mask_key = 'attention_mask' if 'attention_mask' in keys else None

  @jax.jit
  def run(variables, inputs):
    seen, output = features.stage_inputs(model, variables, inputs, candidate.cuts)
    mask = inputs[keys.index(mask_key)] if mask_key else None
    pooled = {name: _pool(value, mask) for name, value in seen.items()}
    return pooled, jax.nn.softmax(output.astype('float32')) if head else None

  size = int(config.data.batch_size)
  pooled: dict[str, list[np.ndarray]] = {name: [] for name in candidate.cuts}
  probabilities, labels = [], []
  start = time.perf_counter()
  for batch in pipeline.ordered_train_examples(source, config.data, config.seed):
    count = len(batch['label'])
    inputs = [np.concatenate([batch[k], np.repeat(batch[k][-1:], size - count, 0)])
              if count < size else batch[k] for k in keys]  # one shape: one compilation
    seen, probs = run(variables, inputs)
    for name in candidate.cuts:
      pooled[name].append(np.asarray(seen[name])[:count])
    if probs is not None:
      probabilities.append(np.asarray(probs)[:count])
    labels.append(np.asarray(batch['label']))
  if not labels:
    raise UserError(f'the training split {config.data.train_split!r} has no examples')
  return dict(features={k: np.concatenate(v) for k, v in pooled.items()},
              probabilities=np.concatenate(probabilities) if probabilities else None,
              labels=np.concatenate(labels), seconds=time.perf_counter() - start)


def _shots(labels: np.ndarray, wanted: int) -> int | None:
  """The ridge probe's shots: `wanted`, lowered to half the smallest class where it has fewer
  examples than wanted + 1 (the rest of each class tests the probe); None where a class has a
  single example (nothing would be left to test on)."""
  smallest = int(np.bincount(labels)[np.unique(labels)].min())
  if smallest < 2:
    return None
  return wanted if smallest > wanted else smallest // 2


def score_features(pooled: np.ndarray, labels: np.ndarray, shots: int | None, seed: int
                   ) -> tuple[dict[str, float | None], float]:
  """LogME, H-score and the ridge probe (None without shots) of one cut's features, and the
  seconds they took."""
  start = time.perf_counter()
  scores: dict[str, float | None] = {
      name: fn(pooled, labels) for name, fn in transferability.FEATURE_SCORES.items()}
  scores['ridge'] = (None if shots is None else
                     transferability.ridge_probe(pooled, labels, shots, seed))
  return scores, time.perf_counter() - start


def _scored_config(config: ml_collections.ConfigDict, per_class: int | None = None
                   ) -> ml_collections.ConfigDict:
  """The config the features are computed with: no augmentation, the evaluation batch size,
  and at most `per_class` examples of each class (a subset drawn as data.examples_per_class
  draws it)."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.augment = False  # the features of the examples, not of random crops
    config.data.batch_size = config.data.eval_batch_size or config.data.batch_size
    if per_class is not None:
      current = config.data.examples_per_class
      config.data.examples_per_class = per_class if current is None else min(current,
                                                                                per_class)
  return config


def check_data(candidate: Candidate, per_class: int | None = None) -> Any:
  """The candidate's data source, once its splits are known to suit the config (labels within
  model.num_classes, every class in the training split), as tljax.train checks them."""
  from tljax.data import pipeline, sources
  from tljax.models import get_entry
  config = _scored_config(candidate.config, per_class)
  source = sources.with_validation(
      sources.make_source(config.data, get_entry(config.model.name).modality), config.data)
  pipeline.check_splits(source, config.data, config.model.num_classes)
  return source


def score(candidates_: Sequence[Candidate], shots: int, per_class: int | None = None
          ) -> dict[str, Any]:
  """Scores of every cut of every candidate (on at most `per_class` examples of each class),
  with the feature and scoring times."""
  from tljax.models import get_entry
  rows, models = [], []
  sources_ = [check_data(candidate, per_class) for candidate in candidates_]  # checked first
  for candidate, source in zip(candidates_, sources_, strict=True):
    candidate = dataclasses.replace(candidate,
                                    config=_scored_config(candidate.config, per_class))
    config = candidate.config
    entry = get_entry(config.model.name)
    print(f'{candidate.label}: features at {len(candidate.cuts)} cut(s) of '
          f'{config.model.name} ...', flush=True)
    found = extract(candidate, source)
    labels = transferability._checked_labels(found['labels'])
    used_shots = _shots(labels, shots)
    source_scores, source_seconds = {}, 0.0
    if found['probabilities'] is not None:
      start = time.perf_counter()
      source_scores = {name: fn(found['probabilities'], labels)
                       for name, fn in transferability.SOURCE_SCORES.items()}
      source_seconds = time.perf_counter() - start
    for name in candidate.cuts:
      pooled = found['features'][name]
      values, seconds = score_features(pooled, labels, used_shots, config.seed)
      rows.append(dict(model=candidate.label, model_name=config.model.name, cut=name,
                       frozen_stages=entry.stages.index(name), dims=int(pooled.shape[1]),
                       seconds=seconds, **values,
                       **(source_scores if name == entry.stages[-1] else {})))
    models.append(dict(model=candidate.label, model_name=config.model.name,
                       examples=int(len(labels)), classes=int(len(np.unique(labels))),
                       shots=used_shots, feature_seconds=found['seconds'],
                       source_head=found['probabilities'] is not None,
                       source_seconds=source_seconds, **source_scores))
    print(f'  {len(labels)} examples, {found["seconds"]:.1f} s for the features (compilation '
          f'included), {sum(r["seconds"] for r in rows if r["model"] == candidate.label):.1f} s '
          'to score them', flush=True)
  return dict(rows=rows, models=models)


def _fmt(value: float | None, pattern: str) -> str:
  return 'n/a' if value is None else pattern.format(value)


def markdown(result: dict[str, Any]) -> str:
  """The ranked table: cuts by LogME, best first, every score and the seconds to score."""
  rows = sorted(result['rows'], key=lambda r: -r['logme'])
  lines = ['| rank | model | cut | frozen | dims | LogME | H-score | ridge % | LEEP | NCE | '
           'seconds |', '| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | '
           '---: |']
  for rank, row in enumerate(rows, 1):
    ridge = None if row['ridge'] is None else 100 * row['ridge']
    lines.append(
        f'| {rank} | {row["model"]} | {row["cut"]} | {row["frozen_stages"]} | {row["dims"]} | '
        f'{row["logme"]:.4f} | {row["h_score"]:.3f} | {_fmt(ridge, "{:.1f}")} | '
        f'{_fmt(row.get("leep"), "{:.4f}")} | {_fmt(row.get("nce"), "{:.4f}")} | '
        f'{row["seconds"]:.2f} |')
  notes = []
  for m in result['models']:
    probe = (f'ridge probe on {m["shots"]} per class' if m['shots'] is not None else
             'no ridge probe (a class has a single example)')
    head = (f'its source head gives LEEP {m["leep"]:.4f} and NCE {m["nce"]:.4f} (shown on the '
            'linear-probe cut, the input of the head)' if m['source_head'] else
            'LEEP and NCE n/a (the weights have no source head)')
    notes.append(f'{m["model"]}: {m["examples"]} examples of {m["classes"]} classes, features '
                 f'in {m["feature_seconds"]:.1f} s (one pass, compilation included); {probe}; '
                 f'{head}')
  return '\n'.join(lines) + '\n\n' + '\n'.join(f'- {n}' for n in notes) + '\n'


# Data keys that change neither which examples are scored nor what they look like.
NOT_SCORED_DATA_KEYS = ('batch_size', 'eval_batch_size', 'augment', 'cache_features',
                        'cache_decoded', 'shuffle_buffer', 'skip_corrupt_images',
                        'max_image_pixels')


def _fingerprint(path: Any, workdir: str) -> Any:
  """A file's or folder's size and newest modification, so that scores of replaced weights or
  data are not reused; None for what is not a path here (a zoo name). This command's own
  outputs (`workdir`, and its files, wherever it is) do not count."""
  if not isinstance(path, str) or not os.path.exists(path):
    return None
  if os.path.isfile(path):
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns]
  mine = os.path.realpath(workdir)
  files = [os.path.join(root, name) for root, dirs, names in os.walk(path)
           if not (os.path.realpath(root) + os.sep).startswith(mine + os.sep)
           for name in names if not name.startswith(('.tljax-lock', 'transferability.'))]
  return [len(files), max((os.stat(f).st_mtime_ns for f in files if os.path.isfile(f)),
                          default=0)]


def _real(value: Any) -> Any:
  """A path as its real path, so that a link, a trailing slash or a relative spelling of the
  same file is the same request; anything else as it is."""
  return os.path.realpath(value) if isinstance(value, str) and value and os.path.exists(
      value) else value


def _request(found: Sequence[Candidate], shots: int, per_class: int | None, workdir: str
             ) -> dict[str, Any]:
  """What the scores depend on, kept in the results: a rerun with the same request reuses them.
  Keys that do not change the scores (steps, optimizer, batch sizes) are left out."""
  config = json.loads(found[0].config.to_json_best_effort())
  for section, key in (('init', 'pretrained'), ('data', 'path')):
    if key in config[section]:
      config[section][key] = _real(config[section][key])
  kept = dict(model=config['model'], init=config['init'], seed=config['seed'],
              data={k: v for k, v in config['data'].items() if k not in NOT_SCORED_DATA_KEYS})
  return dict(config=kept, cuts=found[0].cuts,
              models=[c.label for c in found[1:]], shots=shots, per_class=per_class,
              inputs={'init.pretrained': _fingerprint(config['init']['pretrained'], workdir),
                      'data.path': _fingerprint(config['data'].get('path'), workdir)})


def _number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _optional_number(value: Any) -> bool:
  return value is None or _number(value)


ROW_NUMBERS = ('seconds', 'logme', 'h_score')
MODEL_FIELDS = dict(examples=int, classes=int, feature_seconds=float, source_seconds=float)


def _complete(result: dict[str, Any]) -> bool:
  """Whether `result` has every field the tables read, one row per scored cut of each model
  (a file edited or cut short has not)."""
  rows, models = result.get('rows'), result.get('models')
  if not (isinstance(rows, list) and isinstance(models, list) and _number(result.get('seconds'))
          and all(isinstance(m, dict) for m in models) and all(isinstance(r, dict)
                                                               for r in rows)):
    return False
  for m in models:
    if not (isinstance(m.get('model'), str) and all(_number(m.get(k)) for k in MODEL_FIELDS)
            and isinstance(m.get('source_head'), bool)
            and all((_number if m['source_head'] else _optional_number)(m.get(k))
                    for k in ('leep', 'nce'))
            and (m.get('shots') is None or isinstance(m.get('shots'), int))):
      return False
  for row in rows:
    if not (isinstance(row.get('model'), str) and isinstance(row.get('cut'), str)
            and isinstance(row.get('frozen_stages'), int) and isinstance(row.get('dims'), int)
            and all(_number(row.get(k)) for k in ROW_NUMBERS)
            and all(_optional_number(row.get(k)) for k in ('ridge', 'leep', 'nce'))):
      return False
  keys = [(row['model'], row['cut']) for row in rows]
  scored = [m['model'] for m in models]
  first = [cut for model, cut in keys if model == scored[0]] if scored else []
  return (len(set(keys)) == len(keys) and {model for model, _ in keys} == set(scored)
          and len(scored) == len(set(scored)) and first == result['request'].get('cuts'))


def _earlier(workdir: str, request: dict[str, Any]) -> dict[str, Any] | None:
  """The scores an earlier run with the same request wrote; None if there are none. Scores of
  another request are an error (they are not replaced)."""
  path = os.path.join(workdir, RESULTS_FILE)
  if not os.path.lexists(path):
    return None
  try:
    with open(path, encoding='utf-8') as f:
      earlier = json.load(f)
    if not isinstance(earlier, dict) or not isinstance(earlier.get('rows'), list):
      raise ValueError('not a tljax transferability result')
  except (OSError, ValueError) as e:
    raise UserError(f'{path} cannot be read ({type(e).__name__}: {str(e)[:80]}); move it '
                    'away or use another --workdir') from None
  if not isinstance(earlier.get('request'), dict):
    raise UserError(f'{path} cannot be read (its request is not a mapping); move it away or '
                    'use another --workdir')
  if earlier.get('request') != request:
    changed = workdir_lib.config_differences(earlier.get('request') or {}, request)
    raise UserError(f'{path} holds scores of another request ({"; ".join(changed[:3])}); use '
                    'another --workdir, or move that file away')
  if not _complete(earlier):
    raise UserError(f'{path} is incomplete (a row or field is missing or not a number); move '
                    'it away or use another --workdir')
  return earlier


def _check_outputs(workdir: str) -> None:
  """Refuses output paths taken by something that is not a file (a folder of that name)."""
  for name in (RESULTS_FILE, TABLE_FILE, PLOT_FILE):
    path = os.path.join(workdir, name)
    if os.path.lexists(path) and not os.path.islink(path) and not os.path.isfile(path):
      raise UserError(f'{path} exists and is not a file; move it away or use another --workdir')


def _write(workdir: str, result: dict[str, Any], table: str) -> None:
  workdir_lib.write_json(os.path.join(workdir, RESULTS_FILE), result)
  workdir_lib.write_json(os.path.join(workdir, TABLE_FILE), table)


def run(config: ml_collections.ConfigDict, workdir: str, cuts: str = 'all', models: str = '',
        shots: int = DEFAULT_SHOTS, sweep: str | None = None, per_class: int | None = None
        ) -> dict[str, Any]:
  """Scores (or reuses the earlier scores of the same request), compares them with `sweep`,
  and writes transferability.json and .md (and a plot with a sweep) in `workdir`. Nothing is
  written before the scores are computed; they are written before the sweep is compared."""
  if shots < 1:
    raise UserError(f'--shots={shots}: the ridge probe needs at least 1 example per class')
  if per_class is not None and per_class < 2:
    raise UserError(f'--per-class={per_class}: score at least 2 examples per class (or leave '
                    'it out to score the whole training split)')
  found = candidates(config, cuts, models)
  request = _request(found, shots, per_class, workdir)
  workdir_lib.check_directory(workdir)
  if sweep is not None:
    score_sweep.check_sweep_dir(sweep)
  if os.path.isdir(workdir):
    _check_outputs(workdir)
  result = _earlier(workdir, request) if os.path.isdir(workdir) else None
  computed = None
  if result is None:
    start = time.perf_counter()
    computed = dict(request=request, **score(found, shots, per_class))
    computed['seconds'] = time.perf_counter() - start
  workdir_lib.check_writable(workdir)
  with workdir_lib.lock(workdir):
    _check_outputs(workdir)
    earlier = _earlier(workdir, request)  # written meanwhile by a run of the same request?
    if earlier is not None:
      print(f'{os.path.join(workdir, RESULTS_FILE)} holds these scores already: reused',
            flush=True)
      result = earlier
    else:
      result = computed or result
    result.pop('agreement', None)
    table = markdown(result)
    _write(workdir, result, table)
    plot_path = os.path.join(workdir, PLOT_FILE)
    if os.path.isfile(plot_path) and not os.path.islink(plot_path):
      os.remove(plot_path)  # of an earlier comparison, no longer in the table
    plotted = False
    if sweep is not None:
      result['agreement'] = score_sweep.agreement(result, sweep, found)
      table += '\n' + score_sweep.markdown(result['agreement'])
      plotted = score_sweep.plot(result, plot_path)
      _write(workdir, result, table)
  print(table)
  print(f'wrote {os.path.join(workdir, RESULTS_FILE)} and {TABLE_FILE}'
        + (f' and {PLOT_FILE}' if plotted else ''))
  return result


def main(argv: Sequence[str] | None = None) -> None:
  console.tolerate_lost_output()
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    rest, overrides = cli.split_config_overrides(argv)
    args = _parser().parse_args(rest)
    config = config_lib.apply_overrides(
        config_lib.load_config_file(args.config, ml_collections.ConfigDict), overrides,
        args.config)
    run(config, args.workdir, args.cuts, args.models, args.shots, args.sweep, args.per_class)
  except UserError as e:
    print('error: ' + ' '.join(str(e).splitlines()), file=sys.stderr)
    sys.exit(exit_status(e))
  except KeyboardInterrupt:
    print('error: interrupted; files already in the workdir are whole (each is written to a '
          'temporary name and renamed); run the same command again', file=sys.stderr)
    sys.exit(130)
