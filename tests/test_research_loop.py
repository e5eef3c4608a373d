"""The research loop: a validation split, the checkpoint selected on it, every class's results,
and the fine-tuned workdir used as a model (tljax.load, tljax.predict)."""

import csv
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
import pytest
from helpers import REPO, image_folder, read_metrics, small_config, snapshot, write_npz

import tljax
from tljax import checkpoint, preemption, resolve, train
from tljax.data import pipeline, sources
from tljax.errors import Preempted


def _id_source(num_classes=3, per_class=30):
  """Arrays whose first pixel is the example's id, so a test can tell examples apart."""
  count = num_classes * per_class
  labels = np.tile(np.arange(num_classes), per_class).astype(np.int32)
  images = np.zeros((count, 4, 4, 1), np.uint8)
  images[:, 0, 0, 0] = np.arange(count)
  test = (images[:6].copy(), labels[:6].copy())
  return sources.ArraySource({'train': (images, labels), 'test': test}, num_classes)


def _ids(source, split):
  return [int(r['image'][0, 0, 0]) for r in source.records(split).as_numpy_iterator()]


def test_held_out_split_is_stratified_disjoint_seeded_and_kshot_draws_only_from_the_rest():
  held = sources.HeldOut(_id_source(), 'train', 0.2, seed=0)
  val, rest = _ids(held, sources.HELD_OUT_SPLIT), _ids(held, 'train')
  assert not set(val) & set(rest) and sorted(val + rest) == list(range(90))
  labels = {i: i % 3 for i in range(90)}  # the label of id i (np.tile order)
  assert sorted(labels[i] for i in val) == [0] * 6 + [1] * 6 + [2] * 6  # 20% of each class
  assert [labels[i] for i in val] == held.labels(sources.HELD_OUT_SPLIT).tolist()
  assert [labels[i] for i in rest] == held.labels('train').tolist()
  assert _ids(sources.HeldOut(_id_source(), 'train', 0.2, seed=0), sources.HELD_OUT_SPLIT) == val
  assert _ids(sources.HeldOut(_id_source(), 'train', 0.2, seed=1), sources.HELD_OUT_SPLIT) != val
  config = dict(train_split='train', examples_per_class=5, subset_seed=3)
  chosen = pipeline.subset_indices(held, 'train', config)
  shot = [rest[i] for i in chosen]
  assert len(shot) == 15 and not set(shot) & set(val)
  assert not held.overlaps(sources.HELD_OUT_SPLIT, 'train')


def _diverging_config(data, **overrides):
  """Validation accuracy reaches 1 by step 8, then a 300x learning rate (clipped, so finite)
  wrecks the model: the best checkpoint is an early one."""
  config = small_config(**{
      'data.path': data, 'data.val_split': 0.25, 'eval_every': 2, 'total_steps': 16,
      'checkpoint_every': 100, 'keep_checkpoints': 1, 'optim.schedule.name': 'step',
      'optim.schedule.boundaries': (0.5,), 'optim.schedule.decay_factor': 300.0,
      'optim.clip_norm': 1.0, **overrides})
  return config


def _expected_best(workdir, metric='accuracy'):
  """The step orbax must keep, from the logged validation metrics: the highest, the later step
  on a tie."""
  rows = [r for r in read_metrics(workdir) if r['split'] == 'val']
  return max(rows, key=lambda r: (r[metric], r['step']))['step']


@pytest.fixture(scope='module')
def diverged(tmp_path_factory):
  root = tmp_path_factory.mktemp('select')
  data = write_npz(root / 'data.npz', train_per_class=20)
  results = train.run(_diverging_config(data), str(root / 'run'))
  return root, data, results


def test_selection_keeps_the_early_peak_and_reports_its_test_metrics(diverged):
  root, _, results = diverged
  workdir = str(root / 'run')
  best = _expected_best(workdir)
  assert best < 16 and results['best']['step'] == results['selected_step'] == best
  assert results['last']['step'] == 16
  assert results['best']['val']['accuracy'] > results['last']['val']['accuracy']
  assert results['eval'] == results['best']['test']  # tables read the selected checkpoint
  assert results['validation']['examples'] == 15 and results['train_examples'] == 45
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == sorted([str(best), '16'])
  logged = {(r['split'], r['step']) for r in read_metrics(workdir)}
  assert ('test', 16) in logged and ('eval', 16) not in logged  # test only at the end
  # The selected checkpoint, loaded back, is what the run reported on.
  model, variables, record = tljax.load(workdir, 'best')
  assert record['step'] == best
  assert tljax.load(workdir, 'last')[2]['step'] == 16
  from tljax.predict import Predictor
  assert Predictor.from_workdir(workdir, 'best').source == f'{workdir} step {best}'
  restored = checkpoint.restore_newest(workdir, None, only=best).state['params']
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(variables['params']),
                                                   jax.tree.leaves(restored), strict=True))


