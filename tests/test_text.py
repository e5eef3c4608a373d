"""Text through the same loop: sources, tokenisation in tf.data, the BERT head, freezing, caching,
devices, predict and export."""

import csv
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from helpers import REPO, set_keys, snapshot

from tljax import build, features, resolve, train
from tljax.config import load_config_file
from tljax.data import pipeline, text
from tljax.data.sources import DataError
from tljax.errors import UserError
from tljax.models import bert
from tljax.weights import zoo
from tljax.weights.read import read_tljax_workdir

TOKENIZER = zoo.TOKENIZERS['minilm_l6/all-v2']
WORDS = {'sport': 'goal match team player score win league coach'.split(),
         'tech': 'computer software chip internet phone data code network'.split(),
         'money': 'bank market shares price profit economy trade stock'.split()}
LONG_TEXT = ' '.join(['transfer learning reuses pretrained weights'] * 80)  # > 256 tokens


def make_texts(count: int, seed: int = 0) -> list[tuple[str, str]]:
  """(text, label) rows whose words give their topic away, of 3 to 40 words."""
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(count):
    label = list(WORDS)[i % 3]
    rows.append((' '.join(rng.choice(WORDS[label], rng.integers(3, 40))), label))
  return rows


def write_split(path, rows, kind='csv', header=('text', 'label')):
  if kind == 'csv':
    with open(path, 'w', newline='', encoding='utf-8') as f:
      writer = csv.writer(f)
      writer.writerow(header)
      writer.writerows(rows)
  else:
    with open(path, 'w', encoding='utf-8') as f:
      for row in rows:
        f.write(json.dumps(dict(zip(header, row, strict=True))) + '\n')


def text_folder(root, kind='csv', train=24, test=9):
  os.makedirs(root, exist_ok=True)
  write_split(os.path.join(root, f'train.{kind}'), make_texts(train), kind)
  write_split(os.path.join(root, f'test.{kind}'), make_texts(test, seed=1), kind)
  return str(root)


def text_config(path, **overrides):
  config = load_config_file(f'{REPO}/configs/tests/texts.py')
  config.data.path = str(path)
  return set_keys(config, overrides)


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  return text_folder(tmp_path_factory.mktemp('texts'))


def _library_encoding(texts, max_length):
  from tokenizers import Tokenizer
  tokenizer = Tokenizer.from_file(zoo.locate(TOKENIZER))
  tokenizer.enable_truncation(max_length)
  tokenizer.enable_padding(length=max_length, pad_id=0, pad_token='[PAD]')
  encodings = tokenizer.encode_batch(texts)
  return {key: np.array([getattr(e, name) for e in encodings], np.int32)
          for key, name in (('input_ids', 'ids'), ('attention_mask', 'attention_mask'),
                            ('token_type_ids', 'type_ids'))}


@pytest.mark.parametrize('max_length', [16, 256])
def test_pipeline_tokens_equal_the_tokenizers_library(max_length):
  texts = ['A short one.', 'Café prices rose 3% in Zürich — “quoted” text, twice as long.',
           LONG_TEXT,
           'two\nlines', 'x ' * 300]
  source = text.TextSource({'train': (texts, np.zeros(len(texts))),
                            'test': (texts, np.zeros(len(texts)))}, ['a', 'b'])
  data = dict(train_split='train', eval_split='test', batch_size=2, tokenizer=TOKENIZER,
              max_length=max_length)
  batches = list(pipeline.EvalBatches(source, data))
  got = {k: np.concatenate([b[k][b['mask']] for b in batches]) for k in text.INPUT_KEYS}
  expected = _library_encoding(texts, max_length)
  for key in text.INPUT_KEYS:
    assert got[key].shape == (len(texts), max_length)  # the config's length, not the file's 128
    np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
  # The long texts are cut at max_length and end with [SEP] (id 102); counted as truncated.
  assert got['input_ids'][2, -1] == 102 and got['attention_mask'][2].all()
  counts = pipeline.truncated_counts(source, data)
  from tokenizers import Tokenizer
  full = Tokenizer.from_file(zoo.locate(TOKENIZER))
  full.no_truncation()
  full.no_padding()
  longer = sum(len(e.ids) > max_length for e in full.encode_batch(texts))
  assert longer == (3 if max_length == 16 else 2)  # the texts were chosen to need it
  assert counts['train_split'] == dict(split='train', texts=5, truncated=longer)
  # Training batches (shuffled) hold the same encodings, row for row.
  train = next(pipeline.train_batches(source, dict(data, batch_size=5), start_step=0, seed=0))
  rows = {tuple(r) for r in expected['input_ids']}
  assert {tuple(r) for r in train['input_ids']} == rows


