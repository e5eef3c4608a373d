"""Transferability scores on cases with known answers, against an independent transcription of
LogME, their invariances and refusals; the command on a small config and a small sweep."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO, small_config, snapshot

from tljax import score_cuts, transferability
from tljax.errors import UserError
from tljax.transferability import ScoreError


def _separable(classes=3, per_class=20, dims=12, seed=0):
  """Features in clusters far apart (class c around 6 * e_c), and their labels."""
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(classes), per_class)
  features = rng.normal(0, 0.3, (len(labels), dims))
  features[np.arange(len(labels)), labels] += 6.0
  return features, labels


def _logme_from_the_paper(features, labels):
  """LogME as You et al. (2021) write it, with the matrices formed: A = alpha I + beta F^T F,
  m = beta A^-1 F^T y, gamma = sum beta s_i / (alpha + beta s_i) over the eigenvalues s_i of
  F^T F; alpha <- gamma / m^T m, beta <- (n - gamma) / |F m - y|^2 until they stop moving; then
  L = n/2 log beta + D/2 log alpha - n/2 log 2 pi - beta/2 |F m - y|^2 - alpha/2 m^T m
  - 1/2 log |A|, divided by n, averaged over the classes' one-hot targets. Where a class's
  evidence is largest with no weights, alpha grows without bound; the loop stops once the
  weights are negligible."""
  f = np.asarray(features, np.float64)
  n, d = f.shape
  gram = f.T @ f
  eigenvalues = np.linalg.eigvalsh(gram)
  evidences = []
  for c in np.unique(labels):
    y = (labels == c).astype(np.float64)
    alpha, beta = 1.0, 1.0
    for _ in range(10_000):
      a = alpha * np.eye(d) + beta * gram
      m = beta * np.linalg.solve(a, f.T @ y)
      gamma = np.sum(beta * eigenvalues / (alpha + beta * eigenvalues))
      new_alpha = gamma / (m @ m)
      new_beta = (n - gamma) / np.sum((f @ m - y) ** 2)
      moved = abs(new_alpha - alpha) / alpha + abs(new_beta - beta) / beta
      alpha, beta = new_alpha, new_beta
      if moved < 1e-12 or alpha > 1e12 * beta * eigenvalues.max():  # or the prior wins
        break
    a = alpha * np.eye(d) + beta * gram
    m = beta * np.linalg.solve(a, f.T @ y)
    evidence = (n / 2 * math.log(beta) + d / 2 * math.log(alpha) - n / 2 * math.log(2 * math.pi)
                - beta / 2 * np.sum((f @ m - y) ** 2) - alpha / 2 * (m @ m)
                - np.linalg.slogdet(a)[1] / 2)
    evidences.append(evidence / n)
  return float(np.mean(evidences))


@pytest.mark.parametrize('examples, dims', [(60, 8), (24, 40)])
def test_logme_agrees_with_a_transcription_of_the_paper(examples, dims):
  rng = np.random.default_rng(examples)
  labels = np.arange(examples) % 4
  features = rng.normal(size=(examples, dims)) + 0.8 * labels[:, None] * rng.normal(size=dims)
  assert transferability.logme(features, labels) == pytest.approx(
      _logme_from_the_paper(features, labels), abs=1e-5)


def test_feature_scores_rank_separable_features_above_shuffled_labels():
  features, labels = _separable()
  shuffled = np.random.default_rng(1).permutation(labels)
  for score in (transferability.logme, transferability.h_score):
    assert score(features, labels) > score(features, shuffled) + 0.1, score.__name__
  assert transferability.ridge_probe(features, labels, shots=5) == 1.0
  assert transferability.ridge_probe(features, shuffled, shots=5) < 0.7


def test_leep_is_zero_for_a_perfect_source_head_and_lower_for_a_random_one():
  labels = np.arange(30) % 3
  perfect = np.eye(3)[labels]
  assert transferability.leep(perfect, labels) == pytest.approx(0.0, abs=1e-12)
  random_head = np.random.default_rng(0).dirichlet(np.ones(7), len(labels))
  assert transferability.leep(random_head, labels) < -0.5
  # A head that is a relabelling of the target (source class 2 -> target 0, ...) is as good.
  assert transferability.leep(perfect[:, [2, 0, 1]], labels) == pytest.approx(0.0, abs=1e-12)


def test_nce_is_minus_the_conditional_entropy_of_a_3x3_table():
  # counts[z][y]: source label z = 0 always means y = 0 (no entropy); z = 1 splits evenly over
  # y = 1, 2 (ln 2); z = 2 gives y = 0, 1, 2 as 1:1:2 (1.5 ln 2). With p(z) = 2/8, 2/8, 4/8:
  # H(Y|Z) = 2/8 * 0 + 2/8 * ln 2 + 4/8 * 1.5 ln 2 = ln 2.
  counts = [[2, 0, 0], [0, 1, 1], [1, 1, 2]]
  z = [zi for zi, row in enumerate(counts) for y, k in enumerate(row) for _ in range(k)]
  y = [y for row in counts for y, k in enumerate(row) for _ in range(k)]
  probabilities = np.full((len(z), 3), 0.1)
  probabilities[np.arange(len(z)), z] = 0.8  # NCE reads the source head's argmax
  assert transferability.nce(probabilities, np.array(y)) == pytest.approx(-math.log(2), abs=1e-12)


def test_scores_are_invariant_to_example_order_and_source_class_order():
  rng = np.random.default_rng(3)
  labels = np.arange(40) % 4
  features = rng.normal(size=(40, 10)) + labels[:, None] * 0.5
  order = rng.permutation(40)
  for score in (transferability.logme, transferability.h_score):
    assert score(features[order], labels[order]) == pytest.approx(score(features, labels),
                                                                  rel=1e-9)
  source = rng.dirichlet(np.ones(6), 40)
  columns = rng.permutation(6)
  assert transferability.leep(source[:, columns], labels) == pytest.approx(
      transferability.leep(source, labels), rel=1e-12)
  assert transferability.nce(source[:, columns], labels) == pytest.approx(
      transferability.nce(source, labels), rel=1e-12)


@pytest.mark.parametrize('labels, message', [
    (np.zeros(10, int), 'examples of 1 class'),
    (np.array([0, 4, 4]), '3 examples for 5 classes'),
])
def test_scores_refuse_one_class_and_fewer_examples_than_classes(labels, message):
  features = np.random.default_rng(0).normal(size=(len(labels), 4))
  probabilities = np.full((len(labels), 2), 0.5)
  for call in (lambda: transferability.logme(features, labels),
               lambda: transferability.h_score(features, labels),
               lambda: transferability.ridge_probe(features, labels, 1),
               lambda: transferability.leep(probabilities, labels),
               lambda: transferability.nce(probabilities, labels)):
    with pytest.raises(ScoreError, match=message):
      call()


def test_scores_refuse_broken_inputs_with_what_is_wrong():
  features, labels = _separable()
  with pytest.raises(ScoreError, match='non-finite'):
    transferability.logme(np.where(features > 5, np.nan, features), labels)
  with pytest.raises(ScoreError, match='2-D'):
    transferability.h_score(features[:, :, None], labels)
  with pytest.raises(ScoreError, match='one label per example'):
    transferability.logme(features, labels[:-1])
  with pytest.raises(ScoreError, match='not logits'):
    transferability.leep(features[:, :3], labels)
  with pytest.raises(ScoreError, match='at most 20'):
    transferability.ridge_probe(features, labels, shots=20)


def _arrays_config(data, **overrides):
  return small_config(**{'data.path': data, 'model.width': 8, **overrides})


def test_command_scores_every_cut_writes_the_table_and_reuses_it(earlier_run, tmp_path,
                                                                 capsys):
  run_dir, data = earlier_run
  workdir = tmp_path / 'scores'
  config = _arrays_config(data, **{'init.pretrained': str(run_dir), 'model.width': 4})
  result = score_cuts.run(config, str(workdir))
  rows = {row['cut']: row for row in result['rows']}
  assert sorted(rows) == ['head', 'stage1', 'stage2']  # every stage after the stem
  assert [rows[c]['frozen_stages'] for c in ('stage1', 'stage2', 'head')] == [1, 2, 3]
  assert rows['head']['dims'] == 16 and rows['stage1']['dims'] == 4  # pooled channels
  # The workdir is a 3-class run: its own head gives LEEP and NCE, on the head's input.
  assert rows['head']['leep'] <= 0 and 'leep' not in rows['stage1']
  assert result['models'][0]['examples'] == 48 and result['models'][0]['source_head']
  table = (workdir / 'transferability.md').read_text()
  ranked = [line for line in table.splitlines() if line[:3] in ('| 1', '| 2', '| 3')]
  assert [line.split(' | ')[2] for line in ranked] == [
      r['cut'] for r in sorted(result['rows'], key=lambda r: -r['logme'])]
  written = snapshot(workdir)
  again = score_cuts.run(config, str(workdir))
  assert 'holds these scores already: reused' in capsys.readouterr().out
  assert again['rows'] == result['rows'] and snapshot(workdir) == written
  with pytest.raises(UserError, match='another request'):
    score_cuts.run(config, str(workdir), shots=3)
  assert snapshot(workdir) == written


def test_command_refuses_bad_requests_before_writing(earlier_run, tmp_path):
  run_dir, data = earlier_run
  config = _arrays_config(data, **{'init.pretrained': str(run_dir), 'model.width': 4})
  workdir = tmp_path / 'w'
  for kwargs, message in [(dict(cuts='stem'), "'stem'.*choose from stage1, stage2, head"),
                          (dict(models='nonesuch/x'), 'not a zoo name'),
                          (dict(shots=0), 'at least 1'),
                          (dict(per_class=1), 'at least 2 examples per class'),
                          (dict(sweep=str(tmp_path / 'missing')), 'does not exist')]:
    with pytest.raises(UserError, match=message):
      score_cuts.run(config, str(workdir), **kwargs)
  with pytest.raises(UserError, match='init.pretrained is unset'):
    score_cuts.run(_arrays_config(data), str(workdir))
  assert not workdir.exists()
  # --per-class scores a seeded subset: 4 of each of the 3 classes (16 each in the split).
  subset = score_cuts.run(config, str(workdir), per_class=4, shots=2)
  assert subset['models'][0]['examples'] == 12 and subset['request']['per_class'] == 4


def test_a_split_of_one_class_is_one_error_line(tmp_path, earlier_run):
  run_dir, _ = earlier_run
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (12, 16, 16, 3)).astype(np.uint8)
  data = tmp_path / 'one_class.npz'
  np.savez(data, train_images=images, train_labels=np.zeros(12, np.int32),
           test_images=images[:3], test_labels=np.array([0, 1, 2], np.int32))
  config = os.path.join(REPO, 'configs/tests/arrays.py')
  done = subprocess.run(
      [sys.executable, '-m', 'tljax.transferability', f'--config={config}',
       f'--workdir={tmp_path / "w"}', f'--config.data.path={data}',
       f'--config.init.pretrained={run_dir}'],
      capture_output=True, text=True, cwd=REPO, timeout=300)
  assert done.returncode == 2, done.stderr
  lines = done.stderr.strip().splitlines()
  # Checked as tljax.train checks the splits: classes 1 and 2 have no training example.
  assert len(lines) == 1 and lines[0].startswith('error: '), lines
  assert '[1, 2] have no examples' in lines[0], lines
  assert not (tmp_path / 'w').exists()  # refused before the workdir was made


SWEEP = """
from tljax.sweep import Axis, Sweep

