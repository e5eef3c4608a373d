"""The README's runnable blocks (each fenced block after a `<!-- runnable -->` line), run in
order as one script on a generated image folder: only the two paths of the first line are
replaced. So the quick start, the config file it writes and the Python API examples cannot go
stale."""

import csv
import json
import os
import re
import subprocess
import sys

import pytest
from helpers import REPO, image_folder

from tljax.weights import read

pytestmark = pytest.mark.slow

MARKED = re.compile(r'<!-- runnable -->\n```(bash|python)\n(.*?)```\n', re.DOTALL)


def runnable_blocks(text: str) -> list[tuple[str, str]]:
  """(language, code) of every block marked runnable, in order."""
  return MARKED.findall(text)


def as_script(blocks: list[tuple[str, str]], photos: str, runs: str) -> str:
  """One bash script: bash blocks as they are, Python blocks fed to the test's interpreter."""
  (language, first), *rest = blocks
  line, body = first.split('\n', 1)
  assert language == 'bash' and line.startswith('export PHOTOS=') and ' RUNS=' in line
  parts = ['set -euo pipefail', f'export PHOTOS={photos} RUNS={runs}', body]
  for language, code in rest:
    if language == 'bash':
      parts.append(code)
    else:
      assert 'PYTHON_BLOCK' not in code
      parts.append(f"python - <<'PYTHON_BLOCK'\n{code}PYTHON_BLOCK")
  return '\n'.join(parts)


def test_marked_blocks_are_found():
  blocks = runnable_blocks('<!-- runnable -->\n```bash\necho 1\n```\ntext\n```bash\nnot\n```\n'
                           '<!-- runnable -->\n```python\nprint(2)\n```\n')
  assert blocks == [('bash', 'echo 1\n'), ('python', 'print(2)\n')]
  script = as_script([('bash', 'export PHOTOS=~/p RUNS=r\nls\n'), ('python', 'print(2)\n')],
                     '/p', '/r')
  assert script.splitlines()[1:] == ['export PHOTOS=/p RUNS=/r', 'ls', '',
                                     "python - <<'PYTHON_BLOCK'", 'print(2)', 'PYTHON_BLOCK']


def _photos(root):
  """Three classes told apart by colour: train (8 each), val (3) and test (3)."""
  colours = {'healthy': (40, 160, 40), 'rust': (170, 90, 30), 'blight': (90, 60, 50)}
  return image_folder(root, colours, dict(train=8, val=3, test=3), size=48, suffix='jpg',
                      spread=30)


def test_the_readme_runs_as_written(tmp_path):
  with open(os.path.join(REPO, 'README.md')) as f:
    blocks = runnable_blocks(f.read())
  assert [language for language, _ in blocks] == ['bash', 'bash', 'python'], blocks
  photos, runs = _photos(tmp_path / 'photos'), tmp_path / 'runs'
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
         'PATH': f'{os.path.dirname(sys.executable)}{os.pathsep}{os.environ["PATH"]}'}
  result = subprocess.run(['bash', '-c', as_script(blocks, photos, runs)], cwd=REPO,
                          capture_output=True, text=True, timeout=1500, env=env)
  assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
  # The quick start.
  with open(runs / 'full' / 'results.json') as f:
    results = json.load(f)
  assert results['validation']['split'] == 'val' and results['best'] is not None
  assert results['eval']['examples'] == 9 and results['train_examples'] == 24
  assert 'train.log' in result.stdout and 'results.json' in result.stdout  # the `ls`
  table = (runs / 'sweep' / 'results.md').read_text()
  assert 'val accuracy %' in table and 'test balanced accuracy %' in table
  assert all(name in table for name in ('linear_probe', 'stages7', 'full'))
  with open(runs / 'predictions.csv') as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 9 and {r['class_1'] for r in rows} <= {'blight', 'healthy', 'rust'}
  exported = read.read_safetensors(str(runs / 'photos.safetensors'))
  assert exported['params/head/kernel'].shape == (1280, 3)
  torch_layout = read.read_safetensors(str(runs / 'photos_torch.safetensors'))
  assert torch_layout['classifier/1/weight'].shape == (3, 1280)
  # The config file written by hand: what it says is what ran.
  with open(runs / 'mine' / 'config.json') as f:
    mine = json.load(f)
  assert mine['model']['name'] == 'efficientnet_lite0' and mine['optim']['name'] == 'adam'
  assert mine['optim']['label_smoothing'] == 0.1 and mine['freeze']['preset'] == 'linear_probe'
  with open(runs / 'mine' / 'results.json') as f:
    assert json.load(f)['trainable_params'] == 1280 * 3 + 3
  # The Python API block.
  with open(runs / 'api' / 'results.json') as f:
    api = json.load(f)
  assert api['final_step'] == 30 and api['trainable_params'] == 1280 * 3 + 3
  assert f'test accuracy {api["eval"]["accuracy"]}' in result.stdout
  assert "['blight', 'healthy', 'rust']" in result.stdout  # record['class_names']
  printed = [line for line in result.stdout.splitlines()
             if line.startswith(str(photos)) and " [('" in line]
  assert len(printed) == 9  # the API's loop (tljax.predict's CLI prints another layout)
