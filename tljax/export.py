"""A fine-tuned run's variables as one .safetensors file, for use outside its workdir.

  python -m tljax.export --workdir DIR --out FILE.safetensors [--step best|last|N]
                         [--layout tljax|torchvision|hf] [--merge-lora] [--force]

Layout 'tljax' (the default) stores the parameters and BatchNorm statistics under their Flax
paths (`params/stem/conv/kernel`); `tljax.create(name, num_classes=N, pretrained=FILE)` and
`init.pretrained=FILE` read it back. Layout 'torchvision' (ResNets and MobileNetV2) stores
torchvision's state-dict keys and tensor layouts, so PyTorch loads it with
`model.load_state_dict(safetensors.torch.load_file(FILE), strict=True)`. Layout 'hf' (BERT and
MiniLM) stores the encoder under HF `BertModel` keys, with the matching `transformers.BertConfig`
in the metadata (`hf_config`): `BertModel(BertConfig(**hf_config), add_pooling_layer=<pool is
'cls'>)` loads it strictly; the classification head is not part of BertModel (the tljax layout
keeps it). Either way the file's metadata holds the class names, the preprocessing and the
model config (JSON strings).
A run with LoRA adapters keeps them under `params/lora/` (tljax layout); --merge-lora folds them
into their kernels (W + alpha/r * A @ B), which the other layouts need and `tljax.create` reads.
Nothing is written over an existing file without --force, and a file is written whole or not
at all. Exit status: 0 done, 2 bad input.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from flax import traverse_util

from tljax import cli
from tljax.errors import UserError

LAYOUTS = ('tljax', 'torchvision', 'hf')


def check_output(path: str, force: bool) -> None:
  """Refuses an output file that is not .safetensors, would replace a file without --force, or
  lies in a folder that does not exist or cannot be written."""
  from tljax import workdir
  if not path.endswith('.safetensors') or os.path.basename(path) == '.safetensors':
    raise UserError(f'--out {path} must be a file name ending in .safetensors')
  workdir.check_new_file(path, '--out', force)


def tensors(variables: dict[str, Any], model_name: str, layout: str) -> dict[str, np.ndarray]:
  """The arrays to store: flat Flax paths, or the model's exporter to an outside layout."""
  from tljax.models import get_entry
  flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(
      {'params': variables['params'], 'batch_stats': variables.get('batch_stats') or {}},
      sep='/').items()}
  if layout == 'tljax':
    return flat
  check_layout(model_name, layout)
  return get_entry(model_name).exporters[layout](flat)


def check_layout(model_name: str, layout: str) -> None:
  """Refuses an outside layout the model has no exporter to."""
  from tljax.models import get_entry
  exporters = get_entry(model_name).exporters
  if layout != 'tljax' and layout not in exporters:
    raise UserError(f'--layout {layout}: model {model_name!r} exports to '
                    f'{", ".join(["tljax", *sorted(exporters)])}')


def export(workdir: str, out: str, step: str | int = 'best', layout: str = 'tljax',
           force: bool = False, merge_lora: bool = False) -> dict[str, str]:
  """Writes checkpoint `step` of `workdir` to `out` in `layout`; returns the metadata. LoRA
  adapters stay apart (`params/lora/...`, tljax layout only) unless `merge_lora`."""
  from safetensors.numpy import save_file

  from tljax import saved_model
  if layout not in LAYOUTS:
    raise UserError(f'--layout {layout!r} must be one of {", ".join(LAYOUTS)}')
  check_output(out, force)
  model, variables, record = saved_model.load(workdir, step, merge_lora=merge_lora)
  check_layout(record['model']['name'], layout)
  if 'lora' in variables['params'] and layout != 'tljax':
    raise UserError(f'{workdir} trained LoRA adapters, which the {layout} layout has no place '
                    'for; add --merge-lora to fold them into their kernels')
  arrays = tensors(variables, record['model']['name'], layout)
  metadata = dict(format='tljax', layout=layout, step=str(record['step']),
                  lora=json.dumps(None if merge_lora else record.get('lora')),
                  model=json.dumps(record['model']),
                  class_names=json.dumps(record.get('class_names')),
                  preprocessing=json.dumps(record['preprocessing']))
  if layout == 'hf':
    from tljax.models import bert
    metadata['hf_config'] = json.dumps(bert.hf_config(model))
  partial = f'{out}.partial'
  try:
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, partial, metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(partial, 0o666 & ~umask)  # as any file the user writes, not private
    os.replace(partial, out)
  except Exception as e:  # noqa: BLE001 (OSError, or safetensors' own error for a failed write)
    if os.path.exists(partial):
      os.remove(partial)
    reason = getattr(e, 'strerror', None) or ' '.join(str(e).split())[:200]
    raise UserError(f'could not write {out}: {reason}') from None
  return metadata


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.ArgumentParser(prog='python -m tljax.export',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True, help='a tljax run')
  parser.add_argument('--out', required=True, help='the .safetensors file to write')
  parser.add_argument('--step', default='best', help="'best', 'last' or a step number")
  parser.add_argument('--layout', default='tljax', choices=LAYOUTS)
  parser.add_argument('--force', action='store_true', help='replace an existing --out file')
  parser.add_argument('--merge-lora', action='store_true',
                      help='fold LoRA adapters into their kernels (W + alpha/r * A @ B)')
  args = parser.parse_args(argv)
  try:
    metadata = export(args.workdir, args.out, args.step, args.layout, args.force,
                      args.merge_lora)
  except UserError as e:
    print('error: ' + ' '.join(str(e).splitlines()), file=sys.stderr)
    sys.exit(2)
  print(f'wrote {args.out}: step {metadata["step"]} of {args.workdir}, {args.layout} layout'
        + (' (the encoder: the classifier head has no BertModel key; --layout tljax keeps it)'
           if args.layout == 'hf' else ''))


if __name__ == '__main__':
  main()
