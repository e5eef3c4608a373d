"""Merge pretrained arrays into freshly initialised variables, with one readable report.

`dont_load` regexes (fullmatch on `params/a/b` or `a/b`) keep the fresh initialisation, e.g. a
new zero-initialised head for a new number of classes. Any other missing, unexpected or
mismatched key is an error listing them all.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flax import traverse_util

from tljax.weights.read import WeightsError


def _skipped(path: str, patterns: Sequence[re.Pattern]) -> bool:
  short = path.split('/', 1)[1]  # without the collection ('params', 'batch_stats')
  return any(p.fullmatch(path) or p.fullmatch(short) for p in patterns)


def merge(fresh: Mapping[str, Any], loaded: Mapping[str, np.ndarray],
          dont_load: Sequence[str] = ()) -> tuple[dict[str, Any], dict[str, list[str]]]:
  """(variables with loaded arrays in place, report of loaded/kept/unexpected keys)."""
  patterns = [re.compile(p) for p in dont_load]
  flat = traverse_util.flatten_dict(dict(fresh), sep='/')
  report: dict[str, list[str]] = dict(loaded=[], kept_fresh=[], missing=[], mismatched=[],
                                      unexpected=[])
  for path, value in flat.items():
    if _skipped(path, patterns):
      report['kept_fresh'].append(path)
    elif path not in loaded:
      report['missing'].append(path)
    elif tuple(loaded[path].shape) != tuple(np.shape(value)):
      report['mismatched'].append(
          f'{path}: checkpoint {tuple(loaded[path].shape)} vs model {tuple(np.shape(value))}')
    else:
      flat[path] = np.asarray(loaded[path], dtype=np.asarray(value).dtype)
      report['loaded'].append(path)
  report['unexpected'] = [p for p in loaded if p not in flat and not _skipped(p, patterns)]
  errors = {k: report[k] for k in ('missing', 'mismatched', 'unexpected') if report[k]}
  if errors:
    raise WeightsError('pretrained weights do not fit the model (add patterns to '
                       'init.dont_load to keep fresh values):\n' + format_report(errors))
  return traverse_util.unflatten_dict(flat, sep='/'), report


def format_report(report: Mapping[str, list[str]]) -> str:
  lines = []
  for kind, paths in report.items():
    for path in paths:
      lines.append(f'  {kind:<11} {path}')
  return '\n'.join(lines)
