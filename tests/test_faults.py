"""Faults injected into real training processes: SIGKILL at random moments and mid-checkpoint,
SIGTERM preemption, a full disk during a save, NaN from divergence.

The killed, preempted and uninterrupted runs are separate processes of the same command with one
CPU device each, so their final states must be bitwise equal.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers import REPO, array_source, small_config, snapshot, write_npz

from tljax import train
from tljax.checkpoint import TMP_SUFFIX, Checkpointer
from tljax.errors import PREEMPTED_EXIT_CODE, TRAINING_FAILED_EXIT_CODE
from tljax.numerics import NonFiniteError
from tljax.weights.read import restore_latest

TOTAL_STEPS, CHECKPOINT_EVERY, LOG_EVERY = 120, 5, 1
KILLS = 10
SEED = 20261123  # the kill schedule; timing still varies from run to run


@pytest.fixture(scope='module')
def run_args(tmp_path_factory):
  data = write_npz(tmp_path_factory.mktemp('data') / 'data.npz')
  # Augmentation on, so the data position and the per-example randomness must both resume.
  return [f'--config.data.path={data}', f'--config.total_steps={TOTAL_STEPS}',
          f'--config.checkpoint_every={CHECKPOINT_EVERY}', f'--config.log_every={LOG_EVERY}',
          '--config.data.augment=True', '--config.keep_checkpoints=2']


# Runs the rest of the command line under a file-size limit: writes past it fail with EFBIG.
FILE_SIZE_LIMIT = ('import os, resource, sys; '
                   'resource.setrlimit(resource.RLIMIT_FSIZE, (6000, 6000)); '
                   'os.execv(sys.executable, [sys.executable, *sys.argv[1:]])')


def _command(workdir, args, small_files=False):
  limit = ['-c', FILE_SIZE_LIMIT] if small_files else []
  return [sys.executable, *limit, '-m', 'tljax.train',
          f'--config={REPO}/configs/tests/arrays.py', f'--workdir={workdir}', *args]


ENV = {**os.environ, 'JAX_PLATFORMS': 'cpu'}


def _start(workdir, args, log_name):
  workdir.mkdir(exist_ok=True)
  log = open(workdir.parent / f'{workdir.name}-{log_name}.log', 'w')  # noqa: SIM115
  process = subprocess.Popen(_command(workdir, args), cwd=REPO, stdout=log,
                             stderr=subprocess.STDOUT, env=ENV)
  process.log_path = log.name
  return process


def _output(process) -> str:
  with open(process.log_path) as f:
    return f.read()


def _complete_steps(workdir) -> list[int]:
  directory = workdir / 'checkpoints'
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if directory.is_dir() else []


def _partial_checkpoints(workdir) -> list[str]:
  directory = workdir / 'checkpoints'
  return [n for n in os.listdir(directory) if TMP_SUFFIX in n] if directory.is_dir() else []


def _final_state(workdir) -> dict[str, np.ndarray]:
  """Every array of the latest checkpoint: step, params, batch_stats and optimizer state."""
  flat, _ = jax.tree_util.tree_flatten_with_path(restore_latest(str(workdir)))
  return {jax.tree_util.keystr(path): np.asarray(value) for path, value in flat}


def _assert_bitwise_equal(expected, actual):
  assert expected.keys() == actual.keys()
  for key in expected:
    assert expected[key].dtype == actual[key].dtype, key
    assert np.array_equal(expected[key], actual[key]), key


def _last_logged_step(workdir) -> int:
  metrics = workdir / 'metrics.jsonl'
  lines = metrics.read_text().splitlines() if metrics.exists() else []
  complete = [line for line in lines[-3:] if line.endswith('}')]
  return json.loads(complete[-1])['step'] if complete else 0


@pytest.fixture(scope='module')
def uninterrupted(run_args, tmp_path_factory):
  """The reference final state, and how long start-up takes before the first logged step."""
  workdir = tmp_path_factory.mktemp('faults') / 'uninterrupted'
  start = time.monotonic()
  process = _start(workdir, run_args, 'run')
  while process.poll() is None and not _last_logged_step(workdir):
    time.sleep(0.005)
  startup_s = time.monotonic() - start
  assert process.wait(timeout=300) == 0, _output(process)[-3000:]
  return _final_state(workdir), startup_s


def _kill_when(process, workdir, mode, rng, startup_s) -> bool:
  """SIGKILLs the process at a random moment of the kind `mode` names; False if it finished
  first. Each kind bounds the progress an attempt makes, so ten kills fit in one run."""
  start = time.time()
  delay = rng.uniform(0.0, startup_s)  # imports, compilation, restore, first files
  nth_write = rng.randint(1, 3)  # kill inside this attempt's n-th checkpoint write
  resumed_at = _complete_steps(workdir)[-1] if _complete_steps(workdir) else 0
  target_step, extra_s = resumed_at + rng.randint(1, 20), rng.uniform(0.0, 0.02)
  metrics = workdir / 'metrics.jsonl'
  writes_seen: set[str] = set()
  reached_at = None
  while process.poll() is None:
    # Training has started once this attempt rewrote metrics.jsonl (dropping the lines after
    # its checkpoint); orbax deleted any earlier half-written checkpoint before that.
    training = metrics.exists() and metrics.stat().st_mtime > start
    if mode == 'mid-checkpoint':
      writes = _partial_checkpoints(workdir) if training else []
      writes_seen.update(writes)
      fire = len(writes_seen) >= nth_write and bool(writes)
    elif mode == 'during start-up':  # at the latest as training begins
      fire = time.time() - start > delay or training
    else:  # 'while training': just after a random step of this attempt
      if reached_at is None and training and _last_logged_step(workdir) >= target_step:
        reached_at = time.time()
      fire = reached_at is not None and time.time() - reached_at > extra_s
    if fire:
      process.send_signal(signal.SIGKILL)
      process.wait()
      return True
    time.sleep(0.001)
  return False


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigkill_at_random_moments_loses_nothing(run_args, uninterrupted, tmp_path):
  """At least 10 SIGKILLs; every restart resumes from the newest complete checkpoint, never a
  half-written one; the final state equals the uninterrupted run's bit for bit."""
  reference, startup_s = uninterrupted
  rng = random.Random(SEED)
  workdir = tmp_path / 'killed'
  modes = ('mid-checkpoint', 'during start-up', 'while training')
  kills, partial_seen, resumes, attempt = [], 0, [], 0
  while len(kills) < KILLS:
    attempt += 1
    assert attempt <= 2 * KILLS, f'only {len(kills)} kills landed in {attempt - 1} attempts'
    complete_before, partial_before = _complete_steps(workdir), _partial_checkpoints(workdir)
    partial_seen += bool(partial_before)
    mode = modes[len(kills) % len(modes)]
    process = _start(workdir, run_args, f'attempt{attempt}')
    killed = _kill_when(process, workdir, mode, rng, startup_s)
    output = _output(process)
    if 'resumed from checkpoint at step' in output:
      resumed = int(output.split('resumed from checkpoint at step ')[1].split()[0])
      assert resumed == complete_before[-1], (resumed, complete_before, partial_before)
      resumes.append(resumed)
    if not killed:
      assert process.returncode == 0, output[-3000:]
      break
    kills.append((mode, complete_before[-1] if complete_before else 0))
  assert len(kills) >= KILLS, kills
  assert partial_seen, 'no kill landed inside a checkpoint write'

  final = _start(workdir, run_args, 'final')
  assert final.wait(timeout=300) == 0, _output(final)[-3000:]
  _assert_bitwise_equal(reference, _final_state(workdir))
  lines = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [m['step'] for m in lines if m['split'] == 'train'] == list(
      range(LOG_EVERY, TOTAL_STEPS + 1, LOG_EVERY))
  assert json.loads((workdir / 'results.json').read_text())['final_step'] == TOTAL_STEPS
  # TensorBoard too: one point per logged step over every events file the attempts left.
  assert _tensorboard_steps(workdir, 'train/loss') == list(
      range(LOG_EVERY, TOTAL_STEPS + 1, LOG_EVERY))
  print(f'\nfault injection: {len(kills)} SIGKILLs ({sum(m == "mid-checkpoint" for m, _ in kills)}'
        f' mid-checkpoint), {attempt} attempts, {partial_seen} restarts found a half-written '
        f'checkpoint, resumed at {resumes}; final state bitwise equal')


