"""What checking every image before a run costs: the 2,624 ELPV PNGs, decoded once in parallel.

  python -m benchmarks.image_check [--repeats 3] [--out benchmarks/results/image_check_cpu.json]

Each repeat is a fresh process (the check remembers files it has decoded for the life of a
process, so a sweep pays once); the second check in the same process is timed too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CHILD = '''
import json, time
from tljax.data import image_files, sources
paths = list(sources.ElpvSource().paths)
start = time.perf_counter()
found = image_files.problems(paths, 100_000_000)
first = time.perf_counter() - start
start = time.perf_counter()
image_files.problems(paths, 100_000_000)
print(json.dumps(dict(images=len(paths), problems=len(found), first_s=first,
                      again_s=time.perf_counter() - start)))
'''


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--out', default=os.path.join(REPO, 'benchmarks/results/'
                                                    'image_check_cpu.json'))
  args = parser.parse_args()
  runs = []
  for _ in range(args.repeats):
    out = subprocess.run([sys.executable, '-c', _CHILD], cwd=REPO, check=True,
                         capture_output=True, text=True)
    runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(json.dumps(runs[-1]), flush=True)
  summary = dict(cpu_count=os.cpu_count(), runs=runs,
                 median_first_s=statistics.median(r['first_s'] for r in runs),
                 median_again_s=statistics.median(r['again_s'] for r in runs))
  print(json.dumps(summary))
  with open(args.out, 'w') as f:
    json.dump(summary, f, indent=2)


if __name__ == '__main__':
  main()
