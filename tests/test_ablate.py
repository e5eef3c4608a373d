"""Ablation sweeps: expansion, in-process runs with skip and resume, results files, commands."""

import csv
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import textwrap

import pytest
from helpers import REPO
from PIL import Image

from tljax import ablate, report, train
from tljax.errors import UserError
from tljax.sweep import Axis, Sweep, command, expand, variant_config

BASE_CONFIG = """
from tljax.config import base_config

def get_config(arg=None):
  c = base_config()
  c.model = dict(name='small_cnn', num_classes=3, width=4)
  c.data.update(source='npz', path={path!r}, image_size=16, augment=False, batch_size=16,
                eval_batch_size=16)
  c.optim.update(name='sgd', lr=0.1, momentum=0.9)
  c.total_steps, c.log_every, c.checkpoint_every = 6, 2, 3
  return c
"""


@pytest.fixture
def base_file(tmp_path, npz_path):
  path = tmp_path / 'base.py'
  path.write_text(BASE_CONFIG.format(path=npz_path))
  return str(path)


def _sweep(base, **changes):
  sweep = Sweep(
      base=base, title='test sweep',
      variants=[('scratch', {'freeze.preset': 'scratch'}),
                ('probe', {'freeze.preset': 'linear_probe'})],
      axes=[Axis('k', 'data.examples_per_class', (4, None), linked={'total_steps': (3, 6)}),
            Axis('seed', 'seed', (0, 1))],
      plot=report.PlotSpec())
  return dataclasses.replace(sweep, **changes)


def test_expand_names_groups_linked_keys_and_substitution():
  sweep = Sweep(
      base='unused.py',
      variants=[('base', {}, {'family': 'A'}), ('AnB', {'init.load_stages': 2}, {'family': 'X'})],
      axes=[Axis('k', 'data.examples_per_class', (5, None), linked={'total_steps': (10, 40)}),
            Axis('seed', 'seed', (0, 1))],
      overrides={'init.pretrained': '{sweep_dir}/base-k{k}-seed{seed}', 'optim.lr': 0.5})
  variants = expand(sweep, '/runs')
  assert [v.name for v in variants] == [
      'base-k5-seed0', 'base-k5-seed1', 'base-kall-seed0', 'base-kall-seed1',
      'AnB-k5-seed0', 'AnB-k5-seed1', 'AnB-kall-seed0', 'AnB-kall-seed1']
  assert [v.group for v in variants[::2]] == ['base-k5', 'base-kall', 'AnB-k5', 'AnB-kall']
  anb = variants[7]
  assert anb.overrides == {'init.pretrained': '/runs/base-kall-seed1', 'optim.lr': 0.5,
                           'init.load_stages': 2, 'data.examples_per_class': None,
                           'total_steps': 40, 'seed': 1}
  assert anb.tags == {'family': 'X', 'k': None, 'seed': 1, 'set': 'AnB'}
  assert variants[0].overrides['total_steps'] == 10
  # the substituted path is the directory of the base variant with the same axis values
  for variant in variants:
    assert os.path.basename(variant.overrides['init.pretrained']) in {v.name for v in variants}


def test_expand_rejects_mismatched_links_and_duplicate_names():
  linked = Sweep(base='x.py', axes=[Axis('k', 'data.examples_per_class', (1, 2),
                                         linked={'total_steps': (10,)})])
  with pytest.raises(UserError, match="linked key 'total_steps' has 1 values for 2"):
    expand(linked, '/d')
  twice = Sweep(base='x.py', variants=[('a', {}), ('a', {'seed': 3})])
  with pytest.raises(UserError, match="'a' occurs twice"):
    expand(twice, '/d')


def test_unknown_placeholder_names_the_variant_key_and_known_names():
  sweep = Sweep(base='x.py', variants=[('a', {'init.dont_load': ('x',), 'init.pretrained':
                                             '{sweep_dir}/{base}'})])
  with pytest.raises(UserError, match=r"'a': init.pretrained=.*'base'.*\['sweep_dir'\]"):
    expand(sweep, '/d')
  sweep = Sweep(base='x.py', variants=[('a', {'init.pretrained': '{sweep_dir}/x{{2}}'})])
  assert expand(sweep, '/d')[0].overrides['init.pretrained'] == '/d/x{2}'


