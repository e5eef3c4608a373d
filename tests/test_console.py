"""The console: one progress bar on a terminal, plain lines otherwise, library INFO logs in the
workdir's train.log and not on the terminal, and an ETA that does not count compilation."""

import fcntl
import io
import logging
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios

import pytest
from helpers import REPO, write_npz

from tljax import console

pytestmark = pytest.mark.slow

ORBAX_INFO = re.compile(r'checkpoint_manager\.py|CheckpointManager|orbax-checkpoint version')


def _train_command(tmp_path, workdir, steps=40):
  data = write_npz(tmp_path / 'data.npz')
  return [sys.executable, '-m', 'tljax.train', '--config=configs/tests/arrays.py',
          f'--workdir={workdir}', f'--config.data.path={data}', f'--config.total_steps={steps}',
          '--config.log_every=1', '--config.checkpoint_every=10']


def _run_on_terminal(command, columns=120, stdout=None):
  """Runs `command` with stderr (and stdout, unless given) on a pseudo-terminal of `columns`;
  returns (exit status, everything it wrote there)."""
  master, slave = pty.openpty()
  fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack('HHHH', 40 if columns else 0, columns, 0, 0))
  process = subprocess.Popen(command, cwd=REPO, stdin=subprocess.DEVNULL,
                             stdout=slave if stdout is None else stdout, stderr=slave,
                             close_fds=True)
  os.close(slave)
  output = b''
  while True:
    ready, _, _ = select.select([master], [], [], 1.0)
    if ready:
      try:
        chunk = os.read(master, 65536)
      except OSError:  # the other side closed
        break
      if not chunk:
        break
      output += chunk
    elif process.poll() is not None:
      break
  os.close(master)
  return process.wait(timeout=60), output.decode(errors='replace')


def test_terminal_gets_one_bar_and_no_library_info(tmp_path):
  workdir = tmp_path / 'run'
  status, output = _run_on_terminal(_train_command(tmp_path, workdir))
  assert status == 0, output
  lines = output.replace('\r\n', '\n').split('\n')
  bar_lines = [line for line in lines if re.search(r'\d+/40 \[', line)]
  draws = [d for line in bar_lines for d in line.split('\r') if re.search(r'\d+/40 \[', d)]
  # Every update redraws the same line: many draws, at most two lines hold them (the bar,
  # and the bar redrawn under the evaluation line written above it).
  assert len(draws) >= 5, output
  assert len(bar_lines) <= 2, bar_lines
  assert any('40/40' in d for d in draws)
  assert '| 1/40 [' in output and 'first step (compilation)' in output
  # Orbax and absl INFO logs: in the workdir, not on the terminal.
  assert not ORBAX_INFO.search(output), output
  assert not re.search(r'^I\d{4} ', output, re.M), output
  assert 'oneDNN' not in output  # TensorFlow's native start-up notices
  log = (workdir / console.LOG_FILE).read_text()
  assert len(ORBAX_INFO.findall(log)) >= 4  # checkpoints at steps 10, 20, 30, 40
  assert 'oneDNN' in log
  # The run's own lines are still on the terminal.
  assert 'step 40 eval loss=' in output and 'trainable' in output


