"""The commands themselves: each mistake of a careless or hostile user is one `error:` line with
exit status 2 (or the documented outcome), and the earlier run's workdir is byte-for-byte as it
was. Commands run two at a time, as real processes."""

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import REPO, finished_run, snapshot

# Some 20 commands, two processes at a time: about 45 s.
pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

ARRAYS = f'--config={REPO}/configs/tests/arrays.py'


@pytest.fixture(scope='module')
def earlier(tmp_path_factory):
  """A finished run of configs/tests/arrays.py's config, which the commands below name."""
  root = tmp_path_factory.mktemp('cli')
  _, data = finished_run(root, **{'data.resize_size': 18})  # arrays.py's
  return root, data


def _files(root):
  """Config files and data a careless user could point at."""
  (root / 'no_get_config.py').write_text('x = 1\n')
  (root / 'returns_none.py').write_text('def get_config(arg=None):\n  return None\n')
  (root / 'raises.py').write_text('def get_config(arg=None):\n  return {}["missing"]\n')
  (root / 'exits.py').write_text('import sys\ndef get_config(arg=None):\n  sys.exit(0)\n')
  (root / 'unknown_key.py').write_text(
      'from tljax.config import base_config\ndef get_config(arg=None):\n'
      '  c = base_config()\n  c.data.pathh = "x"\n  return c\n')
  (root / 'partial.py').write_text(
      'import ml_collections\ndef get_config(arg=None):\n'
      '  return ml_collections.ConfigDict({"model": {"name": "small_cnn", "num_classes": 3}})\n')
  (root / 'adir.py').mkdir()
  (root / 'victim.txt').write_text('precious')
  (root / 'sweep_attr.py').write_text(
      'from tljax.sweep import Sweep\n'
      f'def get_config(arg=None):\n  return Sweep(base="{REPO}/configs/tests/arrays.py", '
      'variants=[("a", {"data.path": "{sweep_dir.__class__}"})])\n')
  (root / 'sweep_escape.py').write_text(
      'from tljax.sweep import Sweep\n'
      f'def get_config(arg=None):\n  return Sweep(base="{REPO}/configs/tests/arrays.py", '
      'variants=[("../../escaped", {})])\n')
  images = root / 'images'
  for split in ('train', 'test'):
    for name in ('cat', 'dog', 'eel'):
      (images / split / name).mkdir(parents=True, exist_ok=True)
  from PIL import Image
  for split in ('train', 'test'):
    for name in ('cat', 'dog', 'eel'):
      Image.new('RGB', (20, 20), (9, 9, 9)).save(images / split / name / '0.png')
  (images / 'train' / 'dog' / 'gone.png').symlink_to(images / 'nowhere.png')