def _tensorboard_steps(workdir, tag):
  """The steps of every `tag` point in the workdir's events files, sorted, duplicates kept."""
  import tensorflow as tf
  steps = []
  for path in workdir.glob('events.out.tfevents.*'):
    for record in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
      event = tf.compat.v1.Event.FromString(record)
      steps += [event.step for value in event.summary.value if value.tag == tag]
  return sorted(steps)


def _wait_for_a_checkpoint(process, workdir):
  """Until the first checkpoint is complete: the process is in its training loop."""
  while not _complete_steps(workdir):
    assert process.poll() is None, _output(process)[-3000:]
    time.sleep(0.005)


def _assert_resumes_bit_exact(workdir, run_args, reference, step):
  """The same command again resumes from `step` and ends in the uninterrupted run's state."""
  resumed = _start(workdir, run_args, 'resumed')
  assert resumed.wait(timeout=300) == 0, _output(resumed)[-3000:]
  assert f'resumed from checkpoint at step {step}' in _output(resumed)
  _assert_bitwise_equal(reference, _final_state(workdir))


@pytest.mark.multiprocess
@pytest.mark.parametrize('signals,resume', [
    (('SIGTERM',), True), (('SIGINT',), False), (('SIGTERM', 'SIGTERM'), False),
    (('SIGTERM', 'SIGINT'), False), (('SIGHUP',), False), (('SIGUSR1',), False)],
    ids=['SIGTERM', 'Ctrl-C', 'SIGTERM twice 300 ms apart', 'SIGTERM then one Ctrl-C',
         'SIGHUP (terminal closed)', 'SIGUSR1 (SLURM --signal)'])
