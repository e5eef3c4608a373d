"""How well transferability scores rank what a finished ablation sweep measured.

Each finished variant of a `tljax.ablate` directory that trains on a frozen prefix is matched
to the scored cut it stands for: the same model and pretrained weights, the same task and data
split, and its frozen stage count K as the cut `stages:K`. Variants differing only in seed are
averaged. Per score, Kendall's tau-b and Spearman's rho between the scores and the measured
test accuracies (and the validation accuracies that selected the checkpoints, where the runs
had a validation split), and the top-1 hit: whether the best-scored cut measured the best.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np

from tljax import transferability
from tljax import workdir as workdir_lib
from tljax.errors import UserError

# A variant that differs from the scored config in model.num_classes or in a data key (all but
# these, which change neither the examples nor how they look) trained on something else.
OTHER_DATA_KEYS = ('batch_size', 'eval_batch_size', 'augment', 'cache_features',
                   'cache_decoded', 'shuffle_buffer', 'skip_corrupt_images', 'max_image_pixels')
METHOD_NAMES = dict(logme='LogME', h_score='H-score', ridge='ridge probe', leep='LEEP',
                    nce='NCE')


def check_sweep_dir(sweep_dir: str) -> None:
  """Refuses a --sweep that is not a directory of variant workdirs, before anything is scored."""
  if not os.path.isdir(sweep_dir):
    state = 'is not a directory' if os.path.lexists(sweep_dir) else 'does not exist'
    raise UserError(f'--sweep {sweep_dir} {state}; name the --workdir of a finished '
                    'tljax.ablate run')
  if not _variant_dirs(sweep_dir):
    raise UserError(f'--sweep {sweep_dir} holds no run directories (none has a config.json); '
                    'name the --workdir of a finished tljax.ablate run')


def _variant_dirs(sweep_dir: str) -> list[str]:
  return sorted(name for name in os.listdir(sweep_dir)
                if os.path.isfile(os.path.join(sweep_dir, name, workdir_lib.CONFIG_FILE)))


def _get(config: dict[str, Any], key: str) -> Any:
  value: Any = config
  for part in key.split('.'):
    value = value.get(part) if isinstance(value, dict) else None
  return list(value) if isinstance(value, tuple) else value


def _weights(value: Any) -> Any:
  """A value in a comparable form: a path (init.pretrained, data.path) as its real path."""
  return os.path.realpath(value) if isinstance(value, str) and value and os.path.exists(
      value) else value


def _fraction(value: Any) -> float | None:
  """An accuracy as a float in [0, 1], or None for anything else (an edited file)."""
  if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1:
    return float(value)
  return None


def _match(config: dict[str, Any], results: dict[str, Any], scored: Sequence[Any]
           ) -> tuple[Any, str] | str:
  """(the scored candidate, the cut) a finished variant stands for, or why it stands for none."""
  from tljax.models import get_entry
  if config.get('baseline'):
    return f'a {config["baseline"]} baseline'
  if (config.get('lora') or {}).get('rank') or _get(config, 'freeze.unfreeze_every') or \
      _get(config, 'freeze.unfreeze'):
    return 'a strategy other than a frozen prefix (LoRA or gradual unfreezing)'
  frozen = results.get('frozen_stages')
  accuracy = _fraction(results['eval'].get('accuracy')) if isinstance(
      results.get('eval'), dict) else None
  if not isinstance(frozen, int) or isinstance(frozen, bool) or frozen < 0 or accuracy is None:
    return 'results.json without a test accuracy or frozen stage count (damaged or edited)'
  if not frozen:
    return 'trains every stage (no frozen prefix)'
  for candidate in scored:
    mine = candidate.config
    if _get(config, 'model.name') != mine.model.name or \
        _weights(_get(config, 'init.pretrained')) != _weights(mine.init.pretrained):
      continue
    reference = json.loads(mine.to_json_best_effort())
    keys = ['model.num_classes', *(f'data.{k}' for k in sorted(
        set(reference['data']) | set(config.get('data') or {})) if k not in OTHER_DATA_KEYS)]
    changed = [f'{key}={_get(config, key)!r}, scored {_get(reference, key)!r}'
               for key in keys if _weights(_get(config, key)) != _weights(_get(reference, key))]
    if changed:
      return 'trained on other data (' + '; '.join(changed) + ')'
    stages = get_entry(mine.model.name).stages
    cut = stages[frozen] if frozen < len(stages) else None
    if cut not in candidate.cuts:
      return f'its cut (stages:{frozen}) was not scored'
    return candidate, cut
  return 'its model and weights were not scored'


def _measured(sweep_dir: str, scored: Sequence[Any]
              ) -> tuple[dict[tuple[str, str], list[dict[str, float]]], dict[str, list[str]]]:
  """Measured accuracies by (candidate, cut), and the variants left out by reason."""
  found: dict[tuple[str, str], list[dict[str, float]]] = {}
  left_out: dict[str, list[str]] = {}
  for name in _variant_dirs(sweep_dir):
    workdir = os.path.join(sweep_dir, name)
    try:
      results = workdir_lib.read_results(workdir)
      config = workdir_lib.saved_config(workdir) or {}
    except UserError:
      matched = 'unreadable (a damaged results.json or config.json)'
    else:
      try:
        matched = ('unfinished (no results.json)' if results is None else
                   _match(config, results, scored))
      except (AttributeError, TypeError, ValueError, KeyError):
        matched = 'config.json or results.json with values of the wrong kind (edited?)'
    if isinstance(matched, str):
      left_out.setdefault(matched, []).append(name)
      continue
    candidate, cut = matched
    wall = results.get('wall_time_s')
    measured = dict(accuracy=_fraction(results['eval']['accuracy']),
                    seconds=float(wall) if isinstance(wall, (int, float)) and wall > 0 else 0.0)
    best = results.get('best')
    val = best.get('val') if isinstance(best, dict) else None
    val = _fraction(val.get('accuracy')) if isinstance(val, dict) else None
    if val is not None:
      measured['val_accuracy'] = val
    found.setdefault((candidate.label, cut), []).append(measured)
  return found, left_out


def _rank_agreement(scores: list[float], accuracies: list[float]) -> dict[str, Any]:
  """tau, rho and the top-1 hit; None where a side is constant (no ranking to agree with)."""
  from scipy import stats
  def constant(values):  # equal up to rounding: no order to compare
    return max(values) - min(values) <= 1e-9 * max(1.0, max(abs(v) for v in values))
  if constant(scores) or constant(accuracies):
    return dict(points=len(scores), kendall_tau=None, spearman_rho=None, top1_hit=None)
  tau = stats.kendalltau(scores, accuracies).statistic
  rho = stats.spearmanr(scores, accuracies).statistic
  best = int(np.argmax(scores))
  return dict(points=len(scores), kendall_tau=float(tau), spearman_rho=float(rho),
              top1_hit=bool(accuracies[best] >= max(accuracies)))


def agreement(result: dict[str, Any], sweep_dir: str, scored: Sequence[Any]) -> dict[str, Any]:
  """Per score and scope (each model's cuts, and all of them together), the rank agreement
  with the sweep's measured accuracies; the matched points and the variants left out."""
  found, left_out = _measured(sweep_dir, scored)
  if not found:
    reasons = '; '.join(f'{len(names)} {reason}' for reason, names in left_out.items())
    raise UserError(f'--sweep {sweep_dir}: no finished variant matches a scored cut ({reasons}); '
                    'score the config the sweep ran (its base config, init.pretrained and '
                    'data.examples_per_class)')
  rows = {(row['model'], row['cut']): row for row in result['rows']}
  points = []
  for (model, cut), runs in sorted(found.items(), key=lambda item: rows[item[0]]['frozen_stages']):
    row = rows[(model, cut)]
    point = dict(model=model, cut=cut, frozen_stages=row['frozen_stages'], runs=len(runs),
                 accuracy=statistics.fmean(r['accuracy'] for r in runs),
                 train_seconds=sum(r['seconds'] for r in runs))
    vals = [r['val_accuracy'] for r in runs if 'val_accuracy' in r]
    if len(vals) == len(runs):
      point['val_accuracy'] = statistics.fmean(vals)
    point.update({m: row.get(m) for m in transferability.METHODS})
    points.append(point)
  scopes = [(model, [p for p in points if p['model'] == model])
            for model in dict.fromkeys(p['model'] for p in points)]
  if len(scopes) > 1:
    scopes.append(('all', points))
  table = []
  for method in transferability.METHODS:
    for scope, members in scopes:
      usable = [p for p in members if p.get(method) is not None]
      if len(usable) < 2:
        continue
      entry = dict(method=method, scope=scope,
                   test=_rank_agreement([p[method] for p in usable],
                                        [p['accuracy'] for p in usable]))
      if all('val_accuracy' in p for p in usable):
        entry['val'] = _rank_agreement([p[method] for p in usable],
                                       [p['val_accuracy'] for p in usable])
      table.append(entry)
  return dict(sweep=sweep_dir, points=points, table=table,
              left_out={reason: names for reason, names in left_out.items()},
              train_seconds=sum(p['train_seconds'] for p in points),
              score_seconds=result['seconds'])


HIT = {True: 'yes', False: 'no', None: 'n/a'}


def _number(value: float | None) -> str:
  return 'n/a' if value is None else f'{value:+.2f}'


def markdown(agreed: dict[str, Any]) -> str:
  """The agreement table, the matched points and what was left out."""
  runs = sum(p['runs'] for p in agreed['points'])
  lines = [f'Rank agreement with the accuracies measured in {agreed["sweep"]}. Scoring took '
           f'{agreed["score_seconds"]:.1f} s (weights, features and scores of every cut, '
           f'compilation included); the {runs} matched training runs '
           f'{agreed["train_seconds"]:.0f} s (their wall times), '
           f'{agreed["train_seconds"] / max(agreed["score_seconds"], 1e-9):.0f}x as long.', '',
           '| score | cuts of | points | Kendall tau (test) | Spearman rho (test) | top-1 hit | '
           'Kendall tau (val) |', '| --- | --- | ---: | ---: | ---: | --- | ---: |']
  for entry in agreed['table']:
    test, val = entry['test'], entry.get('val') or {}
    lines.append(f'| {METHOD_NAMES[entry["method"]]} | {entry["scope"]} | {test["points"]} | '
                 f'{_number(test["kendall_tau"])} | {_number(test["spearman_rho"])} | '
                 f'{HIT[test["top1_hit"]]} | '
                 f'{_number(val.get("kendall_tau"))} |')
  if not agreed['table']:
    lines.append('| (fewer than two matched cuts of any score: no ranking to compare) | | | | | '
                 '| |')
  lines += ['', '| model | cut | frozen | runs | test accuracy % | val accuracy % |',
            '| --- | --- | ---: | ---: | ---: | ---: |']
  for p in agreed['points']:
    val = p.get('val_accuracy')
    lines.append(f'| {p["model"]} | {p["cut"]} | {p["frozen_stages"]} | {p["runs"]} | '
                 f'{100 * p["accuracy"]:.2f} | {"n/a" if val is None else f"{100 * val:.2f}"} |')
  for reason, names in agreed['left_out'].items():
    lines.append(f'\nLeft out, {reason}: {len(names)} ({", ".join(names[:6])}'
                 f'{", ..." if len(names) > 6 else ""})')
  return '\n'.join(lines) + '\n'


def plot(result: dict[str, Any], path: str) -> bool:
  """Score against measured test accuracy, one panel per score, each cut labelled by K;
  False (nothing drawn) where no score has two matched cuts."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  points = result['agreement']['points']
  methods = [m for m in transferability.METHODS
             if sum(p.get(m) is not None for p in points) >= 2]
  if not methods:
    return False
  temporary = path + '.tmp.png'
  if os.path.lexists(temporary):  # left by a killed run, or planted: never written through
    if os.path.isdir(temporary) and not os.path.islink(temporary):
      raise UserError(f'{temporary} is a directory; move it away and run again')
    os.unlink(temporary)
  figure, axes = plt.subplots(1, len(methods), figsize=(3.4 * len(methods), 3.2), squeeze=False)
  models = list(dict.fromkeys(p['model'] for p in points))
  for axis, method in zip(axes[0], methods, strict=True):
    for index, model in enumerate(models):
      mine = [p for p in points if p['model'] == model and p.get(method) is not None]
      x, y = [p[method] for p in mine], [100 * p['accuracy'] for p in mine]
      axis.plot(x, y, 'o-', color=f'C{index}', label=model, markersize=4, linewidth=0.8)
      for p, xi, yi in zip(mine, x, y, strict=True):
        axis.annotate(str(p['frozen_stages']), (xi, yi), fontsize=7, xytext=(2, 2),
                      textcoords='offset points')
    axis.set_xlabel(METHOD_NAMES[method])
    axis.grid(alpha=0.3)
  axes[0][0].set_ylabel('measured test accuracy %')
  axes[0][0].legend(fontsize=7)
  figure.suptitle('score of each cut (labelled by frozen stages) against the accuracy its '
                  'run measured', fontsize=9)
  figure.tight_layout()
  figure.savefig(temporary, dpi=110)
  plt.close(figure)
  os.replace(temporary, path)
  return True