def test_selection_survives_a_preemption_and_resume(diverged, tmp_path, monkeypatch):
  root, data, uninterrupted = diverged
  workdir = str(tmp_path / 'run')
  config = _diverging_config(data)
  stop_at = uninterrupted['best']['step'] + 4  # after the peak, before the end
  original = preemption.StopRequests.reached
  monkeypatch.setattr(preemption.StopRequests, 'reached', lambda self, step: step == stop_at)
  with pytest.raises(Preempted):
    train.run(config, workdir)
  monkeypatch.setattr(preemption.StopRequests, 'reached', original)
  resumed = train.run(config, workdir)
  assert resumed['resumed_from_step'] == stop_at
  assert resumed['best']['step'] == uninterrupted['best']['step']
  assert resumed['best']['test']['accuracy'] == uninterrupted['best']['test']['accuracy']


def _independent_metrics(labels, predicted, num_classes):
  """Per-class precision, recall and F1, balanced accuracy and macro-F1, counted from the
  predictions one class at a time (scikit-learn's conventions)."""
  per_class, recalls, f1s = {}, [], []
  for c in range(num_classes):
    tp = int(np.sum((predicted == c) & (labels == c)))
    support, guessed = int(np.sum(labels == c)), int(np.sum(predicted == c))
    precision = tp / guessed if guessed else 0.0
    recall = tp / support if support else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    per_class[str(c)] = dict(precision=precision, recall=recall, f1=f1, support=support)
    if support:
      recalls.append(recall)
    if support or guessed:
      f1s.append(f1)
  return per_class, float(np.mean(recalls)), float(np.mean(f1s))


@pytest.mark.parametrize('parallel', ['jit', 'pmap'])
def test_confusion_and_per_class_metrics_equal_ones_counted_from_the_predictions(
    tmp_path, parallel):
  data = write_npz(tmp_path / 'data.npz', train_per_class=8, test_per_class=7)  # 21: padded
  config = small_config(**{'data.path': data, 'total_steps': 3, 'parallel': parallel,
                           'data.eval_batch_size': 8})
  results = train.run(config, str(tmp_path / 'run'))
  assert jax.device_count() == 8 and results['devices'] == 8
  model, variables, record = tljax.load(str(tmp_path / 'run'), 'last')
  with np.load(data) as arrays:
    images, labels = arrays['test_images'], arrays['test_labels']
  pre = record['preprocessing']
  inputs = (images / 255.0 - np.asarray(pre['mean'])) / np.asarray(pre['std'])
  predicted = np.argmax(model.apply(variables, inputs.astype(np.float32), train=False), -1)
  expected = np.zeros((3, 3), int)
  for true, guess in zip(labels, predicted, strict=True):
    expected[true, guess] += 1
  test = results['eval']
  assert test['examples'] == 21 and test['confusion'] == expected.tolist()
  per_class, balanced, macro_f1 = _independent_metrics(labels, predicted, 3)
  assert test['per_class'].keys() == per_class.keys()
  for name, expected_row in per_class.items():
    assert test['per_class'][name] == pytest.approx(expected_row), name
  assert test['balanced_accuracy'] == pytest.approx(balanced)
  assert test['macro_f1'] == pytest.approx(macro_f1)
  assert test['accuracy'] == pytest.approx(np.mean(predicted == labels))
  assert results['validation'] is None and results['best'] is None


def _image_folder(root, splits=('train', 'val', 'test'), per_class=6):
  """Three named classes, each a colour, as PNG files in <split>/<class>/."""
  colours = {'cat': (200, 30, 30), 'dog': (30, 200, 30), 'eel': (30, 30, 200)}
  return image_folder(root, colours, dict.fromkeys(splits, per_class))


def _folder_config(path, **overrides):
  return small_config(**{'data.source': 'folder', 'data.path': str(path),
                         'data.val_split': 'val', 'eval_every': 3, **overrides})


def _predict(*args):
  return subprocess.run([sys.executable, '-m', 'tljax.predict', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})


