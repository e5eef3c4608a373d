"""Per-device memory of the train state and step under replicated, FSDP and 2-D layouts.

  python -m benchmarks.sharding [--models resnet50,vit_s16] [--size 128] [--batch 16]
      [--devices 8] [--out benchmarks/results/sharding_<backend>.json]

Full fine-tuning with AdamW (two moments per parameter: the state FSDP exists to split). On CPU
the devices are simulated (`--devices`), so bytes are what matter there; step times on shared
cores are reported but say little about real accelerators. State bytes are read off the placed
arrays' shardings; step memory is XLA's buffer assignment for one device's program.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import jax
import numpy as np

from benchmarks import common
from tljax import build, parallel, steps
from tljax.partition import Layout


def measure(layout: Layout, step: Any, state: steps.TrainState,
            host_batch: dict[str, np.ndarray], args: argparse.Namespace) -> dict[str, Any]:
  """Places `state` by `layout`, compiles and times the step; bytes per device."""
  runner = parallel.JitRunner(layout)
  state = runner.place_state(state)
  batch = runner.global_batch(host_batch)
  timed = common.compile_and_time(runner.jit_train(step, state), state, batch, args.steps,
                                 args.warmup)
  compiled, compile_s, times, state = timed.compiled, timed.compile_s, timed.times, timed.state
  peak, kind = common.peak_memory_bytes(compiled)
  summary = parallel.layout_summary(state, runner.mesh)
  return dict(mesh=summary['mesh'], leaves=summary['leaves'],
              split_leaves=summary['split_leaves'],
              state_bytes_replicated=summary['bytes_replicated'],
              state_bytes_per_device=summary['bytes_per_device'],
              step_bytes_per_device=peak, step_bytes_kind=kind, compile_s=compile_s,
              step_s=common.median(times))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default='resnet50,vit_s16')
  parser.add_argument('--size', type=int, default=128)
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--devices', type=int, default=8, help='simulated CPU devices')
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--out', default=None)
  args = parser.parse_args()
  if os.environ.get('JAX_PLATFORMS', 'cpu') == 'cpu':  # before the backend starts
    jax.config.update('jax_num_cpu_devices', args.devices)

  count = jax.device_count()
  layouts = [('replicated', Layout('replicate', 4.0, count)),
             ('fsdp', Layout('fsdp', 4.0, count)),
             ('fsdp, min 64 KiB', Layout('fsdp', 1 / 16, count)),
             ('fsdp 2-D', Layout('fsdp', 4.0, count // 2, 2))]
  rows = []
  for name in args.models.split(','):
    config = common.make_config(name, 'full', args.size, args.batch,
                                overrides={'optim.name': 'adamw'})
    built = build.build(config, 1000)
    step, state = built.train_step(), built.state
    host_batch = common.random_batch(args.batch, args.size, config.model.num_classes)
    for layout_name, layout in layouts:
      rows.append(dict(model=name, layout=layout_name, min_size_mb=layout.min_size_mb,
                       **measure(layout, step, state, host_batch, args)))
      print(rows[-1], flush=True)
  out = args.out or os.path.join(os.path.dirname(__file__), 'results',
                                 f'sharding_{jax.default_backend()}.json')
  common.write_json(out, dict(machine=common.machine(), devices=count, batch=args.batch,
                              image_size=args.size, optimizer='adamw', rows=rows))
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