def test_a_stop_request_saves_exits_75_and_the_same_command_resumes(run_args, uninterrupted,
                                                                    tmp_path, signals, resume):
  workdir = tmp_path / 'preempted'
  process = _start(workdir, run_args, 'preempted')
  _wait_for_a_checkpoint(process, workdir)
  for index, name in enumerate(signals):
    if index:
      time.sleep(0.3)
    process.send_signal(getattr(signal, name))
  assert process.wait(timeout=120) == PREEMPTED_EXIT_CODE, _output(process)[-3000:]
  output = _output(process)
  assert 'Traceback' not in output
  step = int(output.split('preempted: checkpoint of step ')[1].split()[0])
  assert 0 < step < TOTAL_STEPS
  assert _complete_steps(workdir)[-1] == step and not _partial_checkpoints(workdir)
  if not resume:  # a checkpoint and exit 75: the resume is the SIGTERM case's
    return
  _assert_resumes_bit_exact(workdir, run_args, uninterrupted[0], step)


@pytest.mark.multiprocess
def test_a_second_ctrl_c_aborts_at_once_and_a_rerun_resumes_bit_exact(run_args, uninterrupted,
                                                                      tmp_path):
  workdir = tmp_path / 'aborted'
  process = _start(workdir, run_args, 'aborted')
  _wait_for_a_checkpoint(process, workdir)
  process.send_signal(signal.SIGINT)
  time.sleep(0.01)
  process.send_signal(signal.SIGINT)
  assert process.wait(timeout=120) == 130, _output(process)[-3000:]
  output = _output(process)
  errors = [line for line in output.splitlines() if line.startswith('error:')]
  assert errors == ['error: SIGINT again: stopped at once without saving; the checkpoints '
                    'already complete are kept'], output[-3000:]
  assert 'Traceback' not in output
  _assert_resumes_bit_exact(workdir, run_args, uninterrupted[0], _complete_steps(workdir)[-1])


@pytest.mark.parametrize('delay_s', [0.5, 2.5])
def test_a_stop_request_during_start_up_exits_75_having_written_nothing(run_args, tmp_path,
                                                                        delay_s):
  """During imports (0.5 s) and while data and model are built (2.5 s)."""
  workdir = tmp_path / 'early'
  process = _start(workdir, run_args, 'early')
  time.sleep(delay_s)
  process.send_signal(signal.SIGTERM)
  assert process.wait(timeout=120) == PREEMPTED_EXIT_CODE, _output(process)[-3000:]
  output = _output(process)
  assert ('stopped by SIGTERM before anything was written; nothing needed saving' in output
          or 'preempted: checkpoint of step ' in output), output[-3000:]
  assert 'Traceback' not in output
  if 'nothing needed saving' in output:
    assert snapshot(workdir) == {}