@pytest.mark.slow
def test_predict_on_a_folder_prints_class_names_and_writes_one_row_per_image(tmp_path):
  images = _image_folder(tmp_path / 'images')
  workdir = str(tmp_path / 'run')
  train.run(_folder_config(images, **{'data.mean': (0.3, 0.4, 0.5),
                                      'data.std': (0.2, 0.25, 0.3)}), workdir)
  with open(os.path.join(workdir, 'model.json')) as f:
    assert json.load(f)['class_names'] == ['cat', 'dog', 'eel']
  table = str(tmp_path / 'predicted.csv')
  result = _predict('--workdir', workdir, str(images / 'test'), '--csv', table, '--top_k', '2')
  assert result.returncode == 0, result.stderr[-2000:]
  with open(table) as f:
    rows = list(csv.DictReader(f))
  files = sorted(str(p) for p in (images / 'test').rglob('*.png'))
  assert sorted(r['path'] for r in rows) == files
  assert {r['class_1'] for r in rows} <= {'cat', 'dog', 'eel'}
  assert 'cat' in result.stdout and 'eel' in result.stdout
  # The same top-1 as the model applied by hand to the evaluation view of each file.
  from tljax.predict import Predictor, predict
  predictor = Predictor.from_workdir(workdir)
  by_hand = predict(predictor, files, top_k=1, batch_size=4)
  assert [r['class_1'] for r in sorted(rows, key=lambda r: r['path'])] == [
      top[0][0] for top in by_hand]

  # Chained: a run initialised from this workdir takes its normalisation, not ImageNet's.
  chained = str(tmp_path / 'chained')
  train.run(_folder_config(images, **{'init.pretrained': workdir}), chained)
  with open(os.path.join(chained, 'config.json')) as f:
    data = json.load(f)['data']
  assert data['mean'] == [0.3, 0.4, 0.5] and data['std'] == [0.2, 0.25, 0.3]


# (name, args after `python -m`, expected status, fragment of the one error line, or of the
# output for status 0)
def _refusals(root, data, run):
  folder = _image_folder(root / 'images', splits=('test',), per_class=1)
  (root / 'empty').mkdir()
  (root / 'notes.png').write_text('not an image')
  (root / 'bare').mkdir()
  image = str(next((root / 'images' / 'test').rglob('*.png')))
  damaged = str(root / 'damaged')
  shutil.copytree(run, damaged)
  best = min(int(n) for n in os.listdir(os.path.join(damaged, 'checkpoints')))
  with open(os.path.join(damaged, 'checkpoints', str(best), 'metrics', 'metrics'), 'w') as f:
    f.write('{"accuracy": 0.5')  # cut short
  arrays = [f'--config={REPO}/configs/tests/arrays.py', f'--config.data.path={data}',
            f'--workdir={root}/new']
  return [
      ('validation split that is the test split', ['-m', 'tljax.train', *arrays,
                                                   '--config.data.val_split=test'],
       2, "data.val_split='test' is data.eval_split too"),
      ('fraction leaving a class without validation', [
          '-m', 'tljax.train', *arrays, '--config.data.val_split=0.01'],
       2, 'leaves class(es) [1, 2] with no validation example'),
      ('unknown select metric', ['-m', 'tljax.train', *arrays, '--config.data.val_split=0.2',
                                 '--config.select.metric=acuracy'],
       2, "select.metric='acuracy' is not a validation metric"),
      ('predict on a directory without checkpoints', [
          '-m', 'tljax.predict', '--workdir', str(root / 'bare'), str(folder)],
       2, f'{root}/bare is not a tljax workdir'),
      ('predict on an empty folder', ['-m', 'tljax.predict', '--workdir', run,
                                      str(root / 'empty')],
       2, f'folder {root}/empty holds no image files'),
      ('predict on a non-image file', ['-m', 'tljax.predict', '--workdir', run,
                                       str(root / 'notes.png'), str(folder)],
       2, f'1 input(s) cannot be read as images: {root}/notes.png'),
      ('predict skipping the non-image file', [
          '-m', 'tljax.predict', '--workdir', run, '--skip-unreadable', str(root / 'notes.png'),
          str(folder)],
       0, 'skipped 1 unreadable input(s)'),
      ('predict to an existing CSV', ['-m', 'tljax.predict', '--workdir', run, str(folder),
                                      '--csv', str(root / 'notes.png')],
       2, f'--csv {root}/notes.png exists; pass --force'),
      ('predict writing its CSV over an input image', [
          '-m', 'tljax.predict', '--workdir', run, str(image), '--csv', str(image), '--force'],
       2, f'--csv {image} is one of the input images'),
      ('predict on a workdir that does not exist', [
          '-m', 'tljax.predict', '--workdir', str(root / 'nowhere'), str(folder)],
       2, f'workdir {root}/nowhere does not exist'),
      ('predict without inputs', ['-m', 'tljax.predict', '--workdir', run],
       2, 'name image files or folders, or give --text / --file'),
      ('predict on a run whose saved metrics are damaged', [
          '-m', 'tljax.predict', '--workdir', damaged, str(folder)],
       2, 'metrics/metrics (the validation metrics saved with checkpoint'),
      ('export to a name that is only the extension', [
          '-m', 'tljax.export', '--workdir', run, '--out', str(root / '.safetensors')],
       2, 'must be a file name ending in .safetensors'),
  ]


