"""The ELPV source (installed package and a generated folder in its format) and decoded caching."""

import collections
import importlib.util

import numpy as np
import pytest
from helpers import small_config
from PIL import Image

from tljax import config as config_lib
from tljax.data import pipeline, sources
from tljax.data.sources import DataError, ElpvSource, stratified_split

needs_elpv = pytest.mark.skipif(importlib.util.find_spec('elpv_dataset') is None,
                                reason='pip install elpv-dataset')


@needs_elpv
def test_installed_elpv_split_is_the_papers_75_25_stratified_and_fixed():
  source = ElpvSource()
  train, test = source.split_indices['train'], source.split_indices['test']
  assert (len(train), len(test)) == (1968, 656)
  assert not set(train) & set(test) and len(set(train) | set(test)) == 2624
  strata = collections.Counter(zip(source.all_labels, source.types, strict=True))
  in_test = collections.Counter(zip(source.all_labels[test], source.types[test], strict=True))
  for stratum, size in strata.items():
    assert abs(in_test[stratum] - size / 4) < 1, stratum
  assert np.array_equal(ElpvSource().split_indices['test'], test)
  assert sorted(set(source.labels('train').tolist())) == [0, 1, 2, 3]
  image = next(iter(source.records('test').take(1)))['image']
  decoded = source.decode(image, 1).numpy()
  assert decoded.shape == (300, 300, 1) and decoded.std() > 0
  # Validation (configs/elpv.py: 10%) is carved out of the 1,968, the 656 test cells untouched.
  held = sources.HeldOut(source, 'train', 0.1, seed=0)
  val_cells = set(train[held.indices[sources.HELD_OUT_SPLIT]])
  assert len(val_cells) == 197 and held.num_examples('train') == 1771
  assert val_cells <= set(train) and held.num_examples('test') == 656
  assert sorted(set(held.labels(sources.HELD_OUT_SPLIT).tolist())) == [0, 1, 2, 3]


def test_stratified_split_hits_the_exact_test_size():
  strata = np.array(['a'] * 7 + ['b'] * 7 + ['c'] * 6)
  train, test = stratified_split(strata, 0.25, seed=3)
  assert len(test) == 5 and len(train) == 15
  assert sorted(collections.Counter(strata[test]).values()) == [1, 2, 2]
  assert np.array_equal(test, stratified_split(strata, 0.25, seed=3)[1])


def _write_elpv(root, rows):
  (root / 'images').mkdir(parents=True)
  rng = np.random.default_rng(0)
  lines = []
  for i, (probability, kind) in enumerate(rows):
    name = f'images/cell{i:04d}.png'
    Image.fromarray(rng.integers(0, 255, (30, 30), dtype=np.uint8)).save(root / name)
    lines.append(f'{name}  {probability}  {kind}')
  (root / 'labels.csv').write_text('\n'.join(lines) + '\n')


def test_folder_in_elpv_format_reads_grades_and_types(tmp_path):
  rows = [(p, kind) for p in ('1.0', '0.6666666666666666', '0.3333333333333333', '0.0')
          for kind in ('mono', 'poly') for _ in range(4)]
  _write_elpv(tmp_path, rows)
  source = ElpvSource(str(tmp_path))
  assert source.labels('all').tolist() == [3] * 8 + [2] * 8 + [1] * 8 + [0] * 8
  assert source.num_examples('test') == 8 and source.num_examples('train') == 24
  assert sorted(collections.Counter(source.labels('test')).values()) == [2, 2, 2, 2]
  with pytest.raises(DataError, match="splits.*'validation'"):
    source.records('validation')


def test_bad_elpv_label_line_names_file_and_line(tmp_path):
  _write_elpv(tmp_path, [('0.0', 'mono'), ('0.5', 'poly')])
  with pytest.raises(DataError, match=r'labels\.csv:2:.*0\.5'):
    ElpvSource(str(tmp_path))
  with pytest.raises(DataError, match='labels.csv not found'):
    ElpvSource(str(tmp_path / 'images'))


def test_cached_decoding_gives_the_same_augmented_batches(tmp_path):
  _write_elpv(tmp_path, [(p, 'mono') for p in ('0.0', '1.0') for _ in range(12)])
  source = ElpvSource(str(tmp_path))
  batches = {}
  for cache in (False, True):
    config = config_lib.resolve(small_config(**{
        'data.augment': True, 'data.image_size': 16, 'data.resize_size': 20,
        'data.channels': 3, 'data.cache_decoded': cache, 'data.batch_size': 8}))
    stream = pipeline.train_batches(source, config.data, start_step=0, seed=1)
    batches[cache] = [next(stream) for _ in range(6)]  # past one epoch (18 examples)
  for uncached, cached in zip(batches[False], batches[True], strict=True):
    np.testing.assert_array_equal(uncached['image'], cached['image'])
    np.testing.assert_array_equal(uncached['label'], cached['label'])
  assert not np.array_equal(batches[True][0]['image'], batches[True][3]['image'])


def test_make_source_builds_elpv_from_data_path(tmp_path):
  _write_elpv(tmp_path, [('0.0', 'mono')] * 4)
  config = config_lib.resolve(small_config(**{'data.source': 'elpv', 'data.path': str(tmp_path)}))
  assert isinstance(sources.make_source(config.data), ElpvSource)
