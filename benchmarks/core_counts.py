"""Does the same training command give the same bits on 1 and on N cores? And can XLA flags make it?

  python -m benchmarks.core_counts [--steps 10] [--width 64]
      [--out benchmarks/results/core_counts_cpu.json]

Runs `tljax.train` on the test config (small CNN on arrays) under `taskset` with one core and
with every core, twice each, with the compilation cache off, and compares the final checkpoints
array by array. Then repeats the 1-core / all-core pair under each XLA:CPU flag set that might fix
the order of floating-point reductions. The figures go into the README's reliability section.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAG_SETS = ('', '--xla_cpu_multi_thread_eigen=false', '--xla_cpu_use_xnnpack=false',
             '--xla_cpu_use_onednn=false', '--xla_cpu_use_thunk_runtime=false',
             '--xla_cpu_strict_dot_conv_math=true',
             '--xla_cpu_multi_thread_eigen=false --xla_cpu_use_xnnpack=false '
             '--xla_cpu_use_onednn=false')


def _train(cores: str, workdir: str, data: str, args: argparse.Namespace, flags: str) -> None:
  env = dict(os.environ, JAX_PLATFORMS='cpu', TLJAX_COMPILATION_CACHE='', XLA_FLAGS=flags)
  subprocess.run(['taskset', '-c', cores, sys.executable, '-m', 'tljax.train',
                  f'--config={REPO}/configs/tests/arrays.py', f'--workdir={workdir}',
                  f'--config.data.path={data}', f'--config.total_steps={args.steps}',
                  f'--config.model.width={args.width}', '--config.data.batch_size=48',
                  '--config.data.augment=True'],
                 cwd=REPO, env=env, check=True, capture_output=True)


def _compare(a: str, b: str) -> dict[str, float]:
  import jax

  from tljax.weights.read import restore_latest
  left, _ = jax.tree_util.tree_flatten_with_path(restore_latest(a))
  right, _ = jax.tree_util.tree_flatten_with_path(restore_latest(b))
  differ = [float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
            for (_, x), (_, y) in zip(left, right, strict=True) if not np.array_equal(x, y)]
  return dict(arrays=len(left), differ=len(differ), max_abs=max(differ, default=0.0))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--width', type=int, default=64)
  parser.add_argument('--out', default=os.path.join(REPO, 'benchmarks/results/'
                                                    'core_counts_cpu.json'))
  args = parser.parse_args()
  sys.path.insert(0, os.path.join(REPO, 'tests'))
  from conftest import write_npz
  all_cores = f'0-{os.cpu_count() - 1}'
  results = dict(cpu_count=os.cpu_count(), steps=args.steps, width=args.width, runs=[])
  with tempfile.TemporaryDirectory() as root:
    data = write_npz(os.path.join(root, 'data.npz'))
    for flags in FLAG_SETS:
      dirs = {}
      for cores, tag in (('0', 'one'), (all_cores, 'all')):
        for repeat in ((0, 1) if flags == '' else (0,)):
          dirs[tag, repeat] = os.path.join(root, f'{len(results["runs"])}-{tag}{repeat}')
          _train(cores, dirs[tag, repeat], data, args, flags)
      row = dict(xla_flags=flags, one_vs_all=_compare(dirs['one', 0], dirs['all', 0]))
      if flags == '':
        row['one_vs_one'] = _compare(dirs['one', 0], dirs['one', 1])
        row['all_vs_all'] = _compare(dirs['all', 0], dirs['all', 1])
      results['runs'].append(row)
      print(json.dumps(row), flush=True)
  with open(args.out, 'w') as f:
    json.dump(results, f, indent=2)


if __name__ == '__main__':
  main()
