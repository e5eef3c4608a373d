"""Text fine-tuning throughput: MiniLM in tljax against PyTorch + transformers, in one process.

  python -m benchmarks.text [--batch 16] [--max_length 128] [--steps 10]
      [--out benchmarks/results/text_cpu.json]

all-MiniLM-L6-v2's architecture (6 layers, width 384; random weights: speed does not depend on
them) with a mean-pooled 5-class head, on BBC News articles tokenised to `max_length` tokens,
AdamW, dropout off in both. Two freeze depths: full fine-tuning and a linear probe that still
runs the frozen encoder every step (tljax: `freeze.preset='linear_probe'`, gradients of the
head only; PyTorch: the encoder under torch.no_grad(), as one would write it). Reported:
compile time, median step time after warm-up, examples/s, and the tljax/PyTorch ratio. A
linear probe with data.cache_features skips the encoder altogether (benchmarks/epoch.py).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import torch

from benchmarks import common
from tljax import build, resolve
from tljax import config as config_lib
from tljax.data import text
from tljax.models import bert, get_entry
from tljax.weights import zoo

PRESETS = ('full', 'linear_probe')
NUM_CLASSES = 5


def token_batch(batch_size: int, max_length: int) -> dict[str, np.ndarray]:
  """The first `batch_size` BBC News training articles, tokenised as the pipeline does."""
  source = text.BbcNewsSource()
  tokenizer = text.load_tokenizer(zoo.locate(zoo.TOKENIZERS['minilm_l6/all-v2']), max_length)
  arrays = tokenizer.encode(source.texts('train')[:batch_size])
  batch = {key: arrays[key] for key in text.INPUT_KEYS}
  batch['label'] = source.labels('train')[:batch_size].astype(np.int32)
  return batch


def make_config(preset: str, batch_size: int, max_length: int) -> ml_collections.ConfigDict:
  config = config_lib.resolve(ml_collections.ConfigDict(dict(
      model=dict(name='minilm_l6', num_classes=NUM_CLASSES, dropout=0.0),
      data=dict(source='bbc_news', batch_size=batch_size, max_length=max_length,
                tokenizer=zoo.TOKENIZERS['minilm_l6/all-v2']),
      freeze=dict(preset=preset),
      optim=dict(name='adamw', lr=1e-4, weight_decay=0.01))))
  return resolve.resolve_config(config)


def jax_row(preset: str, batch: dict[str, np.ndarray], args: argparse.Namespace
            ) -> dict[str, Any]:
  config = make_config(preset, args.batch, args.max_length)
  built = build.build(config, 1000)
  step = jax.jit(built.train_step(input_keys=bert.INPUTS), donate_argnums=0)
  timed = common.compile_and_time(step, built.state, jax.tree.map(jnp.asarray, batch),
                                  args.steps, args.warmup)
  return dict(compile_s=timed.compile_s, step_s=common.median(timed.times),
              flops=common.flops(timed.compiled))


class TorchClassifier(torch.nn.Module):
  """transformers' BertModel, mean pooling over real tokens, a linear head."""

  def __init__(self, hf_config: dict[str, Any], frozen_encoder: bool):
    import transformers
    super().__init__()
    self.encoder = transformers.BertModel(transformers.BertConfig(**hf_config),
                                          add_pooling_layer=False)
    self.head = torch.nn.Linear(hf_config['hidden_size'], NUM_CLASSES)
    self.frozen_encoder = frozen_encoder
    if frozen_encoder:
      self.encoder.requires_grad_(False)

  def forward(self, input_ids, attention_mask, token_type_ids):
    with torch.set_grad_enabled(not self.frozen_encoder and torch.is_grad_enabled()):
      states = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                            token_type_ids=token_type_ids).last_hidden_state
    mask = attention_mask.unsqueeze(-1).to(states.dtype)
    pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return self.head(pooled)


def torch_row(preset: str, batch: dict[str, np.ndarray], args: argparse.Namespace
              ) -> dict[str, Any]:
  torch.manual_seed(0)
  model = get_entry('minilm_l6').build(num_classes=NUM_CLASSES, dropout=0.0)
  classifier = TorchClassifier(bert.hf_config(model), preset == 'linear_probe').train()
  optimizer = torch.optim.AdamW([p for p in classifier.parameters() if p.requires_grad],
                                lr=1e-4, weight_decay=0.01)
  inputs = {key: torch.from_numpy(batch[key]).long() for key in text.INPUT_KEYS}
  labels = torch.from_numpy(batch['label']).long()

  def one():
    optimizer.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(classifier(**inputs), labels)
    loss.backward()
    optimizer.step()
    return loss.item()

  return dict(step_s=common.median(common.time_calls(one, args.steps, args.warmup)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--max_length', type=int, default=128)
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--out', default=f'benchmarks/results/text_{jax.default_backend()}.json')
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count() or 1)
  started = time.time()
  batch = token_batch(args.batch, args.max_length)
  import transformers
  payload = dict(machine=common.machine(), torch=torch.__version__,
                 transformers=transformers.__version__, torch_threads=torch.get_num_threads(),
                 model='minilm_l6', batch=args.batch, max_length=args.max_length,
                 steps=args.steps, warmup=args.warmup, rows=[])
  for preset in PRESETS:
    ours, theirs = jax_row(preset, batch, args), torch_row(preset, batch, args)
    payload['rows'].append(dict(
        preset=preset, compile_s=ours['compile_s'], step_s=ours['step_s'],
        examples_per_s=args.batch / ours['step_s'], flops_per_step=ours['flops'],
        torch_step_s=theirs['step_s'], torch_examples_per_s=args.batch / theirs['step_s'],
        ratio_vs_torch=ours['step_s'] / theirs['step_s']))
    print(payload['rows'][-1], flush=True)
  common.write_json(args.out, dict(payload, wall_s=time.time() - started))
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
