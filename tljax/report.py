"""Sweep results as tables (csv, markdown) and a plot: one row per variant, seeds averaged."""

from __future__ import annotations

import csv
import dataclasses
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

TIME_KEYS = ('wall_time_s', 'median_step_time_s')
COPIED_KEYS = ('preset', 'frozen_stages', 'trainable_params', 'examples_per_class',
               'train_examples', 'final_step', 'selected_step', 'optimizer_state_bytes')
# Scores a table reports: test ones of the selected checkpoint (the last without a validation
# split), and with one the validation scores that selected it (as val_<key>).
SCORE_PREFIXES = ('accuracy', 'balanced_accuracy')


@dataclasses.dataclass(frozen=True)
class PlotSpec:
  """y (an accuracy key) against `x`, one line per value of `series`; rows whose `reference`
  key holds the reference value (e.g. preset 'scratch', or one of a tuple of values) are drawn
  as horizontal lines."""
  x: str = 'frozen_stages'
  series: str = 'examples_per_class'
  reference: tuple[str, Any] | None = ('preset', 'scratch')  # (key, value or tuple of values)
  y: str = 'accuracy'
  x_label: str = 'frozen stages (from the input)'
  series_label: str = 'examples per class'
  series_values: tuple | None = None  # draw only these series, in this order (None: all)
  x_log: bool = False  # a logarithmic x axis (e.g. trainable parameters)
  lines: bool = True  # join a series' points (False: points only, when x is no progression)
  annotate: str | None = None  # a row key written beside each point (e.g. 'strategy')


def _scores(results: Mapping[str, Any]) -> dict[str, float]:
  """Test accuracies of the reported checkpoint, and the validation ones that selected it."""
  scores = {k: v for k, v in results['eval'].items() if k.startswith(SCORE_PREFIXES)}
  best = results.get('best') or {}
  scores.update({f'val_{k}': v for k, v in (best.get('val') or {}).items()
                 if k.startswith(SCORE_PREFIXES)})
  return scores


def aggregate(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """One row per group of runs (variants differing only in seed): accuracy mean and std (test,
  and validation where there is a validation split), mean times, and the run facts (frozen
  stages, trainable parameters, ...)."""
  groups: dict[str, list[Mapping[str, Any]]] = {}
  for run in runs:
    groups.setdefault(run['group'], []).append(run)
  rows = []
  for group, members in groups.items():
    first = members[0]['results']
    row: dict[str, Any] = dict(variant=group, seeds=len(members))
    row.update({k: v for k, v in members[0]['tags'].items() if k != 'seed'})
    row.update({k: first.get(k) for k in COPIED_KEYS})
    scores = [_scores(m['results']) for m in members]
    for key in scores[0]:
      values = [s[key] for s in scores if key in s]
      row[f'{key}_mean'] = statistics.fmean(values)
      row[f'{key}_std'] = statistics.stdev(values) if len(values) > 1 else 0.0
    for key in TIME_KEYS:
      values = [m['results'][key] for m in members if m['results'].get(key) is not None]
      row[key] = statistics.fmean(values) if values else None
    rows.append(row)
  return rows


def write_csv(rows: Sequence[Mapping[str, Any]], path: str) -> None:
  columns = list(dict.fromkeys(k for row in rows for k in row))
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, columns)
    writer.writeheader()
    writer.writerows(rows)


def _accuracy_keys(rows: Sequence[Mapping[str, Any]]) -> list[str]:
  keys = dict.fromkeys(k[:-len('_mean')] for row in rows for k in row if k.endswith('_mean'))
  return sorted(keys, key=lambda k: (not k.startswith('val_'), k.removeprefix('val_') !=
                                     'accuracy', k))


def _column(key: str) -> str:
  split = 'val' if key.startswith('val_') else 'test'
  return f'{split} {key.removeprefix("val_").replace("_", " ")} %'


