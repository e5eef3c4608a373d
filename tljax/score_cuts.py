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


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """(the other arguments, [(KEY, VALUE) of each --config.KEY=VALUE]) as tljax.train reads them."""
  rest, overrides = [], []
  args = iter(argv)
  for arg in args:
    if arg.startswith('--config.'):
      key, has_value, text = arg[len('--config.'):].partition('=')
      if not has_value:
        text = next(args, None)
        if text is None:
          raise UserError(f'{arg} needs a value ({arg}=VALUE)')
      overrides.append((key, text))
    else:
      rest.append(arg)
  return rest, overrides


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
  names = [c.strip() for c in cuts.split(',') if c.strip()]
  unknown = [c for c in names if c not in stages[1:]]
  if unknown or not names:
    raise UserError(f'--cuts {cuts!r}: {unknown or "no stage"} is not a stage of {model!r} '
                    f'after its first; choose from {", ".join(stages[1:])} or \'all\'')
  return names


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
    record = saved_model.read_record(weights)
    if record['model'].get('name') == config.model.name:
      return int(record['model']['num_classes'])
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
  variables, report = build._variables(config, model)
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


def _shots(labels: np.ndarray, wanted: int) -> int:
  """The ridge probe's shots: `wanted`, lowered to half the smallest class where it has fewer
  examples than wanted + 1 (the rest of each class tests the probe)."""
  smallest = int(np.bincount(labels)[np.unique(labels)].min())
  return wanted if smallest > wanted else max(1, smallest // 2)


def score_features(pooled: np.ndarray, labels: np.ndarray, shots: int, seed: int
                   ) -> tuple[dict[str, float], float]:
  """LogME, H-score and the ridge probe of one cut's features, and the seconds they took."""
  start = time.perf_counter()
  scores = {name: fn(pooled, labels) for name, fn in transferability.FEATURE_SCORES.items()}
  scores['ridge'] = transferability.ridge_probe(pooled, labels, shots, seed)
  return scores, time.perf_counter() - start


def score(candidates_: Sequence[Candidate], shots: int) -> dict[str, Any]:
  """Scores of every cut of every candidate, with the feature and scoring times."""
  from tljax.data import sources
  from tljax.models import get_entry
  rows, models = [], []
  for candidate in candidates_:
    config = candidate.config.copy_and_resolve_references()
    with config.unlocked():
      config.data.augment = False  # the features of the examples, not of random crops
    candidate = dataclasses.replace(candidate, config=config)
    entry = get_entry(config.model.name)
    source = sources.with_validation(sources.make_source(config.data, entry.modality),
                                     config.data)
    print(f'{candidate.label}: features at {len(candidate.cuts)} cut(s) of '
          f'{config.model.name} ...', flush=True)
    found = extract(candidate, source)
    labels = found['labels']
    used_shots = _shots(transferability._checked_labels(labels), shots)
    source_scores, source_seconds = {}, 0.0
    if found['probabilities'] is not None:
      start = time.perf_counter()
      source_scores = {name: fn(found['probabilities'], labels)
                       for name, fn in transferability.SOURCE_SCORES.items()}
      source_seconds = time.perf_counter() - start
    for name in candidate.cuts:
      pooled = found['features'][name]
      values, seconds = score_features(pooled, labels, used_shots, config.seed)
      frozen = entry.stages.index(name)
      rows.append(dict(model=candidate.label, model_name=config.model.name, cut=name,
                       frozen_stages=frozen, dims=int(pooled.shape[1]), seconds=seconds,
                       **values, **({} if name != entry.stages[-1] else source_scores)))
    models.append(dict(model=candidate.label, model_name=config.model.name,
                       examples=int(len(labels)), classes=int(labels.max()) + 1,
                       shots=used_shots, feature_seconds=found['seconds'],
                       source_head=found['probabilities'] is not None,
                       source_seconds=source_seconds))
    print(f'  {len(labels)} examples, {found["seconds"]:.1f} s for the features (compilation '
          f'included), {sum(r["seconds"] for r in rows if r["model"] == candidate.label):.1f} s '
          'to score them', flush=True)
  return dict(rows=rows, models=models)


def markdown(result: dict[str, Any]) -> str:
  """The ranked table: cuts by LogME, best first, every score and the seconds to score."""
  rows = sorted(result['rows'], key=lambda r: -r['logme'])
  lines = ['| rank | model | cut | frozen | dims | LogME | H-score | ridge % | LEEP | NCE | '
           'seconds |', '| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | '
           '---: |']
  def fmt(value, pattern):
    return 'n/a' if value is None else pattern.format(value)
  for rank, row in enumerate(rows, 1):
    lines.append(
        f'| {rank} | {row["model"]} | {row["cut"]} | {row["frozen_stages"]} | {row["dims"]} | '
        f'{row["logme"]:.4f} | {row["h_score"]:.3f} | {100 * row["ridge"]:.1f} | '
        f'{fmt(row.get("leep"), "{:.4f}")} | {fmt(row.get("nce"), "{:.4f}")} | '
        f'{row["seconds"]:.2f} |')
  notes = [f'{m["model"]}: {m["examples"]} examples of {m["classes"]} classes, features in '
           f'{m["feature_seconds"]:.1f} s (one pass, compilation included); ridge probe on '
           f'{m["shots"]} per class; LEEP and NCE '
           + ('from its source head (on the linear-probe cut, the input of the head)'
              if m['source_head'] else 'n/a (the weights have no source head)')
           for m in result['models']]
  return '\n'.join(lines) + '\n\n' + '\n'.join(f'- {n}' for n in notes) + '\n'


def _request(config: ml_collections.ConfigDict, cuts: str, models: str, shots: int
             ) -> dict[str, Any]:
  """What the scores depend on, kept in the results: a rerun with the same request reuses them."""
  return dict(config=json.loads(config.to_json_best_effort()), cuts=cuts, models=models,
              shots=shots)


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
  if earlier.get('request') != request:
    changed = workdir_lib.config_differences(earlier.get('request') or {}, request)
    raise UserError(f'{path} holds scores of another request ({"; ".join(changed[:3])}); use '
                    'another --workdir, or move that file away')
  return earlier


def run(config: ml_collections.ConfigDict, workdir: str, cuts: str = 'all', models: str = '',
        shots: int = DEFAULT_SHOTS, sweep: str | None = None) -> dict[str, Any]:
  """Scores (or reuses the earlier scores of the same request), compares them with `sweep`,
  and writes transferability.json and .md (and a plot with a sweep) in `workdir`."""
  if shots < 1:
    raise UserError(f'--shots={shots}: the ridge probe needs at least 1 example per class')
  found = candidates(config, cuts, models)
  request = _request(found[0].config, cuts, models, shots)
  workdir_lib.check_directory(workdir)
  if sweep is not None:
    score_sweep.check_sweep_dir(sweep)
  workdir_lib.check_writable(workdir)
  with workdir_lib.lock(workdir):
    result = _earlier(workdir, request)
    if result is None:
      start = time.perf_counter()
      result = dict(request=request, **score(found, shots))
      result['seconds'] = time.perf_counter() - start
    else:
      print(f'{os.path.join(workdir, RESULTS_FILE)} holds these scores already: reused',
            flush=True)
    table = markdown(result)
    if sweep is not None:
      result['agreement'] = score_sweep.agreement(result, sweep, found)
      table += '\n' + score_sweep.markdown(result['agreement'])
      score_sweep.plot(result, os.path.join(workdir, PLOT_FILE))
    workdir_lib.write_json(os.path.join(workdir, RESULTS_FILE), result)
    workdir_lib.write_json(os.path.join(workdir, TABLE_FILE), table)
  print(table)
  print(f'wrote {os.path.join(workdir, RESULTS_FILE)} and {TABLE_FILE}'
        + (f' and {PLOT_FILE}' if sweep is not None else ''))
  return result


def main(argv: Sequence[str] | None = None) -> None:
  console.tolerate_lost_output()
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    rest, overrides = _split_overrides(argv)
    args = _parser().parse_args(rest)
    config = config_lib.apply_overrides(
        config_lib.load_config_file(args.config, ml_collections.ConfigDict), overrides,
        args.config)
    run(config, args.workdir, args.cuts, args.models, args.shots, args.sweep)
  except UserError as e:
    print('error: ' + ' '.join(str(e).splitlines()), file=sys.stderr)
    sys.exit(exit_status(e))
