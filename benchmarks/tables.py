"""Renders benchmarks/results/*_<backend>.json as the markdown tables in benchmarks/README.md.

  python -m benchmarks.tables [--backend cpu]

The tables replace the text between `<!-- BEGIN <backend> -->` and `<!-- END <backend> -->`.
"""

from __future__ import annotations

import argparse
import json
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name: str, backend: str) -> dict | None:
  path = os.path.join(HERE, 'results', f'{name}_{backend}.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _table(header: list[str], rows: list[list[str]]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
  return '\n'.join(lines)


def _mb(value: float | None) -> str:
  return '-' if value is None else f'{value / 2**20:.1f}'


def finetune_tables(result: dict) -> str:
  m = result['machine']
  rows = []
  for r in result['rows']:
    rows.append([
        r['model'], f"{r['preset']} ({r['frozen_stages']}/{r['stages'] - 1})",
        f"{r['trainable_params']:,}", f"{r['compile_s'] + r.get('lower_s', 0.0):.1f}",
        f"{r['step_s'] * 1e3:.0f}",
        f"{r['images_per_s']:.1f}",
        '-' if r['flops_per_step'] is None else f"{r['flops_per_step'] / 1e9:.1f}",
        '-' if r['achieved_gflops'] is None else f"{r['achieved_gflops']:.0f}",
        _mb(r['peak_memory_bytes']), _mb(r['optimizer_state_bytes']),
        f"{r['optimizer_state_bytes_per_trainable_param']:.3f}",
        f"{r['torch_step_s'] * 1e3:.0f}", f"{r['torch_images_per_s']:.1f}",
        f"{r['ratio_vs_torch']:.2f}"])
  header = ['model', 'frozen (stages)', 'trainable params', 'trace+compile s', 'step ms', 'img/s',
            'GFLOP/step', 'GFLOP/s', 'peak MiB', 'opt state MiB', 'opt B/param',
            'torch step ms', 'torch img/s', 'tljax/torch']
  text = [f"{m['cpu']} ({m['cpu_count']} cores, backend {m['backend']}), jax {m['jax']}, "
          f"torch {result['torch']} ({result['torch_threads']} threads); batch "
          f"{result['batch']}, {result['image_size']} px, float32; median of {result['steps']} "
          f"steps after {result['warmup']} warm-up; peak memory: "
          f"{result['rows'][0]['peak_memory_kind']}. Whole run: "
          f"{result['wall_s'] / 60:.0f} min.", '', _table(header, rows)]
  clip_rows = [[c['model'], str(c['frozen_stages']), f"{c['tljax_flops'] / 1e9:.1f}",
                f"{c['plain_flops'] / 1e9:.1f}", f"{c['tljax_step_s'] * 1e3:.0f}",
                f"{c['plain_step_s'] * 1e3:.0f}",
                f"{c['plain_step_s'] / c['tljax_step_s']:.2f}"] for c in result['clipping']]
  text += ['', 'With global-norm clipping (clip_norm=1): tljax differentiates the trainable '
           'leaves only; "plain" differentiates every leaf and lets the optimizer zero the '
           'frozen ones.', '',
           _table(['model', 'frozen stages', 'tljax GFLOP/step', 'plain GFLOP/step',
                   'tljax step ms', 'plain step ms', 'plain/tljax'], clip_rows)]
  return '\n'.join(text)


def profile_table(result: dict) -> str:
  rows = []
  for p in result['profiles']:
    for kind, k in p['kinds'].items():
      rows.append([p['model'], kind, str(k['layers']) if k['layers'] else '-',
                   f"{k['jax_s'] * 1e3:.0f}", f"{k['torch_s'] * 1e3:.0f}",
                   f"{k['jax_s'] / k['torch_s']:.2f}" if k['torch_s'] > 0 else '-'])
  return _table(['model', 'layer kind', 'layers', 'XLA ms', 'torch ms', 'XLA/torch'], rows)


def sharding_table(result: dict) -> str:
  rows = [[r['model'], r['layout'], ' x '.join(f'{k} {v}' for k, v in r['mesh'].items()),
           f"{r['split_leaves']}/{r['leaves']}", _mb(r['state_bytes_replicated']),
           _mb(r['state_bytes_per_device']),
           f"{r['state_bytes_replicated'] / r['state_bytes_per_device']:.2f}",
           _mb(r['step_bytes_per_device']), f"{r['compile_s']:.1f}", f"{r['step_s'] * 1e3:.0f}"]
          for r in result['rows']]
  m = result['machine']
  return '\n'.join([
      f"Full fine-tuning with AdamW, batch {result['batch']}, {result['image_size']} px, "
      f"{result['devices']} devices ({m['backend']}; on CPU simulated, so the step times share "
      f"{m['cpu_count']} cores and say little). FSDP rows split leaves of at least 4 MiB "
      "(sharding.min_size_mb's default) unless the layout names another size. State MiB "
      "are read off the placed arrays; step MiB are XLA's buffers for one device's program "
      '(arguments + outputs + temporaries - donated).', '',
      _table(['model', 'layout', 'mesh', 'split leaves', 'state MiB (one copy)',
              'state MiB per device', 'saving', 'step MiB per device', 'compile s', 'step ms'],
             rows)])


def strategies_table(result: dict) -> str:
  """One row per strategy (and per phase of gradual unfreezing), with full fine-tuning's step
  time and optimizer bytes as the reference."""
  full = next(r for r in result['rows'] if r['strategy'] == 'full')
  rows = []
  for r in result['rows']:
    name = r['strategy'] + (f" phase {r['phase']}" if r['strategy'] == 'gradual' else '')
    rows.append([name, f"{r['trainable_params']:,}", f"{r['compile_s']:.1f}",
                 f"{r['step_s'] * 1e3:.0f}", f"{r['step_s'] / full['step_s']:.2f}",
                 '-' if r['flops'] is None else f"{r['flops'] / 1e9:.2f}",
                 f"{r['optimizer_state_bytes'] / 2**20:.2f}",
                 f"{r['optimizer_state_bytes'] / full['optimizer_state_bytes']:.3f}"])
  return _table(['strategy', 'trainable params', 'compile s', 'step ms', 'step / full',
                 'GFLOPs/step', 'optimizer MiB', 'optimizer / full'], rows)


def render(backend: str) -> str:
  parts = []
  finetune = _load('finetune', backend)
  if finetune:
    parts += ['### Step cost by freeze depth', '', finetune_tables(finetune)]
  profile = _load('profile', backend)
  if profile:
    parts += ['', '### Where the full fine-tuning step goes (forward + backward per layer kind)',
              '', profile_table(profile)]
  epoch = _load('epoch', backend)
  if epoch:
    full, probe = epoch['full'], epoch['cached_probe']
    cache = probe['feature_cache']
    parts += ['', f"### Epoch time on ELPV ({full['train_examples']} images, "
              f"{epoch['model']}, {epoch['image_size']} px, batch {epoch['batch']})", '',
              _table(['run', 'median step ms', 'epoch s', 'one-off cache s', 'cache MiB'], [
                  ['full fine-tuning', f"{full['median_step_time_s'] * 1e3:.1f}",
                   f"{full['epoch_s']:.1f}", '-', '-'],
                  ['linear probe, cached features', f"{probe['median_step_time_s'] * 1e3:.2f}",
                   f"{probe['epoch_s']:.2f}", f"{cache['seconds']:.1f}",
                   f"{cache['bytes'] / 2**20:.1f}"]]), '',
              f"Per epoch the cached probe is {epoch['speedup_per_epoch']:.0f}x faster; its "
              f"first epoch, cache included, {epoch['speedup_first_epoch_with_cache']:.1f}x."]
  text = _load('text', backend)
  if text:
    parts += ['', f"### Text: {text['model']} fine-tuning, {text['max_length']} tokens, batch "
              f"{text['batch']}, against PyTorch {text['torch']} + transformers "
              f"{text['transformers']}", '',
              f"On {text['machine']['cpu']} ({text['machine']['cpu_count']} cores, "
              f"{text['machine']['device']}), median of {text['steps']} steps after "
              f"{text['warmup']} warm-up steps; compile time apart.", '',
              _table(['run', 'compile s', 'tljax step ms', 'tljax examples/s',
                      'PyTorch step ms', 'PyTorch examples/s', 'tljax/PyTorch time'],
                     [[r['preset'], f"{r['compile_s']:.1f}", f"{r['step_s'] * 1e3:.0f}",
                       f"{r['examples_per_s']:.1f}", f"{r['torch_step_s'] * 1e3:.0f}",
                       f"{r['torch_examples_per_s']:.1f}", f"{r['ratio_vs_torch']:.2f}"]
                      for r in text['rows']])]
  strategies = _load('strategies', backend)
  if strategies:
    parts += ['', f"### Fine-tuning strategies: {strategies['model']}, {strategies['image_size']} "
              f"px, batch {strategies['batch']}, SGD with momentum", '',
              f"On {strategies['machine']['cpu']} ({strategies['machine']['cpu_count']} cores, "
              f"{strategies['machine']['device']}), median of {strategies['steps']} steps after "
              f"{strategies['warmup']} warm-up steps, in one process; gradual unfreezing "
              'compiles one step per phase (phase 0 is the linear probe, each later phase '
              'trains one stage more).', '',
              strategies_table(strategies)]
  cache = _load('compile_cache', backend)
  if cache:
    parts += ['', '### Persistent compilation cache', '',
              f"{cache['model']} train step, {cache['image_size']} px, batch {cache['batch']}, "
              f"each in a new process: XLA compilation {cache['first_compile_s']:.1f} s with an "
              f"empty cache, {cache['second_compile_s']:.1f} s with a warm one "
              f"({100 * cache['second_over_first']:.0f}% of the first); tracing and lowering "
              f"before it, which the cache cannot skip, {cache['first_lower_s']:.1f} s and "
              f"{cache['second_lower_s']:.1f} s. Cache {cache['cache_bytes'] / 2**20:.1f} MiB."]
  layouts = _load('sharding', backend)
  if layouts:
    parts += ['', '### Memory per device: replicated, FSDP and 2-D layouts', '',
              sharding_table(layouts)]
  data = _load('input_pipeline', backend)
  if data:
    parts += ['', '### Input pipeline alone', '',
              f"ELPV train split, {data['image_size']} px, batch {data['batch']}, random crop and "
              f"flip: {data['images_per_s']:.0f} img/s decoding every epoch, "
              f"{data['images_per_s_cache_decoded']:.0f} img/s with data.cache_decoded."]
    if finetune:
      rows = [[r['model'], f"{r['images_per_s']:.1f}",
               f"{data['images_per_s'] / r['images_per_s']:.1f}",
               f"{data['images_per_s_cache_decoded'] / r['images_per_s']:.1f}"]
              for r in finetune['rows'] if r['frozen_stages'] == 0]
      parts += ['', _table(['model (full fine-tuning)', 'train img/s', 'pipeline/train',
                            'cached pipeline/train'], rows)]
  return '\n'.join(parts)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--backend', default='cpu')
  args = parser.parse_args()
  path = os.path.join(HERE, 'README.md')
  with open(path) as f:
    readme = f.read()
  begin, end = f'<!-- BEGIN {args.backend} -->', f'<!-- END {args.backend} -->'
  if begin not in readme:
    raise SystemExit(f'{path} has no {begin} marker')
  body = render(args.backend)
  readme = re.sub(f'{re.escape(begin)}.*?{re.escape(end)}',
                  lambda _: f'{begin}\n{body}\n{end}', readme, flags=re.S)
  with open(f'{path}.tmp', 'w') as f:
    f.write(readme)
  os.replace(f'{path}.tmp', path)


if __name__ == '__main__':
  main()
