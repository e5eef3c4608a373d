"""Ablation sweeps: expand variants of a base config, run them (or print their commands), gather.

  python -m tljax.ablate --config=configs/ablations/FILE.py[:ARG] --workdir=DIR [--print-commands]

A sweep file returns a `tljax.sweep.Sweep`; each variant is an ordinary training run in
`DIR/<variant>/`. The same command skips finished variants, resumes unfinished ones, and writes
`DIR/results.csv`, `DIR/results.md` and `DIR/results.png`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections

from tljax import build, cli, console, preemption, report, resolve
from tljax import config as config_lib
from tljax import workdir as workdir_lib
from tljax.errors import PREEMPTED_EXIT_CODE, Preempted, UserError, exit_status
from tljax.sweep import Sweep, Variant, command, expand, variant_config


def _finished(workdir: str) -> bool:
  """Whether the variant's run finished (its results.json is there; a damaged one is an error
  naming it)."""
  return workdir_lib.read_results(workdir) is not None


def run_sweep(sweep: Sweep, sweep_dir: str) -> list[dict[str, Any]]:
  """Runs every unfinished variant in this process, then writes the results files. Every
  variant's config is checked before the first one runs."""
  from tljax import train  # the only importer of train.py; keeps --print-commands light

  workdir_lib.check_directory(sweep_dir)
  base = config_lib.load_config_file(sweep.base, ml_collections.ConfigDict)
  variants = expand(sweep, sweep_dir)
  configs = []
  for variant in variants:
    try:
      configs.append(resolve.resolve_config(variant_config(base, variant)))
      if _has_strategy(configs[-1]):  # checked on the parameters' shapes, nothing loaded
        build.check(configs[-1])
    except UserError as e:
      message = str(e)
      raise UserError(message if message.startswith('sweep variant') else
                      f'sweep variant {variant.name!r}: {message}') from None
  for index, (variant, config) in enumerate(zip(variants, configs, strict=True), 1):
    requested = preemption.requested_early()
    if requested:  # between variants: the finished ones are complete, nothing else to save
      raise Preempted(None, f'stopped by {requested} before variant {variant.name!r}; run the '
                            'same command to go on')
    workdir = os.path.join(sweep_dir, variant.name)
    if _finished(workdir):
      changed = workdir_lib.config_differences(workdir_lib.saved_config(workdir) or {},
                                               json.loads(config.to_json_best_effort()))
      if changed:
        raise UserError(f'variant {variant.name!r} in {workdir} finished with a different '
                        f'config ({"; ".join(changed)}); remove that directory or use '
                        'another --workdir')
      print(f'[{index}/{len(variants)}] {variant.name}: finished, skipped', flush=True)
      continue
    print(f'[{index}/{len(variants)}] {variant.name}: {variant.overrides}', flush=True)
    train.run(config, workdir)
  return write_results(sweep, sweep_dir, variants)


def _has_strategy(config: ml_collections.ConfigDict) -> bool:
  """Whether a variant sets a key that only the parameters' paths can check (LoRA targets,
  an unfreezing schedule against the model's stages, L2-SP without weights)."""
  return bool(config.lora.rank or config.lora.targets or config.optim.l2sp
              or config.freeze.unfreeze_every is not None or config.freeze.unfreeze is not None)


def write_results(sweep: Sweep, sweep_dir: str, variants: Sequence[Variant]
                  ) -> list[dict[str, Any]]:
  """results.csv / results.md / results.png from the finished variants; returns the rows."""
  runs = []
  for variant in variants:
    results = workdir_lib.read_results(os.path.join(sweep_dir, variant.name))
    if results is not None:
      runs.append(dict(variant=variant.name, group=variant.group, tags=variant.tags,
                       results=results))
  rows = report.aggregate(runs)
  report.write_csv(rows, os.path.join(sweep_dir, 'results.csv'))
  table = report.markdown_table(rows, missing=len(variants) - len(runs),
                                published=sweep.published)
  with open(os.path.join(sweep_dir, 'results.md'), 'w') as f:
    f.write((f'# {sweep.title}\n\n' if sweep.title else '') + table + '\n')
  if sweep.plot is not None and rows:
    report.plot(rows, sweep.plot, os.path.join(sweep_dir, 'results.png'), sweep.title)
  return rows


def load_sweep(spec: str) -> Sweep:
  return config_lib.load_config_file(spec, Sweep)


def main(argv: Sequence[str] | None = None) -> None:
  preemption.install_early()  # SIGTERM and Ctrl-C stop between steps or variants, not mid-write
  parser = cli.ArgumentParser(prog='python -m tljax.ablate', description=__doc__.split(
      '\n')[0])
  parser.add_argument('--config', required=True, help='sweep file[:arg] (configs/ablations/)')
  parser.add_argument('--workdir', required=True, help='one subdirectory per variant')
  parser.add_argument('--print-commands', action='store_true',
                      help='print one `python -m tljax.train` command per variant and exit')
  parser.add_argument('--verbosity', type=int, default=None,
                      help="as tljax.train's: 0 or more shows the libraries' INFO logs on the "
                           'terminal too (they always go to each variant\'s train.log)')
  args = parser.parse_args(argv)
  console.quiet_terminal(args.verbosity is not None)
  if args.verbosity is not None:
    logging.getLogger('absl').setLevel(logging.DEBUG if args.verbosity > 0 else
                                       logging.INFO if args.verbosity == 0 else logging.WARNING)
  console.tolerate_lost_output()
  try:
    sweep = load_sweep(args.config)
    if args.print_commands:
      base = config_lib.load_config_file(sweep.base, ml_collections.ConfigDict)
      for variant in expand(sweep, args.workdir):
        print(command(sweep, variant, args.workdir, base))
      return
    from tljax import parallel
    parallel.enable_compilation_cache()
    rows = run_sweep(sweep, args.workdir)
  except UserError as e:
    print('error: ' + ' '.join(str(e).splitlines()), file=sys.stderr)  # one line, always
    sys.exit(exit_status(e))
  except Preempted as e:  # the rerun skips finished variants and resumes this one
    print(str(e), file=sys.stderr)
    sys.exit(PREEMPTED_EXIT_CODE)
  finally:
    preemption.ignore_from_now()
  print(report.markdown_table(rows, published=sweep.published))
  print(f'\nwrote {os.path.join(args.workdir, "results.md")}, results.csv'
        + (f' and the plot {os.path.join(args.workdir, "results.png")}' if sweep.plot else ''))


if __name__ == '__main__':
  main()

