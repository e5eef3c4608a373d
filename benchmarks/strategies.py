"""Step time and optimizer memory of each fine-tuning strategy, side by side in one process.

  python -m benchmarks.strategies [--model mobilenet_v2] [--image_size 128] [--batch 32]
      [--steps 8] [--out benchmarks/results/strategies_cpu.json]

ImageNet MobileNetV2 (the pretrained weights: L2-SP pulls towards them) with a 4-class head, as
configs/ablations/strategies_elpv.py trains it, SGD with momentum: the strategies of that sweep
(full fine-tuning, the linear probe without a feature cache, stages:4, layer decay, BitFit,
LoRA r=4 and r=16 on the pointwise convolutions, L2-SP) and each phase of gradual unfreezing.
Reported per row: compile time (tracing, lowering and XLA apart from the steps), median step
time after warm-up, XLA's FLOPs per step, trainable parameters and optimizer-state bytes (all
of them, scalar step counters included). Layer decay changes learning rates only, so it costs
what full fine-tuning costs; it is measured to show that.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks import common
from tljax import build, optim
from tljax.sweep import strategy_variants

POINTWISE = r'.*(expand|project)_conv/kernel|final/conv/kernel'
PRETRAINED = {'mobilenet_v2': 'mobilenet_v2/imagenet'}


def _row(name: str, built: build.Built, phase: int, batch: dict[str, jax.Array],
         args: argparse.Namespace) -> dict[str, Any]:
  state = jax.tree.map(jnp.array, built.state)  # a copy: the timed steps donate theirs
  if phase:
    state = built.state_for_phase(state, phase)
  timed = common.compile_and_time(jax.jit(built.train_step(phase=phase), donate_argnums=0),
                                 state, batch, args.steps, args.warmup)
  trainable = common.trainable_params(built.params, built.phases[phase].mask)
  return dict(strategy=name, phase=phase, compile_s=timed.compile_s,
              step_s=common.median(timed.times), flops=common.flops(timed.compiled),
              trainable_params=trainable,
              optimizer_state_bytes=optim.state_leaf_stats(timed.state.opt_state)[1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='mobilenet_v2')
  parser.add_argument('--image_size', type=int, default=128)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--steps', type=int, default=8)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--out',
                      default=f'benchmarks/results/strategies_{jax.default_backend()}.json')
  args = parser.parse_args()
  started = time.time()
  batch = jax.tree.map(jnp.asarray, common.random_batch(args.batch, args.image_size, 4))
  payload = dict(machine=common.machine(), model=args.model, image_size=args.image_size,
                 batch=args.batch, steps=args.steps, warmup=args.warmup, rows=[])
  for name, overrides, _ in strategy_variants(POINTWISE, {}, {}, unfreeze_every=1, l2sp=0.01):
    config = common.make_config(args.model, overrides.pop('freeze.preset'), args.image_size,
                                args.batch, num_classes=4, overrides={
                                    'init.pretrained': PRETRAINED[args.model],
                                    'init.dont_load': ('head/.*',), **overrides})
    built = build.build(config, 1000)
    phases = range(len(built.phases)) if name == 'gradual' else (0,)
    for phase in phases:
      payload['rows'].append(_row(name, built, phase, batch, args))
      print(payload['rows'][-1], flush=True)
  common.write_json(args.out, dict(payload, wall_s=time.time() - started))
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