def test_unknown_override_key_names_the_variant_and_key(base_file):
  from tljax.config import load_config_file
  sweep = Sweep(base=base_file, variants=[('bad', {'optim.learning_rate': 0.1})])
  (variant,) = expand(sweep, '/d')
  with pytest.raises(UserError, match=r"'bad'.*'optim.learning_rate'"):
    variant_config(load_config_file(base_file), variant)


def _group_stats(sweep_dir, group, key='accuracy'):
  values = []
  for seed in (0, 1):
    with open(os.path.join(sweep_dir, f'{group}-seed{seed}', 'results.json')) as f:
      values.append(json.load(f)['eval'][key])
  return statistics.fmean(values), statistics.stdev(values)


def _record_runs(monkeypatch) -> list[str]:
  """The workdirs train.run is called with from now on (the runs still happen)."""
  calls = []
  real_run = train.run
  monkeypatch.setattr(train, 'run', lambda config, workdir: calls.append(workdir) or
                      real_run(config, workdir))
  return calls


@pytest.mark.slow
def test_sweep_runs_gathers_skips_resumes_and_refuses_changed_configs(
    base_file, tmp_path, monkeypatch, capsys):
  sweep_dir = str(tmp_path / 'sweep')
  sweep = _sweep(base_file)
  rows = ablate.run_sweep(sweep, sweep_dir)

  # One row per group, seeds averaged; the csv and markdown hold the same numbers.
  assert [r['variant'] for r in rows] == ['scratch-k4', 'scratch-kall', 'probe-k4', 'probe-kall']
  with open(os.path.join(sweep_dir, 'results.csv')) as f:
    table = {row['variant']: row for row in csv.DictReader(f)}
  markdown = open(os.path.join(sweep_dir, 'results.md')).read()
  for group in table:
    mean, std = _group_stats(sweep_dir, group)
    assert float(table[group]['accuracy_mean']) == pytest.approx(mean)
    assert float(table[group]['accuracy_std']) == pytest.approx(std)
    assert f'| {group} |' in markdown and f'{100 * mean:.2f} ± {100 * std:.2f}' in markdown
  # Facts from the runs: the probe trains only the head (16 features x 3 classes + 3 biases).
  assert table['probe-k4']['frozen_stages'] == '3' and table['scratch-k4']['frozen_stages'] == '0'
  assert table['probe-kall']['trainable_params'] == str(16 * 3 + 3)
  assert table['probe-k4']['train_examples'] == '12'
  assert table['probe-kall']['train_examples'] == '48'
  with Image.open(os.path.join(sweep_dir, 'results.png')) as image:
    assert image.format == 'PNG' and image.width > 300

  # The same command again runs nothing.
  calls = _record_runs(monkeypatch)
  capsys.readouterr()
  ablate.run_sweep(sweep, sweep_dir)
  assert calls == []
  assert capsys.readouterr().out.count('finished, skipped') == 8

  # An interrupted variant (no results, checkpoints up to step 3 of 6) resumes from step 3 and
  # ends where the uninterrupted run ended.
  victim = os.path.join(sweep_dir, 'probe-kall-seed1')
  with open(os.path.join(victim, 'results.json')) as f:
    before = json.load(f)['eval']
  os.remove(os.path.join(victim, 'results.json'))
  shutil.rmtree(os.path.join(victim, 'checkpoints', '6'))
  ablate.run_sweep(sweep, sweep_dir)
  assert calls == [victim]
  assert 'resumed from checkpoint at step 3' in capsys.readouterr().out
  with open(os.path.join(victim, 'results.json')) as f:
    after = json.load(f)['eval']
  assert after['accuracy'] == before['accuracy']
  assert after['loss'] == pytest.approx(before['loss'], rel=1e-5)

  # A changed sweep over the same workdir is refused, naming the variant and the key.
  results_before = open(os.path.join(sweep_dir, 'results.md')).read()
  changed = _sweep(base_file, overrides={'optim.lr': 0.05})
  with pytest.raises(UserError, match=r"'scratch-k4-seed0'.*optim\.lr"):
    ablate.run_sweep(changed, sweep_dir)
  assert len(calls) == 1
  assert open(os.path.join(sweep_dir, 'results.md')).read() == results_before


