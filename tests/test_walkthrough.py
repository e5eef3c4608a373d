"""The README's walk-through of the whole loop, run line for line on a generated image folder
(only the two paths of its first line are replaced), so its commands cannot go stale."""

import csv
import json
import os
import re
import subprocess
import sys

import pytest
from helpers import REPO, image_folder

from tljax.weights import read

pytestmark = pytest.mark.slow  # trains, sweeps, predicts and exports: over a minute


def _walkthrough() -> str:
  with open(os.path.join(REPO, 'README.md')) as f:
    text = f.read()
  block = re.search(r'<!-- walkthrough -->\n```bash\n(.*?)```\n<!-- /walkthrough -->', text,
                    re.DOTALL)
  assert block, 'README.md lost its walk-through block'
  return block.group(1)


def _photos(root):
  """Three classes told apart by colour: train (8 each), val (3) and test (3)."""
  colours = {'healthy': (40, 160, 40), 'rust': (170, 90, 30), 'blight': (90, 60, 50)}
  return image_folder(root, colours, dict(train=8, val=3, test=3), size=48, suffix='jpg',
                      spread=30)


def test_the_readme_walkthrough_runs_as_written(tmp_path):
  photos, runs = _photos(tmp_path / 'photos'), tmp_path / 'runs'
  script = _walkthrough()
  first, rest = script.split('\n', 1)
  assert first.startswith('export PHOTOS=') and ' RUNS=' in first
  script = f'set -euo pipefail\nexport PHOTOS={photos} RUNS={runs}\n{rest}'
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
         'PATH': f'{os.path.dirname(sys.executable)}{os.pathsep}{os.environ["PATH"]}'}
  result = subprocess.run(['bash', '-c', script], cwd=REPO, capture_output=True, text=True,
                          timeout=1200, env=env)
  assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
  with open(runs / 'full' / 'results.json') as f:
    results = json.load(f)
  assert results['validation']['split'] == 'val' and results['best'] is not None
  assert results['eval']['examples'] == 9 and results['train_examples'] == 24
  table = (runs / 'sweep' / 'results.md').read_text()
  assert 'val accuracy %' in table and 'test balanced accuracy %' in table
  assert all(name in table for name in ('linear_probe', 'stages7', 'full'))
  with open(runs / 'predictions.csv') as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 9 and {r['class_1'] for r in rows} <= {'blight', 'healthy', 'rust'}
  assert 'healthy' in result.stdout or 'rust' in result.stdout or 'blight' in result.stdout
  exported = read.read_safetensors(str(runs / 'photos.safetensors'))
  assert exported['params/head/kernel'].shape == (1280, 3)
  torch_layout = read.read_safetensors(str(runs / 'photos_torch.safetensors'))
  assert torch_layout['classifier/1/weight'].shape == (3, 1280)