# (name, args after `python -m`, expected status, fragment of the one error line (or of the
# output for status 0), whether the earlier workdir must be left byte for byte)
def _cases(root, data):
  run = f'--workdir={root}/RUN'
  override = f'--config.data.path={data}'
  train_cmd = ['-m', 'tljax.train']
  return [
      ('misspelt override', [*train_cmd, ARRAYS, run, override, '--config.optim.lrr=0.1'],
       2, "unknown config key 'optim.lrr' in override"),
      ('unknown model', [*train_cmd, ARRAYS, run, override, '--config.model.name=resnet_9000'],
       2, "unknown model 'resnet_9000'"),
      ('keep_checkpoints=0', [*train_cmd, ARRAYS, run, override, '--config.keep_checkpoints=0'],
       2, 'keep_checkpoints=0 must be an integer >= 1'),
      ('total below the saved step', [*train_cmd, ARRAYS, run, override,
                                      '--config.total_steps=3'],
       2, 'holds a checkpoint of step 6, past total_steps=3'),
      ('finished run rerun', [*train_cmd, ARRAYS, run, override],
       0, 'already finished: its results.json holds step 6'),
      ('log_every=0', [*train_cmd, ARRAYS, run, override, '--config.log_every=0'],
       2, 'log_every=0 must be an integer >= 1'),
      ('config path typo', [*train_cmd, f'--config={REPO}/configs/tests/arays.py', run],
       2, f"config file '{REPO}/configs/tests/arays.py' not found"),
      ('config without get_config', [*train_cmd, f'--config={root}/no_get_config.py', run],
       2, 'defines no get_config(arg)'),
      ('get_config returns None', [*train_cmd, f'--config={root}/returns_none.py', run],
       2, "get_config(None) returned NoneType, not a ConfigDict"),
      ('config file raises', [*train_cmd, f'--config={root}/raises.py', run],
       2, f'config file {root}/raises.py:2 raised KeyError'),
      ('invalid dont_load regex', [*train_cmd, ARRAYS, run, override,
                                   "--config.init.dont_load=('[',)"],
       2, "init.dont_load[0]='[' is not a regex"),
      ('dangling symlink in a class folder', [
          *train_cmd, ARRAYS, run, '--config.data.source=folder',
          f'--config.data.path={root}/images', '--config.model.num_classes=3'],
       2, f'{root}/images/train/dog/gone.png (a dangling or looping symbolic link'),
      ('get_config calls sys.exit', [*train_cmd, f'--config={root}/exits.py', run],
       2, f'config file {root}/exits.py:3 raised SystemExit'),
      ('unknown key set in the config file', [*train_cmd, f'--config={root}/unknown_key.py',
                                              run, override],
       2, f"config file {root}/unknown_key.py: unknown config key 'data.pathh'"),
      ('override of a key the file does not set', [
          *train_cmd, f'--config={root}/partial.py', run, '--config.total_steps=0'],
       2, 'total_steps=0 must be an integer in [1, 2147483647]'),
      ('an argument that is not a flag', [*train_cmd, ARRAYS, run, override, 'stray'],
       2, "unexpected arguments ['stray']"),
      ('a coordinator address without a port number', [
          *train_cmd, ARRAYS, run, override, '--coordinator_address=127.0.0.1:abc',
          '--num_processes=1', '--process_id=0'],
       2, "--coordinator_address='127.0.0.1:abc' must be HOST:PORT"),
      ('sweep variant escaping its directory', [
          '-m', 'tljax.ablate', f'--config={root}/sweep_escape.py', f'--workdir={root}/sweep'],
       2, "sweep variant name '../../escaped' is not a safe directory name"),
      ('lock file planted as a link to a file outside', [*train_cmd, ARRAYS, run, override],
       2, '.tljax-lock is not a regular file (a tljax lock file is never a link)',
       lambda workdir: os.symlink(root / 'victim.txt', workdir / '.tljax-lock')),
      ('config.json.tmp planted as a link', [*train_cmd, ARRAYS, run, override,
                                             '--config.total_steps=9',
                                             '--config.optim.schedule.steps=6'],
       0, 'training on past the earlier finish',
       lambda workdir: os.symlink(root / 'victim.txt', workdir / 'config.json.tmp')),
      ('a directory named like a config file', [*train_cmd, f'--config={root}/adir.py', run],
       2, f"config file '{root}/adir.py' is not a regular file"),
      ('a sweep field reaching into an attribute', [
          '-m', 'tljax.ablate', f'--config={root}/sweep_attr.py', f'--workdir={root}/sweep2',
          '--print-commands'],
       2, 'only plain {name} fields are filled in'),
      ('an http:// address for weights', [*train_cmd, ARRAYS, run, override,
                                          '--config.init.pretrained=http://127.0.0.1:1/x.pth'],
       2, 'only https:// and gs:// addresses are downloaded'),
  ]


def _run_case(args):
  return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                        timeout=300, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})


def test_every_refusal_is_one_line_with_its_status_and_the_workdir_untouched(earlier, tmp_path):
  root, data = earlier
  _files(tmp_path)
  cases = _cases(tmp_path, data)
  workdirs, before = {}, {}
  for name, args, _, _, *prepare in cases:  # each case its own copy of the earlier run
    workdirs[name] = tmp_path / f'run-{len(workdirs)}'
    shutil.copytree(root / 'run', workdirs[name])
    for step in prepare:
      step(workdirs[name])
    args[:] = [a.replace(f'{tmp_path}/RUN', str(workdirs[name])) for a in args]
    before[name] = snapshot(workdirs[name])
  with ThreadPoolExecutor(2) as pool:
    results = list(pool.map(_run_case, [case[1] for case in cases]))
  for (name, _, status, fragment, *_), result in zip(cases, results, strict=True):
    output = result.stdout + result.stderr
    assert result.returncode == status, (name, output[-2000:])
    assert 'Traceback' not in output, (name, output[-3000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    if status == 2:
      assert len(errors) == 1 and fragment in errors[0], (name, errors, output[-2000:])
    else:
      assert not errors and fragment in output, (name, output[-2000:])
    if 'training on past' not in fragment:  # the one case that legitimately trains on
      assert snapshot(workdirs[name]) == before[name], name
  assert not (tmp_path.parent / 'escaped').exists()
  assert (tmp_path / 'victim.txt').read_text() == 'precious'  # never written through a link