def _percent(row: Mapping[str, Any], key: str) -> str:
  if f'{key}_mean' not in row:
    return '-'
  text = f'{100 * row[f"{key}_mean"]:.2f}'
  return text + (f' ± {100 * row[f"{key}_std"]:.2f}' if row['seeds'] > 1 else '')


def _size(count: int | None) -> str:
  """Bytes as KiB or MiB ('-' when a run did not record them, e.g. a classical baseline)."""
  if count is None:
    return '-'
  return f'{count / 2**20:.2f} MiB' if count >= 2**20 else f'{count / 2**10:.1f} KiB'


def markdown_table(rows: Sequence[Mapping[str, Any]], missing: int = 0,
                   published: Sequence[tuple[str, Mapping[str, float]]] = ()) -> str:
  """The results table: accuracies in percent as mean ± std over seeds (validation columns,
  where runs had a validation split, then the test scores of the checkpoint selected on it),
  then any published results (label, {accuracy key: fraction}) in the same columns."""
  accuracy_keys = _accuracy_keys(rows)
  header = ['variant', 'frozen stages', 'trainable params', 'examples/class', 'seeds']
  header += [_column(k) for k in accuracy_keys]
  header += ['train wall time', 'median step', 'optimizer state']
  lines = ['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
  for row in rows:
    cells = [row['variant'], '-' if row['frozen_stages'] is None else str(row['frozen_stages']),
             f'{row["trainable_params"]:,}',
             'all' if row['examples_per_class'] is None else str(row['examples_per_class']),
             str(row['seeds'])]
    cells += [_percent(row, k) for k in accuracy_keys]
    cells += ['-' if row['wall_time_s'] is None else f'{row["wall_time_s"]:.0f} s',
              '-' if row['median_step_time_s'] is None else f'{row["median_step_time_s"]:.3f} s',
              _size(row.get('optimizer_state_bytes'))]
    lines.append('| ' + ' | '.join(cells) + ' |')
  for label, accuracies in published:
    cells = [f'*{label}*', '', '', '', '']
    cells += [f'*{100 * accuracies[k]:.2f}*' if k in accuracies else '' for k in accuracy_keys]
    lines.append('| ' + ' | '.join(cells + ['', '', '']) + ' |')
  if missing:
    lines.append(f'\n{missing} variant(s) not finished yet.')
  return '\n'.join(lines)


def plot_lines(rows: Sequence[Mapping[str, Any]], spec: PlotSpec
               ) -> tuple[dict[Any, list[tuple[Any, float, float]]], list[tuple[str, Any, float]]]:
  """What the plot draws: per series value, (x, y %, std %) points sorted by x; and the
  reference rows as (variant, series value, y %)."""

  def is_reference(row: Mapping[str, Any]) -> bool:
    if spec.reference is None:
      return False
    key, value = spec.reference
    return row.get(key) in value if isinstance(value, tuple) else row.get(key) == value

  series: dict[Any, list[tuple[Any, float, float]]] = {}
  references = []
  for row in rows:
    y, error = 100 * row[f'{spec.y}_mean'], 100 * row[f'{spec.y}_std']
    if is_reference(row):
      references.append((row['variant'], row.get(spec.series), y))
    elif spec.series_values is None or row.get(spec.series) in spec.series_values:
      series.setdefault(row.get(spec.series), []).append((row[spec.x], y, error))
  order = list(series) if spec.series_values is None else [
      value for value in spec.series_values if value in series]
  return {value: sorted(series[value]) for value in order}, references


def plot(rows: Sequence[Mapping[str, Any]], spec: PlotSpec, path: str, title: str = '') -> None:
  """Accuracy against `spec.x`, one line per series value, references as dashed lines."""
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot

  series, references = plot_lines(rows, spec)
  figure, axes = pyplot.subplots(figsize=(7, 4.5))
  colors = {}
  for index, (value, points) in enumerate(series.items()):
    xs, ys, errors = zip(*points, strict=True)
    colors[value] = f'C{index}'
    text = 'all' if value is None else str(value)
    label = f'{spec.series_label} = {text}' if spec.series_label else text
    axes.errorbar(xs, ys, yerr=errors, marker='o', capsize=3, color=colors[value], label=label,
                  linestyle='-' if spec.lines else 'none')
  if spec.annotate:
    drawn = {row['variant']: row for row in rows if row.get(spec.series) in series
             and row['variant'] not in {name for name, _, _ in references}}
    ys = [100 * row[f'{spec.y}_mean'] for row in drawn.values()] or [0.0]
    near = 0.04 * (max(ys) - min(ys) or 1.0)  # labels of points this close at one x would overlap
    stacked: dict[Any, tuple[float, int]] = {}  # x -> (y of the last label, its shift down)
    for row in sorted(drawn.values(), key=lambda r: -r[f'{spec.y}_mean']):
      y = 100 * row[f'{spec.y}_mean']
      last_y, shift = stacked.get(row[spec.x], (None, -1))
      shift = shift + 1 if last_y is not None and last_y - y < near else 0
      stacked[row[spec.x]] = (y, shift)
      axes.annotate(str(row.get(spec.annotate)), (row[spec.x], y), textcoords='offset points',
                    xytext=(4, 3 - 8 * shift), fontsize=7)
  if spec.x_log:
    axes.set_xscale('log')
  kinds = {row['variant']: row.get(spec.reference[0]) for row in rows} if spec.reference else {}
  styles: dict[Any, str] = {}  # one line style per kind of reference (e.g. scratch, a baseline)
  for name, value, y in references:
    style = styles.setdefault(kinds.get(name), ('--', ':', '-.')[len(styles) % 3])
    axes.axhline(y, linestyle=style, color=colors.get(value, 'gray'), label=name)
  axes.set_xlabel(spec.x_label)
  axes.set_ylabel(f'test {spec.y.replace("_", " ")} (%)')
  if title:
    axes.set_title(title)
  axes.grid(alpha=0.3)
  axes.legend(fontsize=8)
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  pyplot.close(figure)


MAX_CONFUSION_CLASSES = 200  # above this a picture of the matrix is unreadable: none is drawn


def plot_confusion(result: Mapping[str, Any], class_names: Sequence[str] | None, path: str,
                   title: str = '') -> bool:
  """The confusion matrix of one evaluation (`result['confusion']`, rows true, columns
  predicted) as a PNG with class names on both axes, each cell's count written in it when
  there are few classes; written whole or not at all. Returns whether a picture was drawn."""
  import os

  import matplotlib
  matplotlib.use('Agg')
  import numpy as np
  from matplotlib import pyplot

  confusion = np.asarray(result['confusion'])
  count = len(confusion)
  if count > MAX_CONFUSION_CLASSES:
    return False
  names = (list(class_names) if class_names and len(class_names) == count
           else [str(i) for i in range(count)])
  side = min(4 + 0.35 * count, 30)
  figure, axes = pyplot.subplots(figsize=(side + 1.5, side))
  image = axes.imshow(confusion, cmap='Blues')
  figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
  axes.set_xticks(range(count), names, rotation=45 if count > 4 else 0, ha='right'
                  if count > 4 else 'center', fontsize=8 if count > 20 else 10)
  axes.set_yticks(range(count), names, fontsize=8 if count > 20 else 10)
  axes.set_xlabel('predicted class')
  axes.set_ylabel('true class')
  if count <= 30:
    limit = confusion.max() / 2 if confusion.size else 0
    for (row, column), value in np.ndenumerate(confusion):
      axes.text(column, row, str(value), ha='center', va='center', fontsize=8,
                color='white' if value > limit else 'black')
  if title:
    axes.set_title(title)
  figure.tight_layout()
  partial = path + '.partial'
  try:
    figure.savefig(partial, dpi=100, format='png')
    os.replace(partial, path)
  except OSError as e:
    if os.path.exists(partial):
      os.remove(partial)
    from tljax.errors import UserError
    raise UserError(f'could not write {path}: {e.strerror or e}; free space and run the same '
                    'command again (the checkpoints are complete)') from None
  finally:
    pyplot.close(figure)
  return True
