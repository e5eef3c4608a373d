"""Files from outside are data: payloads that would run code if unpickled are refused before any
of it runs, and no command-line string is evaluated. (Config files are Python, trusted as code.)"""

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO, array_source, small_config
from hostile_files import RunsShell, write_malicious

from tljax import train
from tljax.data.sources import ArraySource, DataError
from tljax.weights import read
from tljax.weights.errors import WeightsError


def _object_npz(path, marker, prefix=''):
  payload = np.array([RunsShell(f'touch {marker}')], dtype=object)
  np.savez(path, **{f'{prefix}images': payload, f'{prefix}labels': np.zeros(1, np.int32)})
  assert b'system' in path.read_bytes()  # the payload is really in the file


def test_npz_weights_holding_object_arrays_are_refused(tmp_path):
  path, marker = tmp_path / 'weights.npz', tmp_path / 'pwned'
  _object_npz(path, marker)
  with pytest.raises(WeightsError, match=f'{path}: cannot be read as plain arrays: .*object '
                                         'arrays would need pickle'):
    read.read_file(str(path))
  assert not marker.exists()


def test_npz_dataset_holding_object_arrays_is_refused(tmp_path):
  path, marker = tmp_path / 'data.npz', tmp_path / 'pwned'
  _object_npz(path, marker, prefix='train_')
  with pytest.raises(DataError, match=f"npz file '{path}' \\(data.path\\) cannot be read as "
                                      'plain arrays: .*object arrays would need pickle'):
    ArraySource.from_npz(str(path))
  assert not marker.exists()


@pytest.mark.parametrize('zip_format', [True, False])
def test_pickle_payload_as_pretrained_weights_stops_the_run_before_it_runs(tmp_path, zip_format):
  path, marker = tmp_path / 'evil.pth', tmp_path / 'pwned'
  write_malicious(path, marker, zip_format)
  refusal = r'refusing to load global (os|posix)\.system'
  with pytest.raises(WeightsError, match=refusal):  # the reader alone
    read.read_file(str(path))
  assert not marker.exists()
  config = small_config(**{'init.pretrained': str(path)})
  with pytest.raises(WeightsError, match=refusal):  # and as a run's pretrained weights
    train.run(config, str(tmp_path / 'run'), source=array_source())
  assert not marker.exists()
  assert not (tmp_path / 'run').exists()  # refused before the workdir was touched


@pytest.mark.parametrize('key,template', [('optim.lr', '{}'), ('data.mean', '({},)')])
def test_command_line_overrides_are_never_evaluated(tmp_path, npz_path, key, template):
  marker = tmp_path / 'pwned'
  code = template.format(f"__import__('os').system('touch {marker}')")
  result = subprocess.run(
      [sys.executable, '-m', 'tljax.train', f'--config={REPO}/configs/tests/arrays.py',
       f'--workdir={tmp_path / "run"}', f'--config.data.path={npz_path}',
       f'--config.{key}={code}'],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 2, result.stderr[-2000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and key in errors[0]
  assert not marker.exists() and not (tmp_path / 'run').exists()


def test_no_code_path_unpickles_or_evaluates_outside_data():
  """The whole package: no allow_pickle=True, no pickle.load outside the restricted
  unpickler, no eval/exec of strings, no torch.load."""
  forbidden = re.compile(r'allow_pickle\s*=\s*True|\beval\(|\bexec\(|torch\.load\(|'
                         r'pickle\.loads?\(|\bmarshal\.|\bshelve\.|yaml\.load\(')
  hits = []
  for path in pathlib.Path(REPO, 'tljax').rglob('*.py'):
    for number, line in enumerate(path.read_text().splitlines(), 1):
      if forbidden.search(line):
        hits.append(f'{path.relative_to(REPO)}:{number}: {line.strip()}')
  assert hits == []
  unpickler = pathlib.Path(REPO, 'tljax/weights/torch_file.py').read_text()
  assert 'def find_class' in unpickler and '_ALLOWED' in unpickler