def test_without_a_terminal_lines_are_plain(tmp_path):
  workdir = tmp_path / 'run'
  result = subprocess.run(_train_command(tmp_path, workdir), cwd=REPO, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  output = result.stdout + result.stderr
  assert '\r' not in output
  progress = [line for line in output.splitlines() if re.match(r'step \d+/40  ', line)]
  assert progress[0].startswith('step 1/40  first step (compilation) ')
  assert progress[-1].startswith('step 40/40  ')
  assert len(progress) <= 4  # one line per 30 s, and the first and last
  assert not ORBAX_INFO.search(output)
  assert ORBAX_INFO.search((workdir / console.LOG_FILE).read_text())


def test_rerun_appends_to_the_log(tmp_path):
  """A resumed run adds to train.log; the first run's lines stay."""
  workdir = tmp_path / 'run'
  command = _train_command(tmp_path, workdir, steps=10)
  assert subprocess.run(command, cwd=REPO, capture_output=True, timeout=300).returncode == 0
  first = (workdir / console.LOG_FILE).read_text()
  command[-3] = '--config.total_steps=20'
  command.append('--config.optim.schedule.steps=10')  # the schedule as it was
  assert subprocess.run(command, cwd=REPO, capture_output=True, timeout=300).returncode == 0
  second = (workdir / console.LOG_FILE).read_text()
  assert second.startswith(first) and len(second) > len(first)


class _Clock:
  def __init__(self):
    self.now = 1000.0

  def __call__(self):
    return self.now


def test_eta_leaves_compilation_out(monkeypatch):
  clock = _Clock()
  monkeypatch.setattr(console.time, 'monotonic', clock)
  stream = io.StringIO()
  progress = console.Progress(total_steps=101, start_step=0, stream=stream, every_s=30)
  assert progress.eta(0) is None  # nothing measured yet: '?' rather than a guess
  clock.now += 600.0  # compiling takes ten minutes
  progress.compiled(1, 600.0)
  for step in range(2, 12):
    clock.now += 2.0  # then each step takes 2 s
    progress.update(step, {'loss': 1.0})
  assert progress.steps_per_second() == pytest.approx(0.5)
  assert progress.eta(11) == pytest.approx(90 * 2.0)
  assert progress.median_step_seconds() == pytest.approx(2.0)
  lines = stream.getvalue().splitlines()
  assert lines[0] == 'step 1/101  first step (compilation) 600.0 s'
  # Updates every 2 s, printed at most every 30 s: none of the ten so far.
  assert len(lines) == 1
  for step in range(12, 102):
    clock.now += 2.0
    progress.update(step)
  lines = stream.getvalue().splitlines()
  assert lines[-1].startswith('step 101/101  0.50 steps/s, ETA 0:00')
  assert 6 <= len(lines) <= 9  # 180 s of updates: one line per 30 s, plus first and last


def test_resumed_progress_counts_from_the_resume_step(monkeypatch):
  clock = _Clock()
  monkeypatch.setattr(console.time, 'monotonic', clock)
  progress = console.Progress(total_steps=50, start_step=40, stream=io.StringIO())
  clock.now += 30.0
  progress.compiled(41, 30.0)
  clock.now += 1.0
  progress.update(42)
  assert progress.eta(42) == pytest.approx(8.0)


def test_run_log_holds_records_until_opened(tmp_path):
  """Records before `open` (the checks, when nothing may be written) are held, then written
  first; nothing is written if the run never opens the file; levels are restored."""
  absl_logger = logging.getLogger('absl')
  level = absl_logger.level
  with console.RunLog() as run_log:
    absl_logger.info('held while the run is checked')
    assert not list(tmp_path.iterdir())
    run_log.open(str(tmp_path / 'train.log'))
    absl_logger.info('written once the workdir is open')
    logging.getLogger('some.library').debug('below INFO: not kept')
  text = (tmp_path / 'train.log').read_text()
  assert text.index('held while') < text.index('written once')
  assert 'not kept' not in text
  assert absl_logger.level == level
  logging.getLogger('absl').info('after the run: not in its file')
  assert 'after the run' not in (tmp_path / 'train.log').read_text()


def test_run_log_refuses_a_planted_link(tmp_path):
  target = tmp_path / 'elsewhere.txt'
  target.write_text('keep')
  (tmp_path / 'train.log').symlink_to(target)
  with console.RunLog() as run_log, pytest.raises(OSError):
    run_log.open(str(tmp_path / 'train.log'))
  assert target.read_text() == 'keep'


def test_run_lines_go_to_stdout_when_only_stderr_is_a_terminal(tmp_path):
  """`python -m tljax.train ... > run.txt` keeps the evaluations in run.txt; the bar stays
  on the terminal."""
  with open(tmp_path / 'run.txt', 'w') as out:
    status, terminal = _run_on_terminal(_train_command(tmp_path, tmp_path / 'run'), stdout=out)
  assert status == 0, terminal
  text = (tmp_path / 'run.txt').read_text()
  assert 'step 40 eval loss=' in text and 'step 40 eval' not in terminal
  assert '40/40 [' in terminal and '40/40 [' not in text


def test_a_terminal_without_a_width_gets_plain_lines(tmp_path):
  status, output = _run_on_terminal(_train_command(tmp_path, tmp_path / 'run'), columns=0)
  assert status == 0, output
  assert 'step 1/40  first step (compilation)' in output and 'step 40/40  ' in output


@pytest.mark.parametrize('verbosity, shown', [('-1', False), ('0', True), (None, False)])
def test_verbosity_decides_what_the_terminal_shows(tmp_path, verbosity, shown):
  command = _train_command(tmp_path, tmp_path / 'run', steps=10)
  if verbosity is not None:
    command.append(f'--verbosity={verbosity}')
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert bool(ORBAX_INFO.search(result.stderr)) == shown
  assert ORBAX_INFO.search((tmp_path / 'run' / console.LOG_FILE).read_text())


def test_a_reader_that_goes_away_does_not_stop_the_run(tmp_path):
  """`... | head -1`: the run's lines are lost, the run is not."""
  process = subprocess.Popen(_train_command(tmp_path, tmp_path / 'run', steps=10), cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  process.stdout.readline()
  process.stdout.close()  # as head does after its line
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == 0, stderr.decode()[-3000:]
  assert b'Traceback' not in stderr
  assert (tmp_path / 'run' / 'results.json').exists()


API_RUN = """
import logging, sys
sys.path.insert(0, {tests!r})
if sys.argv[1] == 'user_file':
  logging.basicConfig(filename=sys.argv[2] + '/user.log', level=logging.WARNING)
from helpers import array_source, small_config
from tljax import train
train.run(small_config(), sys.argv[2] + '/run', source=array_source())
logging.getLogger('absl').warning('a warning after the run')
"""


@pytest.mark.parametrize('setup', ['none', 'user_file'])
def test_the_python_api_keeps_library_info_off_the_terminal_and_out_of_the_users_log(
    tmp_path, setup):
  script = tmp_path / 'api.py'
  script.write_text(API_RUN.format(tests=os.path.join(REPO, 'tests')))
  result = subprocess.run([sys.executable, str(script), setup, str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert not ORBAX_INFO.search(result.stderr) and 'INFO' not in result.stderr
  assert ORBAX_INFO.search((tmp_path / 'run' / console.LOG_FILE).read_text())
  if setup == 'user_file':  # the user's own log: what it asked for, as before the run
    user = (tmp_path / 'user.log').read_text()
    assert 'INFO' not in user and 'a warning after the run' in user
  else:
    assert 'a warning after the run' in result.stderr