@pytest.mark.slow
def test_every_research_loop_mistake_is_one_line_and_writes_nothing(diverged, tmp_path):
  root, data, _ = diverged
  run = str(tmp_path / 'run')
  shutil.copytree(root / 'run', run)
  before = snapshot(run)
  cases = _refusals(tmp_path, data, run)
  with ThreadPoolExecutor(2) as pool:
    outcomes = list(pool.map(lambda case: _predict_or_train(case[1]), cases))
  for (name, _, status, fragment), result in zip(cases, outcomes, strict=True):
    output = result.stdout + result.stderr
    assert result.returncode == status and 'Traceback' not in output, (name, output[-2000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    if status == 2:
      assert len(errors) == 1 and fragment in errors[0], (name, errors)
    else:
      assert not errors and fragment in output, (name, output[-2000:])
  assert not os.path.exists(tmp_path / 'new') and not os.path.exists(tmp_path / '.safetensors')
  assert snapshot(run) == before
  assert (tmp_path / 'notes.png').read_text() == 'not an image'


def _predict_or_train(args):
  return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                        timeout=300, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})


def test_tfds_validation_slices_that_share_examples_with_the_test_split_are_refused():
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=20):
    source = sources.TfdsSource('mnist')
    assert not source.overlaps('train[:90%]', 'train[90%:]')
    assert source.overlaps('train[80%:]', 'train[90%:]')
    assert source.overlaps('test[:50%]', 'train[:10%]+test[40%:]')
    assert not source.overlaps('train', 'test')
    config = dict(train_split='train[:80%]', eval_split='test', val_split='test[:50%]',
                  batch_size=4)
    with pytest.raises(sources.DataError, match=r"data.val_split='test\[:50%\]' shares "
                       r"examples with data.eval_split='test'"):
      pipeline.check_splits(source, config, 10)
    config['val_split'] = 'train[80%:]'
    assert pipeline.check_splits(source, config, 10) > 0  # disjoint slices pass


def test_a_selected_checkpoint_damaged_later_leaves_the_run_reporting_the_last(diverged,
                                                                               tmp_path, capsys):
  root, data, results = diverged
  workdir = tmp_path / 'run'
  shutil.copytree(root / 'run', workdir)
  best = results['best']['step']
  for path in (workdir / 'checkpoints' / str(best)).rglob('*'):
    if path.is_file() and path.stat().st_size > 100 and 'metrics' not in path.parts:
      path.write_bytes(path.read_bytes()[:50])  # truncated array data
  longer = _diverging_config(data, total_steps=18, **{'optim.schedule.steps': 16})
  extended = train.run(longer, str(workdir))
  assert 'the selected checkpoint of step' in capsys.readouterr().err
  assert extended['best']['step'] == 18 and extended['selected_step'] == 18
  assert (workdir / 'results.json').exists()


def test_loss_selects_the_lowest_unless_told_and_whole_steps_only(diverged, tmp_path):
  root, data, _ = diverged
  config = resolve.resolve_config(_diverging_config(data, **{'select.metric': 'loss'}))
  assert config.select.mode == 'min'
  assert resolve.resolve_config(_diverging_config(data)).select.mode == 'max'
  from tljax.errors import UserError
  with pytest.raises(UserError, match="step 3.7 must be 'best', 'last' or a step number"):
    tljax.load(str(root / 'run'), 3.7)


def test_predict_follows_linked_folders_once_and_prints_one_line_per_name(tmp_path):
  from tljax.predict import find_images, printable
  folder = _image_folder(tmp_path / 'images', splits=('test',), per_class=1)
  (tmp_path / 'inputs').mkdir()
  (tmp_path / 'inputs' / 'linked').symlink_to(folder / 'test')
  (folder / 'test' / 'cat' / 'loop').symlink_to(folder / 'test')  # a link back up
  found = find_images([str(tmp_path / 'inputs')])
  assert len(found) == 3 and all('/linked/' in p for p in found)
  assert printable('a\nb.png') == 'a\\nb.png'


def test_a_named_validation_split_without_some_class_is_said(tmp_path, capsys):
  folder = _image_folder(tmp_path / 'images', splits=('train', 'test'), per_class=3)
  colours = {'cat': (200, 30, 30), 'dog': (30, 200, 30)}  # no eel
  image_folder(folder, colours, {'val': 2})
  train.run(_folder_config(folder, total_steps=2), str(tmp_path / 'run'))
  assert ("warning: the validation split 'val' has no example of class(es) ['eel']"
          in capsys.readouterr().err)
