"""Fine-tuning step cost by freeze depth, tljax against PyTorch side by side in one process.

  python -m benchmarks.finetune [--models mobilenet_v2,resnet50,vit_s16] [--batch 32]
      [--size 128] [--steps 20] [--out benchmarks/results/finetune_cpu.json]

For each model and freeze depth (first k STAGES frozen, from full fine-tuning to a linear probe):
tljax's compile time, median step time after warm-up, images/s, XLA FLOPs per step and achieved
FLOP/s, peak memory, optimizer-state bytes; then the same model, batch and input in PyTorch
(frozen stages with requires_grad=False and BatchNorm in eval mode) and the tljax/PyTorch ratio.
A second table compares the step tljax uses (gradients of the trainable leaves only) with the
plain one (gradients of every leaf, frozen ones zeroed by the optimizer) under gradient clipping.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from benchmarks import common, torch_models
from tljax import steps
from tljax.models import get_entry

# Freeze depths per model: first k STAGES frozen, 0 = full fine-tuning, len-1 = linear probe.
DEPTHS = {'mobilenet_v2': (0, 2, 4, 7, 9), 'resnet50': (0, 1, 2, 3, 4, 5),
          'vit_s16': (0, 4, 7, 11, 14)}


def torch_step_times(name: str, frozen: int, batch: dict[str, np.ndarray], num_classes: int,
                     steps_timed: int, warmup: int) -> list[float]:
  """Median-ready step times of the same fine-tuning step in PyTorch (SGD, momentum, wd)."""
  torch.manual_seed(0)
  image_size = batch['image'].shape[1]
  device = 'cuda' if torch.cuda.is_available() else 'cpu'  # where jax has a GPU, so may torch
  model = torch_models.Staged(torch_models.build(name, num_classes, image_size), frozen)
  model = model.to(device).train()
  trainable = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.SGD(trainable, lr=0.01, momentum=0.9, weight_decay=1e-4)
  images = torch.from_numpy(batch['image']).permute(0, 3, 1, 2).contiguous().to(device)
  labels = torch.from_numpy(batch['label']).long().to(device)

  def one():
    optimizer.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    return loss.item()  # waits for the step, on any device

  return common.time_calls(one, steps_timed, warmup)


def make_plain_train_step(model, optimizer, mask, schedule, seed):
  """The step without tljax's trainable-only differentiation: gradients of every leaf."""
  del mask

  def train_step(state: steps.TrainState, batch: dict[str, jax.Array]):
    rng = jax.random.fold_in(jax.random.key(seed), state.step)

    def loss_fn(params):
      logits, updates = model.apply(
          {'params': params, 'batch_stats': state.batch_stats}, batch['image'], train=True,
          mutable=['batch_stats'], rngs={'dropout': rng})
      return jnp.mean(steps.cross_entropy(logits, batch['label'])), updates['batch_stats']

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(loss=loss, grad_norm=optax.tree.norm(grads), lr=schedule(state.step))
    return steps.TrainState(state.step + 1, params, batch_stats, opt_state), metrics

  return train_step


def depth_row(name: str, frozen: int, args: argparse.Namespace) -> dict[str, Any]:
  config = common.make_config(name, f'stages:{frozen}', args.size, args.batch)
  setup = common.build_step(config)
  jax_times = common.time_jax_steps(setup, args.steps, args.warmup)
  host_batch = common.random_batch(args.batch, args.size)
  torch_times = torch_step_times(name, frozen, host_batch, config.model.num_classes,
                                 args.steps, args.warmup)
  jax_step, torch_step = common.median(jax_times), common.median(torch_times)
  step_flops = common.flops(setup.compiled)
  peak, peak_kind = common.peak_memory_bytes(setup.compiled)
  stages = get_entry(name).stages
  return dict(
      model=name, frozen_stages=frozen, stages=len(stages),
      preset='full' if frozen == 0 else 'linear_probe' if frozen == len(stages) - 1
      else f'stages:{frozen}',
      trainable_params=setup.trainable_params, optimizer_state_bytes=setup.opt_state_bytes,
      optimizer_state_bytes_per_trainable_param=(
          setup.opt_state_param_bytes / setup.trainable_params),
      compile_s=setup.compile_s, lower_s=setup.lower_s, step_s=jax_step,
      images_per_s=args.batch / jax_step,
      flops_per_step=step_flops,
      achieved_gflops=step_flops / jax_step / 1e9 if step_flops else None,
      peak_memory_bytes=peak, peak_memory_kind=peak_kind,
      torch_step_s=torch_step, torch_images_per_s=args.batch / torch_step,
      ratio_vs_torch=jax_step / torch_step)


def clipping_row(name: str, args: argparse.Namespace) -> dict[str, Any]:
  """tljax's step against the plain one, both with global-norm clipping, at a middle depth."""
  frozen = DEPTHS[name][len(DEPTHS[name]) // 2]
  config = common.make_config(name, f'stages:{frozen}', args.size, args.batch,
                              overrides={'optim.clip_norm': 1.0})
  row: dict[str, Any] = dict(model=name, frozen_stages=frozen)
  for label, make_step in (('tljax', steps.make_train_step), ('plain', make_plain_train_step)):
    setup = common.build_step(config, make_step)
    row[f'{label}_step_s'] = common.median(common.time_jax_steps(setup, args.steps // 2,
                                                                 args.warmup))
    row[f'{label}_flops'] = common.flops(setup.compiled)
  return row


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default='mobilenet_v2,resnet50,vit_s16')
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--size', type=int, default=128)
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--depths', default='', help='comma-separated k, overriding DEPTHS')
  parser.add_argument('--out', default=f'benchmarks/results/finetune_{jax.default_backend()}'
                                       '.json')
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count() or 1)
  started = time.time()
  payload = dict(machine=common.machine(), torch=torch.__version__,
                 torch_threads=torch.get_num_threads(), batch=args.batch, image_size=args.size,
                 steps=args.steps, warmup=args.warmup, rows=[], clipping=[], complete=False)
  for name in args.models.split(','):
    depths = [int(k) for k in args.depths.split(',')] if args.depths else DEPTHS[name]
    for frozen in depths:
      payload['rows'].append(depth_row(name, frozen, args))
      print(payload['rows'][-1], flush=True)
      common.write_json(args.out, dict(payload, wall_s=time.time() - started))  # so far
    payload['clipping'].append(clipping_row(name, args))
    print(payload['clipping'][-1], flush=True)
  common.write_json(args.out, dict(payload, wall_s=time.time() - started, complete=True))
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
