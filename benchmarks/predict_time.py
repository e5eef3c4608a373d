"""What using a fine-tuned run costs: `tljax.predict` on one image and on a folder of 500.

  python -m benchmarks.predict_time [--repeats 3] [--out benchmarks/results/predict_time_cpu.json]

A MobileNetV2 run on a generated 3-class folder (configs/folder.py, 128 px, 2 steps) provides
the workdir. Each timing is a fresh `python -m tljax.predict` process, wall clock, so it holds
the imports, the checkpoint restore and the compilation a user waits for; images/s on the
folder is marginal: 500 / (folder time - one-image time), medians of the repeats. The zoo path
(`--pretrained mobilenet_v2/imagenet`, 224 px) is timed the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _folder(root: str, per_class: int, splits: tuple[str, ...]) -> None:
  """Three classes told apart by one halved colour channel."""
  from PIL import Image
  rng = np.random.default_rng(0)
  for split in splits:
    for index, name in enumerate(('a', 'b', 'c')):
      os.makedirs(os.path.join(root, split, name))
      for i in range(per_class):
        pixels = rng.integers(0, 255, (200, 240, 3)).astype(np.uint8)
        pixels[..., index] //= 2
        Image.fromarray(pixels).save(os.path.join(root, split, name, f'{i}.jpg'), quality=90)


def _images(folder: str, count: int) -> None:
  from PIL import Image
  rng = np.random.default_rng(1)
  os.makedirs(folder)
  for i in range(count):
    pixels = rng.integers(0, 255, (200, 240, 3)).astype(np.uint8)
    Image.fromarray(pixels).save(os.path.join(folder, f'{i:03d}.jpg'), quality=90)


def _timed(args: list[str]) -> float:
  start = time.perf_counter()
  subprocess.run([sys.executable, *args], cwd=REPO, check=True, capture_output=True, text=True)
  return time.perf_counter() - start


def _cpu() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    return platform.processor()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--out', default=os.path.join(REPO, 'benchmarks/results/'
                                                    'predict_time_cpu.json'))
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    photos, many = os.path.join(tmp, 'photos'), os.path.join(tmp, 'new')
    _folder(photos, 8, ('train', 'val', 'test'))
    _images(many, 500)
    images = sorted(os.path.join(many, name) for name in os.listdir(many))
    workdir = os.path.join(tmp, 'run')
    subprocess.run([sys.executable, '-m', 'tljax.train', f'--config=configs/folder.py:{photos}',
                    f'--workdir={workdir}', '--config.total_steps=2'], cwd=REPO, check=True,
                   capture_output=True)
    one = [images[0]]
    timings: dict[str, list[float]] = {'workdir_one_image_s': [], 'workdir_500_images_s': [],
                                       'zoo_one_image_s': []}
    for _ in range(args.repeats):
      timings['workdir_one_image_s'].append(_timed(['-m', 'tljax.predict', '--workdir',
                                                    workdir, *one]))
      timings['workdir_500_images_s'].append(_timed(['-m', 'tljax.predict', '--workdir',
                                                     workdir, many]))
      timings['zoo_one_image_s'].append(_timed(['-m', 'tljax.predict', '--pretrained',
                                                'mobilenet_v2/imagenet', *one]))
      print(json.dumps({k: round(v[-1], 2) for k, v in timings.items()}), flush=True)
  medians = {k: statistics.median(v) for k, v in timings.items()}
  summary = dict(cpu=_cpu(), cpu_count=os.cpu_count(), repeats=args.repeats, runs=timings,
                 medians=medians, images_per_s_marginal=500 / (
                     medians['workdir_500_images_s'] - medians['workdir_one_image_s']))
  print(json.dumps(summary))
  with open(args.out, 'w') as f:
    json.dump(summary, f, indent=2)


if __name__ == '__main__':
  main()