def get_config(arg=None):
  return Sweep(base={base!r},
               variants=[(f'stages{{k}}', {{'freeze.preset': f'stages:{{k}}'}}) for k in (1, 2, 3)]
                        + [('full', {{'freeze.preset': 'full'}})],
               axes=[Axis('seed', 'seed', (0, 1))])
"""


@pytest.fixture(scope='module')
def small_sweep(earlier_run, tmp_path_factory):
  """A finished sweep of the small CNN from the earlier run's weights: stages:1..3 and full
  fine-tuning, two seeds; returns (its base config file, its directory)."""
  from tljax import ablate
  run_dir, data = earlier_run
  tmp_path = tmp_path_factory.mktemp('sweep')
  base = tmp_path / 'base.py'
  base.write_text(
      'from tljax.config import base_config\n'
      'def get_config(arg=None):\n'
      '  c = base_config()\n'
      "  c.model = dict(name='small_cnn', num_classes=3, width=4)\n"
      f"  c.data.update(source='npz', path={data!r}, image_size=16, augment=False,\n"
      '                 batch_size=16, eval_batch_size=16)\n'
      f"  c.init.pretrained = {str(run_dir)!r}\n"
      '  c.total_steps, c.log_every, c.checkpoint_every = 6, 3, 6\n'
      '  return c\n')
  sweep_file = tmp_path / 'sweep.py'
  sweep_file.write_text(SWEEP.format(base=str(base)))
  sweep_dir = tmp_path / 'sweep'
  ablate.run_sweep(ablate.load_sweep(str(sweep_file)), str(sweep_dir))
  return base, sweep_dir


def test_sweep_agreement_reports_tau_over_the_matched_cuts(small_sweep, tmp_path):
  from scipy import stats
  base, sweep_dir = small_sweep
  done = subprocess.run(
      [sys.executable, '-m', 'tljax.transferability', f'--config={base}',
       f'--workdir={tmp_path / "scores"}', f'--sweep={sweep_dir}'],
      capture_output=True, text=True, cwd=REPO, timeout=300)
  assert done.returncode == 0, done.stderr
  assert 'Kendall tau' in done.stdout
  result = json.loads((tmp_path / 'scores' / 'transferability.json').read_text())
  agreed = result['agreement']
  points = agreed['points']
  assert [p['frozen_stages'] for p in points] == [1, 2, 3] and all(p['runs'] == 2
                                                                   for p in points)
  for p in points:  # the mean over the two seeds' test accuracies
    runs = [json.loads((sweep_dir / f'stages{p["frozen_stages"]}-seed{s}' / 'results.json')
                       .read_text())['eval']['accuracy'] for s in (0, 1)]
    assert p['accuracy'] == pytest.approx(np.mean(runs))
  logme = next(e for e in agreed['table'] if e['method'] == 'logme')
  expected = stats.kendalltau([p['logme'] for p in points], [p['accuracy'] for p in points])
  if np.isnan(expected.statistic):
    assert logme['test']['kendall_tau'] is None
  else:
    assert logme['test']['kendall_tau'] == pytest.approx(expected.statistic)
  assert logme['test']['points'] == 3
  assert sorted(agreed['left_out']['trains every stage (no frozen prefix)']) == [
      'full-seed0', 'full-seed1']
  assert (tmp_path / 'scores' / 'transferability.png').stat().st_size > 1000


def test_a_zoo_model_is_scored_beside_the_config_with_its_imagenet_head(earlier_run, tmp_path):
  run_dir, data = earlier_run
  config = _arrays_config(data, **{'init.pretrained': str(run_dir), 'model.width': 4})
  result = score_cuts.run(config, str(tmp_path / 'w'), cuts='head',
                          models='mobilenet_v2/imagenet')
  by_model = {}
  for row in result['rows']:
    by_model.setdefault(row['model'], []).append(row)
  assert [r['cut'] for r in by_model[str(run_dir)]] == ['head']  # --cuts: the config's model
  mobilenet = {r['cut']: r for r in by_model['mobilenet_v2/imagenet']}
  assert len(mobilenet) == 9 and mobilenet['head']['dims'] == 1280
  assert mobilenet['stage7']['dims'] == 160 and mobilenet['stage7']['frozen_stages'] == 7
  # LEEP through ImageNet's 1000 classes: below 0 (no ImageNet class is one of these colour
  # classes), within reach of chance (log 1/3).
  assert -math.log(3) - 1 < mobilenet['head']['leep'] < 0
  assert all(np.isfinite(r['logme']) and 0 <= r['ridge'] <= 1 for r in result['rows'])


def _copy_sweep(sweep_dir, target):
  import shutil
  shutil.copytree(sweep_dir, target)
  return target


def _edit_results(path, change):
  results = json.loads(path.read_text())
  change(results)
  path.write_text(json.dumps(results))


def test_damaged_or_unmatched_variants_are_left_out_with_the_reason(small_sweep, tmp_path):
  from tljax import config as config_lib
  base, sweep_dir = small_sweep
  sweep = _copy_sweep(sweep_dir, tmp_path / 'sweep')
  (sweep / 'stages1-seed0' / 'config.json').write_text('{"cut short')
  _edit_results(sweep / 'stages2-seed0' / 'results.json', lambda r: r.pop('eval'))
  _edit_results(sweep / 'stages3-seed0' / 'results.json',
                lambda r: r.update(frozen_stages='3'))
  (sweep / 'stages2-seed1' / 'results.json').unlink()  # unfinished
  saved = json.loads((sweep / 'full-seed1' / 'config.json').read_text())
  saved['lora'] = 'none'  # valid JSON, values of the wrong kind
  (sweep / 'full-seed1' / 'config.json').write_text(json.dumps(saved))
  config = config_lib.load_config_file(str(base))
  result = score_cuts.run(config, str(tmp_path / 'w'), sweep=str(sweep))
  left = result['agreement']['left_out']
  assert left['unreadable (a damaged results.json or config.json)'] == ['stages1-seed0']
  assert sorted(next(v for k, v in left.items() if k.startswith('results.json without'))) == [
      'stages2-seed0', 'stages3-seed0']
  assert left['unfinished (no results.json)'] == ['stages2-seed1']
  assert next(v for k, v in left.items() if 'wrong kind' in k) == ['full-seed1']
  assert [(p['cut'], p['runs']) for p in result['agreement']['points']] == [
      ('stage1', 1), ('head', 1)]
  # Trained on other data: every variant left out, and the error says why; the scores of the
  # config stay written (a rerun reuses them).
  other = _copy_sweep(sweep_dir, tmp_path / 'other')
  for path in other.glob('*/config.json'):
    saved = json.loads(path.read_text())
    saved['data']['path'] = str(tmp_path / 'elsewhere.npz')
    path.write_text(json.dumps(saved))
  with pytest.raises(UserError,
                     match=r'no finished variant matches.*6 trained on other data \(data.path='):
    score_cuts.run(config, str(tmp_path / 'w2'), sweep=str(other))
  assert json.loads((tmp_path / 'w2' / 'transferability.json').read_text())['rows']


def test_equal_accuracies_have_no_ranking_and_a_rerun_without_sweep_drops_it(small_sweep,
                                                                           tmp_path):
  from tljax import config as config_lib
  base, sweep_dir = small_sweep
  sweep = _copy_sweep(sweep_dir, tmp_path / 'sweep')
  for path in sweep.glob('*/results.json'):
    _edit_results(path, lambda r: r['eval'].update(accuracy=0.5))
  config = config_lib.load_config_file(str(base))
  workdir = tmp_path / 'w'
  result = score_cuts.run(config, str(workdir), sweep=str(sweep))
  assert all(e['test'] == dict(points=3, kendall_tau=None, spearman_rho=None, top1_hit=None)
             for e in result['agreement']['table'])
  assert (workdir / 'transferability.png').exists()
  again = score_cuts.run(config, str(workdir))
  assert 'agreement' not in again and 'Rank agreement' not in (
      workdir / 'transferability.md').read_text()
  assert not (workdir / 'transferability.png').exists()
  # A results file whose rows lost a field, a row, or hold a string is refused, not half-read.
  saved = (workdir / 'transferability.json').read_text()
  for edit in (lambda r: r['rows'][0].pop('logme'), lambda r: r['rows'].pop(),
               lambda r: r['rows'][-1].update(leep='abc'), lambda r: r['models'][0].pop('nce')):
    edited = json.loads(saved)
    edit(edited)
    (workdir / 'transferability.json').write_text(json.dumps(edited))
    with pytest.raises(UserError, match='incomplete'):
      score_cuts.run(config, str(workdir))


def test_degenerate_features_give_finite_scores():
  labels = np.arange(12) % 3
  for features in (np.zeros((12, 5)), np.full((12, 5), 1e20), np.eye(3)[labels],
                   np.random.default_rng(0).normal(size=(12, 40))):  # n < D
    for name, score in transferability.FEATURE_SCORES.items():
      assert np.isfinite(score(features, labels)), name
  # Features that are the labels fit exactly: LogME's best, above noise.
  exact = transferability.logme(np.eye(3)[labels], labels)
  assert exact > transferability.logme(np.random.default_rng(0).normal(size=(12, 3)), labels)
  with pytest.raises(ScoreError, match='magnitude'):
    transferability.logme(np.full((12, 5), 1e200), labels)


def test_near_equal_scores_or_accuracies_are_no_ranking():
  from tljax import score_sweep
  tied = score_sweep._rank_agreement([-0.7103119604690988, -0.7103119604690987, -0.71031196046909],
                                     [0.9, 0.8, 0.5])
  assert tied == dict(points=3, kendall_tau=None, spearman_rho=None, top1_hit=None)
  ranked = score_sweep._rank_agreement([1.0, 2.0, 3.0], [0.5, 0.8, 0.9])
  assert ranked['kendall_tau'] == pytest.approx(1.0) and ranked['top1_hit'] is True


def test_scores_kept_inside_the_weights_workdir_are_reused(earlier_run, tmp_path):
  import shutil
  run_dir, data = earlier_run
  weights = tmp_path / 'weights'
  shutil.copytree(run_dir, weights)
  config = _arrays_config(data, **{'init.pretrained': str(weights) + '/', 'model.width': 4})
  first = score_cuts.run(config, str(weights / 'scores'), cuts='head,stage1')
  assert [r['cut'] for r in first['rows']] == ['stage1', 'head']  # the model's order
  # Its own files do not change the weights' fingerprint; the same cuts in another order and
  # the same folder spelt without the slash are the same request.
  config = _arrays_config(data, **{'init.pretrained': str(weights), 'model.width': 4})
  again = score_cuts.run(config, str(weights / 'scores'), cuts='stage1,head')
  assert again['rows'] == first['rows']
