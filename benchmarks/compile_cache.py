"""Compile time of a train step in a fresh process, with an empty and then a warm persistent cache.

  python -m benchmarks.compile_cache [--model mobilenet_v2] [--size 128] [--batch 32]
      [--out benchmarks/results/compile_cache_cpu.json]

tljax turns JAX's persistent compilation cache on by default (`tljax.parallel`); each run here is
a new Python process pointed at the same, initially empty, cache directory. XLA compilation
(what the cache stores) and the tracing and lowering before it (which every process redoes) are
timed separately.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import jax

from benchmarks import common

_CHILD = '''
import json, sys
from benchmarks import common
from tljax import parallel
parallel.enable_compilation_cache()
setup = common.build_step(common.make_config(sys.argv[1], 'full', int(sys.argv[2]),
                                             int(sys.argv[3])))
print(json.dumps(dict(compile_s=setup.compile_s, lower_s=setup.lower_s)))
'''


def compile_in_fresh_process(args: argparse.Namespace, cache_dir: str) -> dict[str, float]:
  env = dict(os.environ, TLJAX_COMPILATION_CACHE=cache_dir)
  out = subprocess.run([sys.executable, '-c', _CHILD, args.model, str(args.size),
                        str(args.batch)], env=env, check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='mobilenet_v2')
  parser.add_argument('--size', type=int, default=128)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--out', default=f'benchmarks/results/compile_cache_{jax.default_backend()}'
                                       '.json')
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as cache_dir:
    first = compile_in_fresh_process(args, cache_dir)
    second = compile_in_fresh_process(args, cache_dir)
    cache_bytes = sum(os.path.getsize(os.path.join(root, f))
                      for root, _, files in os.walk(cache_dir) for f in files)
  payload = dict(machine=common.machine(), model=args.model, image_size=args.size,
                 batch=args.batch, first_compile_s=first['compile_s'],
                 second_compile_s=second['compile_s'],
                 second_over_first=second['compile_s'] / first['compile_s'],
                 first_lower_s=first['lower_s'], second_lower_s=second['lower_s'],
                 cache_bytes=cache_bytes)
  common.write_json(args.out, payload)
  print(payload)


if __name__ == '__main__':
  main()