def test_step0_pooled_embedding_of_the_training_pipeline_is_minilm_mean_pool():
  texts = ['The match ended in a draw.', 'Shares fell after the report.', LONG_TEXT,
           'A new phone chip was announced today.']
  source = text.TextSource({'train': (texts, np.arange(4) % 2), 'test': (texts, np.zeros(4))},
                           ['a', 'b'])
  config = resolve.resolve_config(load_config_file(f'{REPO}/configs/tests/texts.py'))
  config.model = dict(name='minilm_l6', num_classes=2)
  config.init.pretrained = 'minilm_l6/all-v2'
  config.init.dont_load = ('head/.*',)
  config.data.tokenizer = None
  config.data.max_length = 64
  config = resolve.resolve_config(config)
  built = build.build(config)
  assert config.data.tokenizer == TOKENIZER and built.model.pool == 'mean'
  batch = next(iter(pipeline.EvalBatches(source, config.data)))
  inputs = [jnp.asarray(batch[k]) for k in text.INPUT_KEYS]
  variables = {'params': built.params}
  pooled = features.prefix_features(built.model, variables, inputs, 'head')

  # The same texts through the tokenizers library and the model's own encoder + mean_pool.
  ref = _library_encoding(texts, 64)
  states = built.model.apply(variables, ref['input_ids'], ref['attention_mask'],
                             ref['token_type_ids'], method=bert.Bert.encode)
  expected = bert.mean_pool(states, ref['attention_mask'])
  np.testing.assert_allclose(np.asarray(pooled)[:4], np.asarray(expected), rtol=1e-5, atol=1e-5)


# Runs compared to 1e-5 use SGD: Adam would turn the attention key biases' gradients (zero in
# exact arithmetic: softmax ignores a shift shared by all keys) into full-size steps of rounding
# noise, which differs with the order of a sum (devices, processes, a cached prefix).
SGD = {'optim.name': 'sgd', 'optim.lr': 0.05, 'optim.momentum': 0.9}
SGD_FLAGS = [f'--config.{k}={v}' for k, v in SGD.items()]


def _first_and_last(tmp_path, folder, name, **overrides):
  workdir = str(tmp_path / name)
  config = text_config(folder, **overrides)
  built = build.build(resolve.resolve_config(config))
  results = train.run(config, workdir)
  first = {f'params/{k}': np.asarray(v)
           for k, v in traverse_util.flatten_dict(built.params, sep='/').items()}
  return first, read_tljax_workdir(workdir), results


@pytest.mark.slow
def test_stage_presets_freeze_text_layers_bitwise_and_caching_gives_the_same_parameters(
    tmp_path, folder):
  overrides = {'total_steps': 20, 'freeze.preset': 'stages:4', **SGD}
  first, last, results = _first_and_last(tmp_path, folder, 'plain', **overrides)
  frozen = ('embeddings', 'layer0', 'layer1', 'layer2')  # stages:4 counts from the embeddings
  for path in first:
    stage = path.split('/')[1]
    if stage in frozen:
      np.testing.assert_array_equal(last[path], first[path], err_msg=path)
    elif path.endswith('kernel'):
      assert not np.array_equal(last[path], first[path]), path
  assert results['frozen_stages'] == 4 and results['modality'] == 'text'
  assert results['truncated_texts']['train_split']['texts'] == 24

  _, cached, results = _first_and_last(tmp_path, folder, 'cached', **overrides,
                                       **{'data.cache_features': True})
  assert results['feature_cache']['stage'] == 'layer3'
  assert results['feature_cache']['shape'] == [24, 16]  # token states at max_length 24
  for path in last:
    np.testing.assert_allclose(cached[path], last[path], rtol=1e-5, atol=1e-5, err_msg=path)


