"""Images/s of the training input pipeline alone (no model), to compare with the train step's.

  python -m benchmarks.input_pipeline [--size 128] [--batch 32] [--batches 60]
      [--out benchmarks/results/input_pipeline_cpu.json]

The ELPV training split through `tljax.data.pipeline.train_batches` with random crops and flips,
decoding every epoch and with `data.cache_decoded` (decoded, resized uint8 kept in memory).
"""

from __future__ import annotations

import argparse
import time

import jax

from benchmarks import common
from tljax.data import pipeline, sources


def images_per_s(source: sources.Source, args: argparse.Namespace, cache_decoded: bool) -> float:
  config = common.make_config('mobilenet_v2', 'full', args.size, args.batch, overrides={
      'data.source': 'elpv', 'data.augment': True, 'data.cache_decoded': cache_decoded}).data
  batches = pipeline.train_batches(source, config, start_step=0, seed=0)
  # Warm-up: one full epoch, so the decoded cache (when on) is filled as in a long run.
  for _ in range(-(-pipeline.train_size(source, config) // args.batch) + 2):
    next(batches)
  start = time.perf_counter()
  for _ in range(args.batches):
    next(batches)
  return args.batches * args.batch / (time.perf_counter() - start)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--size', type=int, default=128)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--batches', type=int, default=60)
  parser.add_argument('--out', default=f'benchmarks/results/input_pipeline_'
                                       f'{jax.default_backend()}.json')
  args = parser.parse_args()
  source = sources.ElpvSource()
  payload = dict(machine=common.machine(), dataset='elpv', image_size=args.size,
                 batch=args.batch, augment=True,
                 images_per_s=images_per_s(source, args, cache_decoded=False),
                 images_per_s_cache_decoded=images_per_s(source, args, cache_decoded=True))
  common.write_json(args.out, payload)
  print(payload)


if __name__ == '__main__':
  main()
