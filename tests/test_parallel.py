"""jit-over-a-mesh vs pmap, one process vs two joined by jax.distributed."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
from conftest import (
  REPO,
  make_arrays,  # noqa: I001
  small_config,
)

from tljax import train
from tljax.data.sources import ArraySource
from tljax.weights.read import read_tljax_workdir


def _source():
  return ArraySource({'train': make_arrays(per_class=16, seed=0),
                      'test': make_arrays(per_class=5, seed=1)})


def test_jit_mesh_and_pmap_steps_give_the_same_parameters(tmp_path):
  assert jax.device_count() == 8
  finals = {}
  for kind in ('jit', 'pmap'):
    config = small_config(parallel=kind)
    config.optim.groups = [('.*', {})]  # BatchNorm trains: statistics synced over devices too
    config.total_steps = 5
    results = train.run(config, str(tmp_path / kind), source=_source())
    assert results['parallel'] == kind and results['devices'] == 8
    finals[kind] = read_tljax_workdir(str(tmp_path / kind))
  assert finals['jit'].keys() == finals['pmap'].keys()
  changed = 0
  for path, value in finals['jit'].items():
    np.testing.assert_allclose(value, finals['pmap'][path], rtol=1e-5, atol=1e-5, err_msg=path)
    changed += path.startswith('batch_stats/')
  assert changed


def _train_cli(workdir, config_args, extra=(), env=None):
  command = [sys.executable, '-m', 'tljax.train', f'--config={REPO}/configs/tests/arrays.py',
             f'--workdir={workdir}', *config_args, *extra]
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu', **(env or {})})


def test_two_processes_match_one_process_with_eight_devices(tmp_path, npz_path):
  args = [f'--config.data.path={npz_path}', '--config.total_steps=6']
  single = _train_cli(tmp_path / 'one', args, ['--cpu_devices=8'])
  assert single.returncode == 0, single.stderr[-3000:]
  multi = subprocess.run(
      ['bash', f'{REPO}/launch/multiprocess.sh', '2', '4', f'{REPO}/configs/tests/arrays.py',
       str(tmp_path / 'two'), *args], cwd=REPO, capture_output=True, text=True, timeout=300)
  logs = ''.join((tmp_path / 'two' / f'process_{i}.log').read_text()[-2000:] for i in range(2))
  assert multi.returncode == 0, logs
  one, two = read_tljax_workdir(str(tmp_path / 'one')), read_tljax_workdir(str(tmp_path / 'two'))
  assert one.keys() == two.keys()
  for path in one:
    np.testing.assert_allclose(one[path], two[path], rtol=1e-5, atol=1e-6, err_msg=path)
  assert json.loads((tmp_path / 'two' / 'results.json').read_text())['processes'] == 2