def test_frozen_text_layers_compute_no_gradients(folder):
  """Compiled FLOPs of one train step fall as more leading stages are frozen."""
  flops = {}
  for preset in ('full', 'stages:2', 'stages:4', 'stages:6', 'linear_probe'):
    config = resolve.resolve_config(text_config(folder, **{'freeze.preset': preset}))
    built = build.build(config)
    step = jax.jit(built.train_step(input_keys=bert.INPUTS))
    batch = {k: jnp.ones((8, 24), jnp.int32) for k in bert.INPUTS}
    batch['label'] = jnp.zeros(8, jnp.int32)
    flops[preset] = step.lower(built.state, batch).compile().cost_analysis()['flops']
  values = list(flops.values())
  assert all(a > b for a, b in zip(values, values[1:], strict=False)), flops
  assert flops['linear_probe'] < 0.5 * flops['full'], flops


@pytest.mark.slow
def test_eight_devices_jit_and_pmap_train_text_to_the_one_device_parameters(tmp_path, folder):
  assert jax.device_count() == 8
  reference = _train_cli(tmp_path / 'one', folder, ['--cpu_devices=1'])
  expected = read_tljax_workdir(str(tmp_path / 'one'))
  for name, extra in (('jit', []), ('pmap', ['--config.parallel=pmap']),
                      ('fsdp', ['--config.sharding.rule=fsdp',
                                '--config.sharding.min_size_mb=0'])):
    run = _train_cli(tmp_path / name, folder, ['--cpu_devices=8', *extra])
    assert run.returncode == 0, run.stderr[-3000:]
    got = read_tljax_workdir(str(tmp_path / name))
    assert got.keys() == expected.keys()
    for path in expected:
      np.testing.assert_allclose(got[path], expected[path], rtol=1e-5, atol=1e-6, err_msg=path)
  assert reference.returncode == 0


