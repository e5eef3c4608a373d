"""Time per epoch: full fine-tuning against a linear probe on cached features, through tljax.train.

  python -m benchmarks.epoch [--model mobilenet_v2] [--size 128] [--batch 32]
      [--out benchmarks/results/epoch_cpu.json]

Both runs use the real ELPV training split (1,968 images) without augmentation, so the probe may
cache its features; an epoch's time is the run's median step time times its steps per epoch, and
the one-off cost of computing the cache is reported beside it.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import jax

from benchmarks import common
from tljax import train


def run(model: str, preset: str, args: argparse.Namespace, epochs: float,
        extra: dict | None = None) -> dict:
  config = common.make_config(model, preset, args.size, args.batch, num_classes=4, overrides={
      'init.pretrained': None,  # speed does not depend on the weights' values
      'data.source': 'elpv', 'data.augment': False, 'data.cache_decoded': True,
      'total_epochs': float(epochs), 'log_every': 5, 'eval_every': 0,
      'checkpoint_every': 10**9, **(extra or {})})
  with tempfile.TemporaryDirectory() as workdir:
    started = time.perf_counter()
    results = train.run(config, workdir)
    results['run_s'] = time.perf_counter() - started
  steps_per_epoch = math.ceil(results['train_examples'] / args.batch)
  results['epoch_s'] = results['median_step_time_s'] * steps_per_epoch
  return results


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='mobilenet_v2')
  parser.add_argument('--size', type=int, default=128)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--out', default=f'benchmarks/results/epoch_{jax.default_backend()}.json')
  args = parser.parse_args()
  full = run(args.model, 'full', args, epochs=1)
  probe = run(args.model, 'linear_probe', args, epochs=10,
              extra={'data.cache_features': True, 'model.dropout': 0.0})
  keep = ('epoch_s', 'median_step_time_s', 'run_s', 'train_examples', 'trainable_params',
          'feature_cache')
  payload = dict(
      machine=common.machine(), model=args.model, image_size=args.size, batch=args.batch,
      full={k: full[k] for k in keep if k in full},
      cached_probe={k: probe[k] for k in keep if k in probe},
      speedup_per_epoch=full['epoch_s'] / probe['epoch_s'],
      speedup_first_epoch_with_cache=full['epoch_s'] / (
          probe['epoch_s'] + probe['feature_cache']['seconds']))
  common.write_json(args.out, payload)
  print(payload)


if __name__ == '__main__':
  main()