@pytest.mark.slow
def test_full_disk_during_a_save_keeps_the_checkpoints(tmp_path, npz_path):
  """RLIMIT_FSIZE makes the kernel refuse the checkpoint's writes (EFBIG, as ENOSPC would)."""
  workdir = tmp_path / 'run'
  config = small_config(**{'data.path': npz_path, 'data.resize_size': 18})  # arrays.py's
  train.run(config, str(workdir))  # checkpoints 3 and 6
  before = snapshot(workdir / 'checkpoints')
  # Output goes to pipes: a log file would hit the limit too.
  process = subprocess.run(
      _command(workdir, [f'--config.data.path={npz_path}', '--config.total_steps=12',
                         '--config.optim.schedule.steps=6'],
               small_files=True), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
  output = process.stdout + process.stderr
  assert process.returncode == TRAINING_FAILED_EXIT_CODE, output[-3000:]
  errors = [line for line in output.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and 'Traceback' not in output, output[-3000:]
  assert 'could not write the checkpoint of step 9' in errors[0]
  assert 'File too large' in errors[0] and 'Complete checkpoints kept: 3, 6' in errors[0]
  assert snapshot(workdir / 'checkpoints') == before  # no partial step 9 left either


def test_a_half_written_checkpoint_is_gone_before_the_next_start_goes_on(tmp_path):
  tree = {'w': np.arange(6, dtype=np.float32)}
  ckpt = Checkpointer(str(tmp_path))
  ckpt.save(3, tree)
  ckpt.close()
  directory = tmp_path / 'checkpoints'
  partial = directory / f'6{TMP_SUFFIX}-1763900000'  # a save of step 6 killed mid-write
  partial.mkdir()
  (partial / 'shard').write_bytes(b'half')
  ckpt = Checkpointer(str(tmp_path))  # synchronously: nothing runs beside a background delete
  assert sorted(os.listdir(directory)) == ['3']
  assert ckpt.latest_step() == 3
  np.testing.assert_array_equal(ckpt.restore(3, tree)['w'], tree['w'])
  ckpt.close()


def test_divergence_stops_at_the_first_nonfinite_step_and_saves_none(tmp_path):
  config = small_config(**{'optim.lr': 1e3, 'optim.schedule.name': 'constant'})
  config.total_steps, config.checkpoint_every = 12, 3
  with pytest.raises(NonFiniteError) as error:
    train.run(config, str(tmp_path / 'diverged'), source=array_source())
  message = str(error.value)
  step = int(message.split('non-finite values at step ')[1].split(':')[0])
  leaf = message.split('first non-finite gradient: ')[1].split()[0]
  assert 'the loss is not finite' in message
  assert not leaf.startswith('stem/')  # frozen: it has no gradient
  saved = _complete_steps(tmp_path / 'diverged')
  assert saved and saved[-1] < step
  for value in jax.tree.leaves(restore_latest(str(tmp_path / 'diverged'))):
    assert np.isfinite(np.asarray(value)).all()
  # The named step really is the first: the same run stopped one step earlier is finite.
  config.total_steps = step - 1
  train.run(config, str(tmp_path / 'before'), source=array_source())
  for value in jax.tree.leaves(restore_latest(str(tmp_path / 'before'))):
    assert np.isfinite(np.asarray(value)).all()


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize('target', ['worker', 'launcher'])
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(tmp_path, npz_path, target):
  """jax.distributed's preemption service: every process saves the same step and exits 75,
  whether one worker gets the signal or the launcher (which forwards it to both)."""
  workdir = tmp_path / 'two'
  launcher = subprocess.Popen(
      ['bash', f'{REPO}/launch/multiprocess.sh', '2', f'{REPO}/configs/tests/arrays.py',
       str(workdir), f'--config.data.path={npz_path}', '--config.total_steps=400',
       '--config.checkpoint_every=50'], cwd=REPO, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, start_new_session=True,
      env={**os.environ, 'PYTHON': sys.executable})
  deadline = time.monotonic() + 240
  while not _complete_steps(workdir):
    assert launcher.poll() is None and time.monotonic() < deadline
    time.sleep(0.05)
  worker = subprocess.run(['pgrep', '-f', f'workdir={workdir} .*--process_id=1'],
                          capture_output=True, text=True).stdout.split()
  assert len(worker) == 1, worker
  os.kill(int(worker[0]) if target == 'worker' else launcher.pid, signal.SIGTERM)
  assert launcher.wait(timeout=120) == PREEMPTED_EXIT_CODE
  saved = set()
  for i in range(2):
    log = (workdir / f'process_{i}.log').read_text()
    saved.add(int(log.split('preempted: checkpoint of step ')[1].split()[0]))
  [step] = saved
  assert _complete_steps(workdir)[-1] == step < 400 and not _partial_checkpoints(workdir)


_COMPILE_ONCE = '''
import jax, jax.numpy as jnp
from tljax import parallel
parallel.enable_compilation_cache()
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
print(float(jax.jit(lambda x: jnp.sin(x) @ jnp.cos(x).T)(jnp.ones((64, 64))).sum()))
'''


def test_a_compilation_cache_entry_cut_short_by_a_kill_is_replaced(tmp_path):
  """JAX writes cache entries in place and never rewrites one; tljax deletes the damaged entry
  when JAX cannot read it, so the next write succeeds."""
  env = {**ENV, 'TLJAX_COMPILATION_CACHE': str(tmp_path)}

  def compile_once():
    return subprocess.run([sys.executable, '-c', _COMPILE_ONCE], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)

  first = compile_once()
  assert first.returncode == 0, first.stderr[-2000:]
  [entry] = [p for p in tmp_path.iterdir() if p.name.startswith('jit__lambda')]
  entry.write_bytes(entry.read_bytes()[:50])  # what a SIGKILL mid-write leaves
  second = compile_once()
  assert second.returncode == 0 and second.stdout == first.stdout, second.stderr[-2000:]
  assert (f'removed 1 damaged entry of the compilation cache {tmp_path}' in second.stderr)
  assert 'Error reading persistent compilation cache entry' not in second.stderr
  third = compile_once()  # the entry was written again, whole
  assert 'damaged' not in third.stderr and len(entry.read_bytes()) > 50
