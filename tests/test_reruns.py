"""A rerun never destroys what is on disk: a finished run is left as it is, a shorter total is
refused, a damaged checkpoint is set aside (never deleted) and the run resumes from the newest
one that restores, another model's checkpoint is refused, and one run at a time holds a workdir.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers import REPO, as_nobody, small_config, snapshot, walkable_copy

from tljax import checkpoint, train
from tljax import workdir as workdir_lib
from tljax.errors import PREEMPTED_EXIT_CODE, UserError
from tljax.weights.read import restore_latest


def _on_to_nine(data, **overrides):
  """The finished 6-step run's config taken on to 9 steps, its schedule kept as it was."""
  return small_config(**{'data.path': data, 'total_steps': 9, 'optim.schedule.steps': 6,
                         **overrides})


@pytest.fixture(scope='module')
def taken_on(earlier_run, tmp_path_factory):
  """The final states of taking the finished run on to 9 steps from each of its checkpoints
  (the one of step 6 removed for the second): step -> state."""
  run_dir, data = earlier_run
  root = tmp_path_factory.mktemp('taken_on')
  nine = _on_to_nine(data)
  shutil.copytree(run_dir, root / 'from6')
  train.run(nine, str(root / 'from6'))
  shutil.copytree(run_dir, root / 'from3', ignore=shutil.ignore_patterns('6'))
  train.run(nine, str(root / 'from3'))
  return {6: _state(root / 'from6'), 3: _state(root / 'from3')}


def _state(workdir) -> dict[str, np.ndarray]:
  flat, _ = jax.tree_util.tree_flatten_with_path(restore_latest(str(workdir)))
  return {jax.tree_util.keystr(path): np.asarray(value) for path, value in flat}


def _copy(run_dir, tmp_path, name='run'):
  target = tmp_path / name
  shutil.copytree(run_dir, target)
  return target


def test_rerunning_a_finished_run_leaves_every_byte(earlier_run, tmp_path, capsys):
  run_dir = _copy(earlier_run[0], tmp_path)
  before = snapshot(run_dir)
  results = train.run(small_config(**{'data.path': earlier_run[1]}), str(run_dir))
  assert snapshot(run_dir) == before
  assert results == json.loads((run_dir / 'results.json').read_text())
  assert results['wall_time_s'] > 1.0 and results['median_step_time_s'] is not None
  assert f'{run_dir} already finished: its results.json holds step 6' in capsys.readouterr().out


@pytest.mark.parametrize('total', [4, 1])
def test_a_total_below_the_saved_step_is_refused_naming_both(earlier_run, tmp_path, total):
  run_dir = _copy(earlier_run[0], tmp_path)
  before = snapshot(run_dir)
  with pytest.raises(workdir_lib.WorkdirError,
                     match=f'holds a checkpoint of step 6, past total_steps={total}'):
    train.run(small_config(**{'data.path': earlier_run[1], 'total_steps': total}), str(run_dir))
  assert snapshot(run_dir) == before


def test_training_on_past_a_finish_keeps_the_earlier_results(earlier_run, tmp_path):
  run_dir = _copy(earlier_run[0], tmp_path)
  earlier = (run_dir / 'results.json').read_bytes()
  results = train.run(_on_to_nine(earlier_run[1]), str(run_dir))
  assert (run_dir / 'results-step6.json').read_bytes() == earlier
  assert results['final_step'] == 9 and results['resumed_from_step'] == 6
  assert json.loads((run_dir / 'results.json').read_text())['final_step'] == 9


