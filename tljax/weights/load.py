"""Merge pretrained arrays into freshly initialised variables, with one readable report.

`dont_load` regexes (fullmatch on `params/a/b` or `a/b`) keep the fresh initialisation, e.g. a
new zero-initialised head for a new number of classes. Any other missing, unexpected or
mismatched key is an error listing them all.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from flax import traverse_util

from tljax import models
from tljax.weights import read, zoo
from tljax.weights.errors import WeightsError

Resizer = Callable[[np.ndarray, tuple[int, ...]], np.ndarray]


def _skipped(path: str, patterns: Sequence[re.Pattern]) -> bool:
  short = path.split('/', 1)[1]  # without the collection ('params', 'batch_stats')
  return any(p.fullmatch(path) or p.fullmatch(short) for p in patterns)


def merge(fresh: Mapping[str, Any], loaded: Mapping[str, np.ndarray],
          dont_load: Sequence[str] = (), resizers: Mapping[str, Resizer] | None = None
          ) -> tuple[dict[str, Any], dict[str, list[str]]]:
  """(variables with loaded arrays in place, report of loaded/kept/resized/unexpected keys).

  `resizers` adapt an array of another shape where the model knows how (ViT position
  embeddings for a new patch grid); any other shape difference is an error.
  """
  patterns = [re.compile(p) for p in dont_load]
  resizers = resizers or {}
  flat = traverse_util.flatten_dict(dict(fresh), sep='/')
  report: dict[str, list[str]] = dict(loaded=[], kept_fresh=[], resized=[], missing=[],
                                      mismatched=[], unexpected=[])
  for path, value in flat.items():
    shape = tuple(value.shape)  # arrays, or jax.ShapeDtypeStructs of a model never run
    if _skipped(path, patterns):
      report['kept_fresh'].append(path)
    elif path not in loaded:
      report['missing'].append(path)
    elif tuple(loaded[path].shape) != shape and path in resizers:
      flat[path] = np.asarray(resizers[path](loaded[path], shape), value.dtype)
      report['resized'].append(f'{path}: {tuple(loaded[path].shape)} -> {shape}')
    elif tuple(loaded[path].shape) != shape:
      report['mismatched'].append(
          f'{path}: checkpoint {tuple(loaded[path].shape)} vs model {shape}')
    elif _unusable(loaded[path], value.dtype):
      report['mismatched'].append(f'{path}: {_unusable(loaded[path], value.dtype)}')
    else:
      flat[path] = np.asarray(loaded[path], dtype=value.dtype)
      report['loaded'].append(path)
  report['unexpected'] = [p for p in loaded if p not in flat and not _skipped(p, patterns)]
  errors = {k: report[k] for k in ('missing', 'mismatched', 'unexpected') if report[k]}
  if errors:
    raise WeightsError('pretrained weights do not fit the model: ' + format_report(errors)
                       + '. Add patterns to init.dont_load to keep fresh values')
  return traverse_util.unflatten_dict(flat, sep='/'), report


def _unusable(array: np.ndarray, dtype: np.dtype) -> str | None:
  """Why a checkpoint array cannot stand for a variable of `dtype`: integers for a float
  (truncated weights), or NaN/Inf values (they would reach the first step)."""
  if np.issubdtype(dtype, np.floating) and array.dtype.kind in 'iub':
    return f'checkpoint {array.dtype} for a {dtype} variable (integers, not weights)'
  if array.dtype.kind == 'f' and not np.isfinite(array).all():
    return f'checkpoint holds {int(np.size(array) - np.isfinite(array).sum())} NaN/Inf values'
  return None


def format_report(report: Mapping[str, list[str]], shown: int = 5) -> str:
  """One line: `missing (2): params/a, params/b; mismatched (1): ...`, `shown` paths a kind."""
  parts = []
  for kind, paths in report.items():
    more = f' and {len(paths) - shown} more' if len(paths) > shown else ''
    parts.append(f'{kind} ({len(paths)}): {", ".join(paths[:shown])}{more}')
  return '; '.join(parts)


def convert(source: str, model_name: str, model: Any, layout: str | None = None
            ) -> dict[str, np.ndarray]:
  """Flat tljax variables (`params/...`) from a zoo name, a tljax workdir, or a weights file in
  the model's `layout` (a key of its registered converters)."""
  entry = models.get_entry(model_name)
  if source in zoo.ZOO:
    zoo_entry = zoo.get(source)
    flat, layout = read.read_file(zoo.fetch(source)), zoo_entry.layout
  elif os.path.isdir(source):
    return _adapters_merged(read.read_tljax_workdir(source), source)
  else:
    if not (os.path.lexists(source) or '://' in source or source.startswith('package:')):
      raise WeightsError(f'init.pretrained={source!r} is neither a zoo name ({", ".join(zoo.ZOO)})'
                         ' nor an existing file or tljax workdir; None means no pretrained '
                         'weights')
    flat = read.read_file(zoo.locate(source))
    if layout is None and any(k.startswith('params/') for k in flat):
      if any(k.startswith('params/lora/') for k in flat):
        raise WeightsError(f'{source} holds LoRA adapters apart from their kernels '
                           '(params/lora/...): export the run again with --merge-lora, or load '
                           'its workdir, which merges them')
      return flat  # written by tljax (e.g. an exported .npz of variables)
  if layout not in entry.converters:
    raise WeightsError(f'init.layout={layout!r} for {source!r}: model {model_name!r} converts '
                       f'from {sorted(entry.converters) or "no outside layout"}')
  return entry.converters[layout](flat, model)


def _adapters_merged(flat: dict[str, np.ndarray], workdir: str) -> dict[str, np.ndarray]:
  """A workdir's variables with its LoRA adapters (if any) folded into their kernels: the model
  it computes, in the base model's parameters."""
  if not any(k.startswith('params/lora/') for k in flat):
    return flat
  from tljax import lora, saved_model
  spec = saved_model.lora_spec(workdir, saved_model.read_record(workdir))
  tree = traverse_util.unflatten_dict(flat, sep='/')
  tree['params'] = lora.merge(tree['params'], spec['alpha'], spec['rank'])
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep='/').items()}


def load_pretrained(source: str, model_name: str, model: Any, fresh: Mapping[str, Any],
                    dont_load: Sequence[str] = (), layout: str | None = None
                    ) -> tuple[dict[str, Any], dict[str, list[str]]]:
  """`fresh` variables with `source`'s arrays merged in, and the merge report."""
  converted = convert(source, model_name, model, layout)
  return merge(fresh, converted, dont_load, models.get_entry(model_name).resizers)


def load_pretrained_lazily(source: str, model_name: str, model: Any, init: Callable[..., Any],
                           dont_load: Sequence[str] = (), layout: str | None = None
                           ) -> tuple[dict[str, Any], dict[str, list[str]]]:
  """As `load_pretrained`, with `init(shapes_only=...)` giving the fresh variables: the merge
  runs on their shapes (jax.eval_shape), and the random init is compiled and run only when a
  variable is kept fresh (a new head). Of a 30 s prediction on one image, 21 s were that init."""
  variables, report = load_pretrained(source, model_name, model, init(shapes_only=True),
                                      dont_load, layout)
  if report['kept_fresh']:
    fresh = traverse_util.flatten_dict(init(), sep='/')
    flat = traverse_util.flatten_dict(variables, sep='/')
    variables = traverse_util.unflatten_dict(
        {k: fresh[k] if k in report['kept_fresh'] else v for k, v in flat.items()}, sep='/')
  return variables, report