@pytest.mark.slow
def test_printed_commands_run_as_is_and_match_the_in_process_variant(base_file, tmp_path,
                                                                      monkeypatch):
  sweep_file = tmp_path / 'sweep.py'
  sweep_file.write_text(textwrap.dedent(f"""
      from tljax.sweep import Axis, Sweep

      def get_config(arg=None):
        return Sweep(base={base_file!r},
                     variants=[('probe', {{'freeze.preset': 'linear_probe'}})],
                     axes=[Axis('k', 'data.examples_per_class', (4, None)),
                           Axis('seed', 'seed', (0,))])
      """))
  sweep_dir = str(tmp_path / 'sweep dir')  # a space: the commands must quote it
  env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'],
             JAX_PLATFORMS='cpu')
  printed = subprocess.run(
      [sys.executable, '-m', 'tljax.ablate', f'--config={sweep_file}', f'--workdir={sweep_dir}',
       '--print-commands'], cwd=REPO, env=env, capture_output=True, text=True, check=True)
  lines = printed.stdout.strip().splitlines()
  assert len(lines) == 2 and all(line.startswith('python -m tljax.train ') for line in lines)
  assert "'--workdir=" in lines[0]
  assert '--config.data.examples_per_class=4' in lines[0]
  assert 'examples_per_class' not in lines[1]  # None is the base value: left out
  subprocess.run(lines[0], shell=True, cwd=REPO, env=env, check=True, capture_output=True)

  # The sweep runner sees the command's run as its own finished variant: same config.
  calls = _record_runs(monkeypatch)
  ablate.run_sweep(ablate.load_sweep(str(sweep_file)), sweep_dir)
  assert calls == [os.path.join(sweep_dir, 'probe-kall-seed0')]


def test_none_over_a_set_base_value_cannot_become_a_flag(base_file):
  from tljax.config import load_config_file
  sweep = Sweep(base=base_file, variants=[('a', {'data.eval_batch_size': None})])
  (variant,) = expand(sweep, '/d')
  with pytest.raises(UserError, match=r'data\.eval_batch_size=None.*16'):
    command(sweep, variant, '/d', load_config_file(base_file))


def test_load_sweep_rejects_a_plain_config(base_file):
  with pytest.raises(UserError, match='returned ConfigDict, not a Sweep'):
    ablate.load_sweep(base_file)


@pytest.mark.parametrize('name', ['../../escaped', '/abs', '.hidden', 'a/b', '..', 'a b', ''])
def test_variant_names_must_be_safe_directory_names(name):
  sweep = Sweep(base='x.py', variants=[(name, {'seed': 1})])
  if name == '':  # an empty set name is the base variant: the name is 'base'
    assert [v.name for v in expand(sweep, '/d')] == ['base']
    return
  with pytest.raises(UserError, match=f'sweep variant name {name!r} is not a safe directory'):
    expand(sweep, '/d')
  axis = Sweep(base='x.py', axes=[Axis(name or 'x', 'seed', (1,))])
  if name:
    with pytest.raises(UserError, match='axis name|not a safe directory'):
      expand(axis, '/d')


def test_an_axis_without_values_is_named():
  sweep = Sweep(base='x.py', axes=[Axis('k', 'data.examples_per_class', ())])
  with pytest.raises(UserError, match="sweep axis 'k' .* must have a non-empty list or tuple"):
    expand(sweep, '/d')


def test_a_newline_in_a_swept_value_cannot_split_a_printed_command(base_file):
  from tljax.config import load_config_file
  sweep = Sweep(base=base_file, variants=[('a', {'data.name': 'mnist\n--config.seed=9'})])
  (variant,) = expand(sweep, '/d')
  with pytest.raises(UserError, match="'a': data.name=.* holds a newline"):
    command(sweep, variant, '/d', load_config_file(base_file))


def test_a_cut_short_results_file_of_a_finished_variant_is_named(base_file, tmp_path):
  sweep = Sweep(base=base_file, variants=[('a', {})])
  (tmp_path / 'a').mkdir()
  (tmp_path / 'a' / 'results.json').write_text('{"final_step": 6, "ev')
  with pytest.raises(UserError, match=f'{tmp_path / "a" / "results.json"} is damaged'):
    ablate.run_sweep(sweep, str(tmp_path))
  with pytest.raises(UserError, match='is damaged'):
    ablate.write_results(sweep, str(tmp_path), expand(sweep, str(tmp_path)))