def _train_cli(workdir, folder, extra=(), config=f'{REPO}/configs/tests/texts.py'):
  return subprocess.run(
      [sys.executable, '-m', 'tljax.train', f'--config={config}', f'--workdir={workdir}',
       f'--config.data.path={folder}', *SGD_FLAGS, *extra], cwd=REPO, capture_output=True,
      text=True,
      timeout=300, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_train_text_to_the_one_process_parameters(tmp_path, folder):
  reference = _train_cli(tmp_path / 'one', folder, ['--cpu_devices=4'])
  assert reference.returncode == 0, reference.stderr[-3000:]
  result = subprocess.run(
      ['bash', f'{REPO}/launch/multiprocess.sh', '2', f'{REPO}/configs/tests/texts.py',
       str(tmp_path / 'two'), f'--config.data.path={folder}', *SGD_FLAGS], cwd=REPO,
      capture_output=True,
      text=True, timeout=300, env={**os.environ, 'DEVICES_PER_PROCESS': '2',
                                   'PYTHON': sys.executable})
  logs = ''.join((tmp_path / 'two' / f'process_{i}.log').read_text()[-2000:] for i in range(2))
  assert result.returncode == 0, logs
  expected, got = read_tljax_workdir(str(tmp_path / 'one')), read_tljax_workdir(
      str(tmp_path / 'two'))
  for path in expected:
    np.testing.assert_allclose(got[path], expected[path], rtol=1e-5, atol=1e-6, err_msg=path)
  results = json.loads((tmp_path / 'two' / 'results.json').read_text())
  assert results['processes'] == 2 and results['modality'] == 'text'


def _broken(tmp_path, kind, name, rows=None, header=('text', 'label'), raw=None):
  root = tmp_path / name
  text_folder(root, kind)
  target = root / f'train.{kind}'
  if raw is not None:
    target.write_bytes(raw)
  else:
    write_split(target, rows, kind, header)
  return root, str(target)


CASES = {
    'missing column': dict(rows=[('goal match', 'sport')], header=('body', 'label'),
                           match=r'{file}:1: no (column|key) .text.'),
    'empty text': dict(rows=[('goal match', 'sport'), ('   ', 'tech')],
                       match=r'{file}:{row}: the text .* is empty'),
    'label not in class list': dict(rows=[('goal match', 'sport'), ('chip', 'weather')],
                                    classes=('sport', 'tech', 'money'),
                                    match=r"{file}:{row}: label 'weather' is not one of"),
    'non-UTF-8 bytes': dict(raw=True, match=r'{file}:3: bytes that are not UTF-8'),
    'empty split': dict(rows=[], match=r'{file}: no rows, so split .train. is empty'),
}


@pytest.mark.parametrize('kind', ['csv', 'jsonl'])
@pytest.mark.parametrize('case', list(CASES))
def test_bad_text_files_are_one_error_naming_file_and_row_with_nothing_written(
    tmp_path, kind, case):
  spec = CASES[case]
  raw = None
  if spec.get('raw'):
    good = (b'text,label\n' if kind == 'csv' else b'')
    lines = ([b'goal,sport', b'chip,tech', b'caf\xe9,money'] if kind == 'csv' else
             [b'{"text": "goal", "label": "sport"}', b'{"text": "chip", "label": "tech"}',
              b'{"text": "caf\xe9", "label": "money"}'])
    raw = good + b'\n'.join(lines) + b'\n'
    if kind == 'jsonl':
      spec = dict(spec, match=r'{file}:3: bytes that are not UTF-8')
    else:
      spec = dict(spec, match=r'{file}:4: bytes that are not UTF-8')
  root, target = _broken(tmp_path, kind, 'data', spec.get('rows'), spec.get('header',
                                                                            ('text', 'label')),
                         raw)
  row = 3 if kind == 'csv' else 2  # the second data row: after the CSV header
  config = text_config(root, **{'data.source': kind})
  if spec.get('classes'):
    config.data.class_names = spec['classes']
  workdir = tmp_path / 'run'
  pattern = spec['match'].format(file=target.replace('.', r'\.'), row=row)
  with pytest.raises(DataError, match=pattern):
    train.run(config, str(workdir))
  assert not workdir.exists()


def test_cli_refusal_of_a_bad_text_file_is_one_line(tmp_path):
  root, target = _broken(tmp_path, 'csv', 'data', [('goal', 'sport'), ('', 'tech')])
  before = snapshot(root)
  run = _train_cli(tmp_path / 'run', root)
  assert run.returncode == 2
  errors = [line for line in run.stderr.splitlines() if line.startswith('error:')]
  assert errors == [f'error: {target}:3: the text (\'text\') is empty; remove the row or fill it '
                    'in'], run.stderr
  assert not (tmp_path / 'run').exists() and snapshot(root) == before


def test_text_and_image_sources_do_not_mix_and_max_length_fits_the_model(tmp_path, folder):
  config = text_config(folder, **{'data.source': 'folder'})
  with pytest.raises(DataError, match="for a model that reads text, got 'folder'"):
    train.run(config, str(tmp_path / 'a'))
  config = text_config(folder, **{'data.max_length': 65})
  with pytest.raises(UserError, match=r'data.max_length=65 is more than the 64 positions'):
    train.run(config, str(tmp_path / 'b'))
  config = text_config(folder, **{'data.tokenizer': None})
  with pytest.raises(UserError, match='set data.tokenizer'):
    train.run(config, str(tmp_path / 'c'))
  bad = tmp_path / 'tokenizer.json'
  bad.write_text('{"not": "a tokenizer"}')
  config = text_config(folder, **{'data.tokenizer': str(bad)})
  with pytest.raises(DataError, match=f'tokenizer file {bad} .* cannot be read'):
    train.run(config, str(tmp_path / 'd'))
  assert not any((tmp_path / n).exists() for n in 'abcd')


def test_bbc_news_splits_are_stratified_disjoint_and_fixed():
  source = text.BbcNewsSource()
  sizes = {s: source.num_examples(s) for s in ('train', 'validation', 'test', 'all')}
  assert sizes['all'] == 2225
  assert sizes['train'] + sizes['validation'] + sizes['test'] == 2225
  distinct = len(set(source.texts('all')))
  assert distinct < 2225  # the corpus repeats some articles; they must not straddle splits
  assert abs(len(set(source.texts('test'))) - 0.2 * distinct) < 1
  assert abs(len(set(source.texts('validation'))) - 0.1 * distinct) < 3
  assert source.class_names == list(text.BBC_CLASSES)
  counts = np.bincount(source.labels('all'))
  assert counts.tolist() == [510, 386, 417, 511, 401]
  for split, fraction in (('test', 0.2), ('validation', 0.1)):
    share = np.bincount(source.labels(split)) / counts
    assert np.all(np.abs(share - fraction) < 0.02), (split, share)
  texts = {s: set(source.texts(s)) for s in ('train', 'validation', 'test')}
  assert not texts['train'] & texts['test'] and not texts['validation'] & texts['test']
  assert source.texts('test') == text.BbcNewsSource().texts('test')  # seeded: the same split
  assert any('£' in t for t in source.texts('all'))  # the Windows-1252 file read as such


@pytest.fixture(scope='module')
def text_run(tmp_path_factory, folder):
  workdir = tmp_path_factory.mktemp('run') / 'w'
  config = text_config(folder, **{'model.pool': 'cls', 'total_steps': 40, 'optim.lr': 1e-3})
  train.run(config, str(workdir))
  return workdir


def _predict(*args):
  return subprocess.run([sys.executable, '-m', 'tljax.predict', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})


def test_predict_prints_class_names_for_texts_and_files(tmp_path, text_run):
  lines = tmp_path / 'texts.txt'
  lines.write_text(f"{' '.join(WORDS['money'])}\n\n{' '.join(WORDS['sport'])}\n")
  run = _predict('--workdir', str(text_run), '--text', ' '.join(WORDS['tech']),
                 '--file', str(lines), '--top_k', '1')
  assert run.returncode == 0, run.stderr
  out = run.stdout.splitlines()
  assert out[0].endswith('3 text(s)')
  predicted = [line.split()[-1] for line in out if line.startswith('  ')]
  assert predicted == ['tech', 'money', 'sport'], run.stdout  # the workdir's class names
  bad = tmp_path / 'bad.txt'
  bad.write_bytes(b'fine\ncaf\xe9\n')
  run = _predict('--workdir', str(text_run), '--file', str(bad))
  assert run.returncode == 2 and f'--file {bad}:2: bytes that are not UTF-8' in run.stderr
  run = _predict('--workdir', str(text_run), str(lines))
  assert run.returncode == 2 and 'is a text run' in run.stderr


def test_hf_export_loads_strictly_into_transformers_bert_with_the_same_token_states(
    tmp_path, text_run):
  import torch
  import transformers
  from safetensors import safe_open
  from safetensors.numpy import load_file
  from safetensors.torch import load_file as load_torch

  from tljax import export, saved_model
  out = str(tmp_path / 'encoder.safetensors')
  export.export(str(text_run), out, layout='hf')
  with safe_open(out, 'np') as f:
    hf_config = json.loads(f.metadata()['hf_config'])
  hf = transformers.BertModel(transformers.BertConfig(**hf_config), add_pooling_layer=True)
  hf.load_state_dict(load_torch(out), strict=True)
  hf.eval()
  model, variables, _ = saved_model.load(str(text_run))
  ids = _library_encoding(['goal match team', 'chip ' * 30], 24)
  ours = model.apply(variables, *(ids[k] for k in text.INPUT_KEYS), method=bert.Bert.encode)
  with torch.no_grad():
    theirs = hf(**{k: torch.from_numpy(v).long() for k, v in ids.items()})
  real = ids['attention_mask'].astype(bool)
  np.testing.assert_allclose(np.asarray(ours)[real], theirs.last_hidden_state.numpy()[real],
                             rtol=1e-4, atol=1e-4)
  assert 'classifier.weight' not in load_file(out)
  with pytest.raises(UserError, match='exports to'):
    export.export(str(text_run), str(tmp_path / 'x.safetensors'), layout='torchvision')


def test_valid_files_with_unusual_texts_are_read_as_written(tmp_path):
  """Line separators other than \\n inside a text, quoted line breaks and a text longer than
  Python's default CSV field limit: all are text, and later rows keep their line numbers."""
  odd = 'goal\u2028match\x0cteam\x85player'
  long = 'market ' * 40_000  # 280 kB in one field
  rows = [(odd, 'sport'), ('chip "quoted",\nnetwork', 'tech'), (long, 'money'), ('', 'tech')]
  for kind in ('csv', 'jsonl'):
    path = tmp_path / f'train.{kind}'
    write_split(path, rows, kind)
    with pytest.raises(DataError, match=rf'train\.{kind}:{6 if kind == "csv" else 4}: the text'):
      text.READERS[f'.{kind}'](str(path), 'text', 'label')  # the empty text: its true line
    write_split(path, rows[:3], kind)
    got = text.READERS[f'.{kind}'](str(path), 'text', 'label')
    assert [(t, y) for t, y, _ in got] == rows[:3]


def _tokenizer_with_ids_from(path, first_id):
  from tokenizers import Tokenizer, models, pre_tokenizers
  vocab = {'[PAD]': 0, '[UNK]': 1, **{w: first_id + i for i, w in
                                      enumerate(sorted({w for ws in WORDS.values() for w in ws}))}}
  tokenizer = Tokenizer(models.WordLevel(vocab, unk_token='[UNK]'))
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  tokenizer.save(str(path))
  return str(path)


def test_class_names_tokenizer_and_workdir_mismatches_are_refused_before_writing(
    tmp_path, folder):
  config = text_config(folder, **{'data.class_names': ('sport', 'tech', 'money', 'money'),
                                  'model.num_classes': 4})
  with pytest.raises(DataError, match="data.class_names holds 'money' more than once"):
    train.run(config, str(tmp_path / 'a'))
  config = text_config(folder, **{'data.source': 'bbc_news', 'data.path': None,
                                  'data.class_names': tuple('abcde'), 'model.num_classes': 5})
  with pytest.raises(DataError, match="source 'bbc_news' brings its own"):
    train.run(config, str(tmp_path / 'b'))
  tokenizer = _tokenizer_with_ids_from(tmp_path / 'big.json', 40_000)
  with pytest.raises(UserError, match=r'ids up to 40,023 but model .* embeds 30,522 tokens'):
    train.run(text_config(folder, **{'data.tokenizer': tokenizer}), str(tmp_path / 'c'))
  assert not any((tmp_path / n).exists() for n in 'abc')
  # A model of its own vocabulary trains with it from scratch.
  small = _tokenizer_with_ids_from(tmp_path / 'small.json', 2)
  results = train.run(text_config(folder, **{'data.tokenizer': small, 'model.vocab_size': 26,
                                             'total_steps': 2}), str(tmp_path / 'd'))
  assert results['final_step'] == 2


def test_resuming_on_relabelled_data_or_into_a_baseline_workdir_is_refused(tmp_path):
  root = text_folder(tmp_path / 'data')
  workdir = str(tmp_path / 'run')
  train.run(text_config(root, total_steps=3), workdir)
  for split in ('train', 'test'):
    path = os.path.join(root, f'{split}.csv')
    with open(path) as f:
      content = f.read().replace(',sport', ',athletics')
    with open(path, 'w') as f:
      f.write(content)
  before = snapshot(workdir)
  with pytest.raises(UserError, match=r"other classes than the data now has \(0: 'money' -> "
                                      r"'athletics'"):
    train.run(text_config(root, total_steps=6), workdir)
  assert snapshot(workdir) == before
  unfinished = tmp_path / 'unfinished'  # as a run killed before its end leaves it
  shutil.copytree(workdir, unfinished)
  os.remove(unfinished / 'results.json')
  before = snapshot(unfinished)
  with pytest.raises(UserError, match='holds a training run, not a tfidf_logreg baseline'):
    train.run(text_config(root, baseline='tfidf_logreg'), str(unfinished))
  assert snapshot(unfinished) == before

  fitted = str(tmp_path / 'tfidf')
  train.run(text_config(root, baseline='tfidf_logreg'), fitted)
  before = snapshot(fitted)
  with pytest.raises(UserError, match='holds a tfidf_logreg baseline, not a training run'):
    train.run(text_config(root), fitted)
  run = _predict('--workdir', fitted, '--text', 'goal match')
  assert run.returncode == 2 and 'holds a tfidf_logreg baseline' in run.stderr, run.stderr
  assert snapshot(fitted) == before


@pytest.mark.slow
def test_a_tfds_text_dataset_trains_by_name(tmp_path):
  """ag_news_subset through tfds.testing.mock_data (no download): its texts, class names and
  labels reach the run as TFDS gives them."""
  import tensorflow_datasets as tfds
  keys = {'data.source': 'tfds', 'data.name': 'ag_news_subset', 'data.text_key': 'description',
          'data.train_split': 'train', 'data.eval_split': 'test', 'model.num_classes': 4,
          'total_steps': 2}
  with tfds.testing.mock_data(num_examples=12):
    source = text.TfdsTextSource('ag_news_subset', None, 'description', 'label')
    expected = [(e['description'].decode(), int(e['label'])) for e in
                tfds.as_numpy(tfds.load('ag_news_subset', split='train'))]
    assert list(zip(source.texts('train'), source.labels('train').tolist(),
                    strict=True)) == expected
    results = train.run(text_config('', **keys), str(tmp_path / 'run'))
  assert source.class_names == ['World', 'Sports', 'Business', 'Sci/Tech']
  assert results['modality'] == 'text' and results['train_examples'] == 12
  record = json.loads((tmp_path / 'run' / 'model.json').read_text())
  assert record['class_names'] == source.class_names