def _truncate_array_files(step_dir) -> None:
  """Cuts every data file of an orbax (OCDBT) checkpoint to half its length: where a leaf's
  bytes live depends on the layout, so all of them."""
  for root, _, names in os.walk(step_dir):
    if os.path.basename(root) == 'd':
      for name in names:
        path = os.path.join(root, name)
        os.truncate(path, os.path.getsize(path) // 2)


@pytest.mark.slow  # with taken_on's two runs
def test_a_damaged_latest_checkpoint_is_set_aside_and_training_resumes_from_the_one_before(
    earlier_run, taken_on, tmp_path, capsys):
  run_dir = _copy(earlier_run[0], tmp_path)
  _truncate_array_files(run_dir / 'checkpoints' / '6')
  damaged = snapshot(run_dir / 'checkpoints' / '6')
  results = train.run(_on_to_nine(earlier_run[1]), str(run_dir))
  printed = capsys.readouterr().out
  [line] = [line for line in printed.splitlines() if line.startswith('damaged')]
  assert line.startswith('damaged checkpoints set aside, not deleted: step 6 (')
  assert line.endswith(f'-> {run_dir / "checkpoints-damaged" / "6"}; resuming from step 3')
  assert snapshot(run_dir / 'checkpoints-damaged' / '6') == damaged  # every byte kept
  assert results['resumed_from_step'] == 3
  final = _state(run_dir)
  for key, value in taken_on[3].items():  # as if the damaged one had never been written
    assert np.array_equal(final[key], value), key


@pytest.mark.slow  # with taken_on's two runs
def test_an_empty_step_directory_is_set_aside(earlier_run, taken_on, tmp_path, capsys):
  run_dir = _copy(earlier_run[0], tmp_path)
  (run_dir / 'checkpoints' / '9').mkdir()
  results = train.run(_on_to_nine(earlier_run[1]), str(run_dir))
  assert 'step 9 (incomplete: no _CHECKPOINT_METADATA)' in capsys.readouterr().out
  assert (run_dir / 'checkpoints-damaged' / '9').is_dir()
  assert results['resumed_from_step'] == 6
  final = _state(run_dir)
  for key, value in taken_on[6].items():
    assert np.array_equal(final[key], value), key


def test_a_checkpoint_of_another_model_is_refused_not_set_aside(earlier_run, tmp_path):
  """Without config.json to compare, the checkpoint's own shapes show the width differs."""
  run_dir = _copy(earlier_run[0], tmp_path)
  (run_dir / 'config.json').unlink()
  before = snapshot(run_dir)
  config = _on_to_nine(earlier_run[1], **{'model.width': 8})
  with pytest.raises(checkpoint.CheckpointMismatch) as raised:
    train.run(config, str(run_dir))
  message = str(raised.value)
  assert f'checkpoint {run_dir / "checkpoints" / "6"} holds the state of another model' in message
  assert 'params/head/kernel is (16, 3) float32 there, (32, 3) float32 here' in message
  assert snapshot(run_dir) == before


def test_a_run_in_a_workdir_another_run_holds_is_refused_naming_it(earlier_run, tmp_path):
  run_dir = _copy(earlier_run[0], tmp_path)
  with workdir_lib.lock(str(run_dir)):
    before = snapshot(run_dir)
    with pytest.raises(UserError, match=f'workdir {run_dir} is in use by pid {os.getpid()} '):
      train.run(_on_to_nine(earlier_run[1]), str(run_dir))
    assert snapshot(run_dir) == before
  assert not (run_dir / workdir_lib.LOCK_FILE).exists()  # gone with its holder


@pytest.mark.multiprocess
def test_two_processes_started_together_one_runs_the_other_is_refused(tmp_path, npz_path):
  workdir = tmp_path / 'run'
  command = [sys.executable, '-m', 'tljax.train', f'--config={REPO}/configs/tests/arrays.py',
             f'--workdir={workdir}', f'--config.data.path={npz_path}',
             '--config.total_steps=100000', '--config.log_every=1']
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  logs = [open(tmp_path / f'process{i}.log', 'w+') for i in range(2)]  # noqa: SIM115
  processes = [subprocess.Popen(command, cwd=REPO, env=env, stdout=log,  # a full pipe would
                                stderr=subprocess.STDOUT) for log in logs]  # block the run
  try:
    deadline = time.monotonic() + 300
    while all(p.poll() is None for p in processes):  # the refused one exits, the other runs
      assert time.monotonic() < deadline
      time.sleep(0.05)
    [refused] = [p for p in processes if p.poll() is not None]
    [holder] = [p for p in processes if p is not refused]
    stderr = (tmp_path / f'process{processes.index(refused)}.log').read_text()
    assert refused.returncode == 2, stderr[-2000:]
    [error] = [line for line in stderr.splitlines() if line.startswith('error:')]
    assert error.startswith(f'error: workdir {workdir} is in use by pid {holder.pid} on ')
    while holder.poll() is None and not (workdir / 'checkpoints').is_dir():
      time.sleep(0.05)
  finally:
    for process in processes:
      if process.poll() is None:
        process.send_signal(signal.SIGTERM)
  assert holder.wait(timeout=120) in (0, PREEMPTED_EXIT_CODE)
  logged = [json.loads(line)['step'] for line in (workdir / 'metrics.jsonl').open()]
  assert logged == sorted(set(logged))  # one trajectory, every step once


def test_a_checkpoint_directory_removed_during_a_failed_save_is_reported_truthfully(
    tmp_path, monkeypatch):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(3, {'w': np.arange(4.0)})
  ckpt.wait()

  def save_into_nowhere(*args, **kwargs):
    shutil.rmtree(ckpt.directory)
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(ckpt.manager, 'save', save_into_nowhere)
  with pytest.raises(checkpoint.CheckpointWriteError,
                     match=f'the directory {ckpt.directory} no longer exists .* so no '
                           'checkpoint is kept'):
    ckpt.save(6, {'w': np.arange(4.0)})


def test_an_unreadable_checkpoint_is_refused_not_set_aside(earlier_run):
  with walkable_copy(earlier_run[0]) as run_dir:
    step_dir = pathlib.Path(run_dir) / 'checkpoints' / '6'
    os.chmod(step_dir / 'default', 0o000)
    with as_nobody(), pytest.raises(UserError, match=f'{step_dir / "default"} is not readable '
                                                     'by this user'):
      checkpoint.restore_newest(run_dir, None)