def test_plot_lines_sort_points_per_series_and_split_off_references(tmp_path):
  rows = [dict(variant=f'p{x}-k{k}', preset='stages', frozen_stages=x, examples_per_class=k,
               seeds=2, accuracy_mean=0.5 + 0.1 * x, accuracy_std=0.01)
          for x in (2, 0, 1) for k in (5, None)]
  rows.append(dict(variant='scratch-k5', preset='scratch', frozen_stages=0,
                   examples_per_class=5, seeds=2, accuracy_mean=0.4, accuracy_std=0.0))
  series, references = report.plot_lines(rows, report.PlotSpec())
  assert list(series) == [5, None]
  assert [x for x, _, _ in series[5]] == [0, 1, 2]
  assert series[None][2] == pytest.approx((2, 70.0, 1.0))
  assert references == [('scratch-k5', 5, 40.0)]
  chosen, _ = report.plot_lines(rows, report.PlotSpec(series_values=(None, 7)))
  assert list(chosen) == [None]
  path = str(tmp_path / 'plot.png')
  report.plot(rows, report.PlotSpec(), path, 'title')
  with Image.open(path) as image:
    assert image.format == 'PNG'


def test_published_rows_sit_in_the_matching_accuracy_column():
  rows = [dict(variant='full', frozen_stages=0, trainable_params=10, examples_per_class=None,
               seeds=1, accuracy_mean=0.7, accuracy_std=0.0, accuracy_binary_mean=0.8,
               accuracy_binary_std=0.0, wall_time_s=3.0, median_step_time_s=0.1)]
  table = report.markdown_table(rows, published=[('paper', {'accuracy_binary': 0.9})])
  header, _, measured, paper = table.splitlines()
  columns = [c.strip() for c in header.split('|')]
  paper_cells = [c.strip() for c in paper.split('|')]
  measured_cells = [c.strip() for c in measured.split('|')]
  assert len(paper_cells) == len(columns)
  assert paper_cells[columns.index('test accuracy binary %')] == '*90.00*'
  assert paper_cells[columns.index('test accuracy %')] == ''
  assert measured_cells[columns.index('test accuracy %')] == '70.00'


def test_tables_read_the_selected_checkpoint_and_show_validation_and_balanced_accuracy():
  def results(seed_shift):
    best_test = dict(accuracy=0.8 + seed_shift, balanced_accuracy=0.7 + seed_shift, loss=0.5)
    last_test = dict(accuracy=0.3, balanced_accuracy=0.3, loss=9.0)
    return dict(eval=best_test, best=dict(step=4, val=dict(accuracy=0.9, balanced_accuracy=0.85),
                                          test=best_test),
                last=dict(step=8, val=dict(accuracy=0.4), test=last_test), selected_step=4,
                preset='full', frozen_stages=0, trainable_params=10, examples_per_class=None,
                train_examples=9, final_step=8, wall_time_s=1.0, median_step_time_s=0.1)
  runs = [dict(variant=f'v-seed{s}', group='v', tags={'seed': s}, results=results(0.1 * s))
          for s in range(2)]
  [row] = report.aggregate(runs)
  assert row['accuracy_mean'] == pytest.approx(0.85)  # the selected checkpoint's test score
  assert row['val_accuracy_mean'] == pytest.approx(0.9) and row['selected_step'] == 4
  header = report.markdown_table([row]).splitlines()[0]
  columns = [c.strip() for c in header.strip('|').split('|')]
  assert columns[5:9] == ['val accuracy %', 'val balanced accuracy %', 'test accuracy %',
                          'test balanced accuracy %']


def test_a_strategy_plot_marks_points_by_trainable_parameters(tmp_path):
  """Points only, a log x axis, each labelled with its strategy; labels of points at one x
  stack instead of overlapping."""
  from unittest import mock
  rows = [dict(variant=name, strategy=name, trainable_params=params, examples_per_class=20,
               accuracy_mean=acc, accuracy_std=0.0)
          for name, params, acc in (('full', 10_000, 0.90), ('decay', 10_000, 0.899),
                                    ('probe', 100, 0.80))]
  spec = report.PlotSpec(x='trainable_params', x_log=True, lines=False, annotate='strategy',
                         reference=None)
  from matplotlib.axes import Axes
  with mock.patch.object(Axes, 'annotate', autospec=True) as annotate:
    report.plot(rows, spec, str(tmp_path / 'plot.png'))
  placed = {call.args[1]: call.kwargs['xytext'] for call in annotate.call_args_list}
  assert set(placed) == {'full', 'decay', 'probe'}
  assert placed['full'] != placed['decay'] and placed['probe'] == placed['full']
