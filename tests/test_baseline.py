"""The TF-IDF + logistic regression baseline: fitted on a run's splits, tabulated by sweeps."""

import json
import os

import pytest
from helpers import REPO, snapshot
from test_text import WORDS, make_texts, text_config, text_folder, write_split

from tljax import ablate, baseline, train
from tljax.errors import UserError
from tljax.sweep import Axis, Sweep


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  root = text_folder(tmp_path_factory.mktemp('texts'), train=60, test=30)
  write_split(os.path.join(root, 'dev.csv'), make_texts(15, seed=2))
  return root


def test_baseline_fits_the_run_splits_and_writes_a_run_shaped_results_file(tmp_path, folder):
  workdir = tmp_path / 'tfidf'
  config = text_config(folder, baseline='tfidf_logreg', **{'data.val_split': 'dev',
                                                            'data.examples_per_class': 4})
  results = train.run(config, str(workdir))
  assert sorted(os.listdir(workdir)) == ['config.json', 'results.json']
  assert results['eval']['accuracy'] > 0.9  # the words give each topic away
  assert results['eval']['examples'] == 30 and sum(results['eval']['confusion'][0]) == 10
  assert results['train_examples'] == 12  # 4 per class, as for a network
  assert results['C'] in baseline.C_GRID and results['best']['val']['examples'] == 15
  # One weight per (class, feature) plus a bias per class.
  assert results['trainable_params'] == len(WORDS) * (results['vocabulary'] + 1)
  assert json.loads((workdir / 'results.json').read_text()) == results

  before = snapshot(workdir)
  assert train.run(config, str(workdir)) == results  # finished: left as it is
  changed = text_config(folder, baseline='tfidf_logreg', **{'data.val_split': 'dev'})
  with pytest.raises(UserError, match=r'different config \(data.examples_per_class: 4 -> None'):
    train.run(changed, str(workdir))
  assert snapshot(workdir) == before


def test_baseline_refusals_write_nothing(tmp_path, folder):
  with pytest.raises(UserError, match=r"baseline='svm' must be one of \['tfidf_logreg'\]"):
    train.run(text_config(folder, baseline='svm'), str(tmp_path / 'a'))
  config = text_config(folder, baseline='tfidf_logreg', **{
      'data.val_split': 'dev', 'select.metric': 'accuracy_binary',
      'eval_groupings.binary': ((0,), (1, 2))})  # a network run reports it; the baseline not
  with pytest.raises(UserError, match="select.metric='accuracy_binary' is not a score of"):
    train.run(config, str(tmp_path / 'b'))
  config = text_config(folder, baseline='tfidf_logreg', **{'data.train_split': 'nope'})
  with pytest.raises(UserError, match="'nope'"):
    train.run(config, str(tmp_path / 'c'))
  assert not any((tmp_path / n).exists() for n in 'abc')


def test_a_sweep_tabulates_the_baseline_beside_the_networks(tmp_path, folder):
  sweep = Sweep(base=f'{REPO}/configs/tests/texts.py',
                variants=[('tfidf', {'baseline': 'tfidf_logreg'}),
                          ('probe', {'freeze.preset': 'linear_probe', 'total_steps': 4})],
                axes=[Axis('seed', 'seed', (0, 1))],
                overrides={'data.path': folder})
  rows = ablate.run_sweep(sweep, str(tmp_path / 'sweep'))
  assert [r['variant'] for r in rows] == ['tfidf', 'probe'] and rows[0]['seeds'] == 2
  assert rows[0]['preset'] == 'tfidf_logreg' and rows[0]['frozen_stages'] is None
  table = (tmp_path / 'sweep' / 'results.md').read_text()
  tfidf_line = next(line for line in table.splitlines() if line.startswith('| tfidf '))
  assert tfidf_line.split(' | ')[1] == '-'  # no frozen stages for a non-network
  assert f'{100 * rows[0]["accuracy_mean"]:.2f}' in tfidf_line
