"""Bad inputs: each gives one error naming the key, path or file at fault, and leaves an earlier
run's workdir (config, metrics, checkpoints, results) byte for byte as it was."""

import io
import os
import shutil
import struct
import zlib

import numpy as np
import pytest
from helpers import (
  array_source,
  as_nobody,
  make_arrays,
  small_config,
  snapshot,
  walkable_copy,
  write_npz,
)
from hostile_files import write_malicious
from PIL import Image

from tljax import train, workdir
from tljax.data.sources import DataError
from tljax.errors import UserError
from tljax.weights import zoo
from tljax.weights.errors import WeightsError


def _refused(run_dir, config, error=UserError, match=None, **kwargs) -> str:
  """Runs `config` in `run_dir`, expects `error`, checks nothing on disk changed; the message."""
  before = snapshot(run_dir)
  assert 'checkpoints/6/_CHECKPOINT_METADATA' in before
  with pytest.raises(error, match=match) as raised:
    train.run(config, str(run_dir), **kwargs)
  assert snapshot(run_dir) == before
  return str(raised.value)


def _image_bytes(fmt, seed=0):
  pixels = np.random.default_rng(seed).integers(0, 255, (20, 20, 3)).astype(np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format=fmt)
  return buffer.getvalue()


def _image_folder(root, per_class=6):
  for split, count in (('train', per_class), ('test', 2)):
    for name in ('cat', 'dog'):
      os.makedirs(root / split / name)
      for i in range(count):
        (root / split / name / f'{i}.png').write_bytes(_image_bytes('PNG', seed=i))
  return root


def _folder_config(path, **overrides):
  return small_config(**{'data.source': 'folder', 'data.path': str(path),
                         'model.num_classes': 2, 'data.eval_batch_size': 8, **overrides})


def _png_claiming(width, height, zlib_rows=False) -> bytes:
  """A PNG whose header claims width x height grayscale pixels. With `zlib_rows` its data really
  holds that many (zero) pixels, deflated to a few hundred KiB: a decompression bomb."""
  def chunk(kind, data):
    return (struct.pack('>I', len(data)) + kind + data
            + struct.pack('>I', zlib.crc32(kind + data) & 0xFFFFFFFF))
  data = b''
  if zlib_rows:
    compressor, row = zlib.compressobj(9), bytes(width + 1)
    data = b''.join(compressor.compress(row) for _ in range(height)) + compressor.flush()
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 0, 0,
                                                              0, 0))
          + chunk(b'IDAT', data) + chunk(b'IEND', b''))


def _damaged_png() -> bytes:
  damaged = bytearray(_image_bytes('PNG'))
  start = damaged.index(b'IDAT') + 10
  damaged[start:start + 40] = bytes(40)  # signature and IEND intact, pixel data broken
  return bytes(damaged)


def _bad_entry(kind, path):
  """Puts one unusable entry of `kind` at `path`; returns the reason the error must give."""
  if kind == 'truncated png':
    path.write_bytes(_image_bytes('PNG')[:300])
  elif kind == 'text named .jpg':
    path.write_bytes(b'not an image at all')
  elif kind == 'damaged inside its data':
    path.write_bytes(_damaged_png())
  elif kind == 'directory named .png':
    path.mkdir()
    return 'a directory, not an image file'
  elif kind == 'dangling symlink':
    path.symlink_to(path.parent / 'nowhere.png')
    return 'a dangling or looping symbolic link'
  elif kind == 'symlink loop':
    path.symlink_to(path)
    return 'a dangling or looping symbolic link'
  elif kind == 'fifo':
    os.mkfifo(path)
    return 'not a regular file'
  elif kind == '16000 x 16000 bomb':
    path.write_bytes(_png_claiming(16000, 16000, zlib_rows=True))
    assert path.stat().st_size < 1_000_000
    return '16000 x 16000 = 256,000,000 pixels, over data.max_image_pixels=100,000,000'
  elif kind == 'header claims 2**31 x 2**31':
    path.write_bytes(_png_claiming(2**31 - 1, 2**31 - 1))
    return 'pixels, over data.max_image_pixels'
  return 'cannot be decoded'


BAD_ENTRIES = ('truncated png', 'text named .jpg', 'damaged inside its data',
               'directory named .png', 'dangling symlink', 'symlink loop', 'fifo',
               '16000 x 16000 bomb', 'header claims 2**31 x 2**31')


@pytest.mark.parametrize('kind', BAD_ENTRIES)
def test_unusable_image_files_are_named_before_anything_is_written(earlier_run, tmp_path, kind):
  run_dir, _ = earlier_run
  folder = _image_folder(tmp_path / 'images')
  bad = folder / 'train' / 'dog' / ('x.jpg' if 'jpg' in kind else 'x.png')
  reason = _bad_entry(kind, bad)
  message = _refused(run_dir, _folder_config(folder), DataError)
  assert message.startswith(f"1 image file(s) of split 'train' cannot be used: {bad} ("), message
  assert reason in message and 'data.skip_corrupt_images=True' in message


def test_skip_corrupt_images_leaves_every_kind_out_and_counts_it(tmp_path):
  folder = _image_folder(tmp_path / 'images')
  for index, kind in enumerate(BAD_ENTRIES):
    _bad_entry(kind, folder / 'train' / ('cat', 'dog')[index % 2] / f'bad{index}.png')
  jpeg = _image_bytes('JPEG')
  (folder / 'test' / 'dog' / 'cut.jpg').write_bytes(jpeg[:len(jpeg) // 2])
  config = _folder_config(folder, **{'data.skip_corrupt_images': True})
  config.total_steps = 2
  results = train.run(config, str(tmp_path / 'run'))
  assert results['skipped_images'] == {'train': len(BAD_ENTRIES), 'test': 1}
  assert results['train_examples'] == 12 and results['eval']['examples'] == 4


def test_images_with_bytes_after_their_end_are_valid(tmp_path):
  """Validity is decided by decoding: data after PNG's IEND or JPEG's end marker is ignored by
  the decoders, as by every viewer."""
  folder = _image_folder(tmp_path / 'images')
  (folder / 'train' / 'cat' / 'trailer.png').write_bytes(_image_bytes('PNG', 7) + b'x' * 500)
  (folder / 'train' / 'dog' / 'trailer.jpg').write_bytes(_image_bytes('JPEG', 8) + b'\0' * 64)
  config = _folder_config(folder)
  config.total_steps = 2
  results = train.run(config, str(tmp_path / 'run'))
  assert results['train_examples'] == 14 and results['skipped_images'] == {}


def test_pixel_limit_is_a_config_key(earlier_run, tmp_path):
  run_dir, _ = earlier_run
  folder = _image_folder(tmp_path / 'images')
  message = _refused(run_dir, _folder_config(folder, **{'data.max_image_pixels': 399}),
                     DataError)
  assert '20 x 20 = 400 pixels, over data.max_image_pixels=399' in message


def test_a_class_folder_without_images_is_an_error(earlier_run, tmp_path):
  run_dir, _ = earlier_run
  folder = _image_folder(tmp_path / 'images')
  (folder / 'train' / 'bird').mkdir()
  (folder / 'train' / 'bird' / 'notes.txt').write_text('no images here')
  message = _refused(run_dir, _folder_config(folder, **{'model.num_classes': 3}), DataError)
  assert f'class folder {folder / "train" / "bird"} holds no image files' in message


def test_a_class_with_no_training_examples_is_an_error(earlier_run, tmp_path):
  run_dir, _ = earlier_run
  folder = _image_folder(tmp_path / 'images')
  (folder / 'test' / 'bird').mkdir()
  (folder / 'test' / 'bird' / '0.png').write_bytes(_image_bytes('PNG'))
  message = _refused(run_dir, _folder_config(folder, **{'model.num_classes': 3}), DataError)
  assert "class(es) ['bird'] have no examples in split 'train'" in message


def test_label_out_of_range(earlier_run, tmp_path):
  run_dir, _ = earlier_run
  images, labels = make_arrays(per_class=16, seed=0)
  labels[7] = 5
  data = tmp_path / 'bad_labels.npz'
  np.savez(data, train_images=images, train_labels=labels, test_images=images[:8],
           test_labels=labels[:8] % 3)
  message = _refused(run_dir, small_config(**{'data.path': str(data)}), DataError)
  assert ("label 5 of example 7 in split 'train' (data.train_split) is outside [0, 3) "
          '(model.num_classes)') in message


@pytest.mark.parametrize('label', [2**32 + 1, -2**32, -1])
def test_a_label_no_narrowing_may_turn_into_a_class(earlier_run, tmp_path, label):
  """Labels are checked before they are cast to int32, which would wrap 2**32 + 1 into 1."""
  run_dir, _ = earlier_run
  images, labels = make_arrays(per_class=16, seed=0)
  labels = labels.astype(np.int64 if label < 0 else np.uint64)
  labels[3] = label
  data = tmp_path / 'wide_labels.npz'
  np.savez(data, train_images=images, train_labels=labels, test_images=images[:8],
           test_labels=labels[:8] % 3)
  message = _refused(run_dir, small_config(**{'data.path': str(data)}), DataError)
  assert f"label {label} of example 3 in split 'train' is not a class id" in message


@pytest.mark.parametrize('split', ['train', 'test'])
def test_empty_split(earlier_run, tmp_path, split):
  run_dir, _ = earlier_run
  images, labels = make_arrays(per_class=16, seed=0)
  arrays = {'train_images': images, 'train_labels': labels, 'test_images': images,
            'test_labels': labels}
  arrays[f'{split}_images'], arrays[f'{split}_labels'] = images[:0], labels[:0]
  data = tmp_path / 'empty.npz'
  np.savez(data, **arrays)
  key = 'train_split' if split == 'train' else 'eval_split'
  _refused(run_dir, small_config(**{'data.path': str(data)}), DataError,
           match=f"split '{split}' \\(data.{key}\\) has no examples")


def test_batch_not_divisible_by_the_device_count(earlier_run):
  run_dir, data = earlier_run
  _refused(run_dir, small_config(**{'data.path': data, 'data.batch_size': 12}),
           match='data.batch_size=12 is not divisible by the 8 devices')


def test_num_classes_that_does_not_match_the_dataset(earlier_run, tmp_path):
  run_dir, _ = earlier_run
  folder = _image_folder(tmp_path / 'images')
  _refused(run_dir, _folder_config(folder, **{'model.num_classes': 3}), DataError,
           match=r'model.num_classes=3 but the dataset has 2 classes \(cat, dog\)')


def test_checkpoints_of_another_config_are_refused_then_moved_aside_with_fresh(earlier_run,
                                                                              tmp_path):
  earlier, data = earlier_run
  run_dir = tmp_path / 'run'
  shutil.copytree(earlier, run_dir)
  config = small_config(**{'data.path': data, 'optim.lr': 0.05, 'model.width': 8})
  message = _refused(run_dir, config, workdir.WorkdirError)
  assert 'model.width: 4 -> 8; optim.lr: 0.1 -> 0.05' in message and '--fresh' in message
  assert 'total_steps' not in message  # may change on resume

  before = snapshot(run_dir)
  train.run(config, str(run_dir), fresh=True)
  [moved] = [name for name in os.listdir(run_dir) if name.startswith('replaced-')]
  assert snapshot(run_dir / moved) == before  # the earlier run, every byte, one folder down
  assert sorted(os.listdir(run_dir / 'checkpoints')) == ['3', '6']


def _weights_file(tmp_path, kind):
  """One small stem kernel saved as `w.<kind>` (safetensors, pth or npz)."""
  from safetensors.numpy import save_file
  arrays = {'stem/conv/kernel': np.ones((3, 3, 3, 4), np.float32)}
  path = tmp_path / f'w.{kind}'
  if kind == 'safetensors':
    save_file(arrays, path)
  elif kind == 'pth':
    torch = pytest.importorskip('torch')
    torch.save({k: torch.ones(v.shape) for k, v in arrays.items()}, path)
  else:
    np.savez(path, **{k.replace('/', '.'): v for k, v in arrays.items()})
  return path


@pytest.mark.parametrize('kind,reason', [
    ('safetensors', 'not a readable safetensors file'),
    ('pth', 'truncated or corrupt zip archive'), ('npz', 'cannot be read as plain arrays')])
def test_truncated_pretrained_file(earlier_run, tmp_path, kind, reason):
  run_dir, data = earlier_run
  path = _weights_file(tmp_path, kind)
  path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
  message = _refused(run_dir, small_config(**{'data.path': data, 'init.pretrained': str(path)}),
                     WeightsError)
  assert message.startswith(f'{path}: {reason}'), message


def test_sha256_mismatch_fails_before_the_file_is_parsed(earlier_run, tmp_path, monkeypatch):
  run_dir, data = earlier_run
  path, marker = tmp_path / 'weights.pth', tmp_path / 'pwned'
  write_malicious(path, marker, zip_format=True)  # parsing it would be refused differently
  entry = zoo.ZooEntry('small_cnn', 'tljax', str(path), '0' * 64, 3, labels=None)
  monkeypatch.setitem(zoo.ZOO, 'small_cnn/test', entry)
  config = small_config(**{'data.path': data, 'init.pretrained': 'small_cnn/test'})
  message = _refused(run_dir, config, WeightsError)
  assert message.startswith(f'{path}: sha256 ') and 'does not match the expected 0000' in message
  assert not marker.exists()


def test_unwritable_workdir(earlier_run):
  """As `nobody` when run as root (permission bits do not stop root); the data in memory, as
  `nobody` cannot read the npz under pytest's tmp_path."""
  earlier, data = earlier_run
  source = array_source()  # the arrays write_npz saved
  with walkable_copy(earlier) as run_dir:
    os.chmod(run_dir, 0o555)
    before = snapshot(run_dir)
    with as_nobody(), pytest.raises(workdir.WorkdirError,
                                    match=f'workdir {run_dir!r} is not writable'):
      train.run(small_config(**{'data.path': data}), run_dir, source=source)
    assert snapshot(run_dir) == before


def test_keys_added_since_an_earlier_run_count_as_their_defaults():
  saved = {'optim': {'lr': 0.1}, 'data': {'path': 'a.npz'}}
  defaults = {'optim': {'lr': 0.01, 'grad_accum_steps': 1}, 'data': {'path': ''}}
  same = {'optim': {'lr': 0.1, 'grad_accum_steps': 1}, 'data': {'path': 'b.npz'}}
  assert workdir.config_differences(saved, same, workdir.RESUMABLE_CHANGES, defaults) == []
  changed = {'optim': {'lr': 0.1, 'grad_accum_steps': 2}, 'data': {'path': 'a.npz'}}
  assert workdir.config_differences(saved, changed, workdir.RESUMABLE_CHANGES, defaults) == [
      'optim.grad_accum_steps: 1 -> 2']


# Values no run can use sensibly: each refused with its key before anything is written.
NONSENSE = [
    ('optim.lr', -0.1, 'optim.lr=-0.1 must be a number >= 0'),
    ('optim.lr', float('nan'), 'optim.lr=nan must be a number >= 0'),
    ('optim.momentum', 1.5, 'optim.momentum=1.5 must be a number in [0, 1)'),
    ('optim.label_smoothing', 1.0, 'optim.label_smoothing=1.0 must be a number in [0, 1)'),
    ('optim.clip_norm', 0.0, 'optim.clip_norm=0.0 must be None or a number > 0'),
    ('optim.schedule.warmup_steps', -5, 'optim.schedule.warmup_steps=-5 must be an integer'),
    ('optim.schedule.boundaries', (0.75, 0.5), 'increasing fractions'),
    ('data.examples_per_class', 0, 'data.examples_per_class=0 must be None or an integer >= 1'),
    ('data.examples_per_class', -2, 'data.examples_per_class=-2 must be None or an integer'),
    ('data.batch_size', 0, 'data.batch_size=0 must be an integer >= 1'),
    ('data.batch_size', True, 'data.batch_size=True must be an integer >= 1'),
    ('data.image_size', 0, 'data.image_size=0 must be an integer >= 1'),
    ('data.image_size', -16, 'data.image_size=-16 must be an integer >= 1'),
    ('data.resize_size', 8, 'data.resize_size=8 must be at least data.image_size=16'),
    ('data.channels', 2, 'data.channels=2 must be 1 (grayscale) or 3 (RGB)'),
    ('data.channels', 1, 'data.channels=1 needs data.mean and data.std with 1 value(s) each'),
    ('data.mean', (0.5, 0.5), 'data.mean=(0.5, 0.5) has 2 value(s) but data.channels=3'),
    ('data.std', (0.2, 0.0, 0.2), 'data.std=(0.2, 0.0, 0.2) must be positive'),
    ('data.max_image_pixels', 0, 'data.max_image_pixels=0 must be an integer >= 1'),
    ('data.classes', (0, 0), 'data.classes=(0, 0) must be distinct class ids >= 0'),
    ('eval_every', -1, 'eval_every=-1 must be an integer >= 0'),
    ('log_every', 0, 'log_every=0 must be an integer >= 1'),
    ('checkpoint_every', 0, 'checkpoint_every=0 must be an integer >= 1'),
    ('keep_checkpoints', 0, 'keep_checkpoints=0 must be an integer >= 1'),
    ('keep_checkpoints', -1, 'keep_checkpoints=-1 must be an integer >= 1'),
    ('total_steps', 0, 'total_steps=0 must be an integer in [1, 2147483647]'),
    ('total_steps', -3, 'total_steps=-3 must be an integer in [1, 2147483647]'),
    ('total_steps', 2**31, 'total_steps=2147483648 must be an integer in [1, 2147483647]'),
    ('total_epochs', 0.0, 'total_epochs=0.0 must be None or a number > 0'),
    ('seed', -1, 'seed=-1 must be an integer in [0, 2147483647]'),
    ('model.num_classes', 1, 'model.num_classes=1 must be an integer >= 2'),
    ('init.dont_load', ('[unclosed',), "init.dont_load[0]='[unclosed' is not a regex"),
    ('optim.groups', [('stem/.*', {'lr_mult': -1.0}), ('.*', {})],
     "optim.groups[0] ('stem/.*'): lr_mult=-1.0 must be a number >= 0"),
    ('data.std', (float('inf'), 1.0, 1.0), 'data.std=(inf, 1.0, 1.0) must be finite numbers'),
    ('data.mean', (0.5, float('nan'), 0.5), 'data.mean=(0.5, nan, 0.5) must be finite'),
    ('data.source', 'tfds', "data.source='tfds' needs data.name"),
    ('data.classes', (0, 7, 1), "class(es) ['7'] have no examples in split 'train'"),
]


@pytest.mark.parametrize('key,value,message', NONSENSE,
                         ids=[f'{k}={v!r}' for k, v, _ in NONSENSE])
def test_nonsense_values_are_refused_with_their_key(earlier_run, key, value, message):
  run_dir, data = earlier_run
  config = small_config(**{'data.path': data})
  *parents, leaf = key.split('.')
  node = config
  for part in parents:
    node = node[part]
  with node.unlocked():
    node[leaf] = value
  assert message in _refused(run_dir, config)


def _copy_of(earlier, tmp_path):
  run_dir = tmp_path / 'run'
  shutil.copytree(earlier, run_dir)
  return run_dir


def _invalid_utf8(run_dir):
  with open(run_dir / 'metrics.jsonl', 'ab') as f:
    f.write(b'{"step": 7, "split": "train", "loss": "\xff\xfe"}\n')


def _replace_with_directory(name):
  def damage(run_dir):
    path = run_dir / name
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    path.mkdir()
    (path / 'keep').write_text('')  # a snapshot sees the directory
  return damage


def _replace_with_file(name):
  def damage(run_dir):
    shutil.rmtree(run_dir / name)
    (run_dir / name).write_text('not a directory')
  return damage


def _cut_results(run_dir):
  text = (run_dir / 'results.json').read_text()
  (run_dir / 'results.json').write_text(text[:len(text) // 2])


WORKDIR_DAMAGE = [
    ('metrics.jsonl with invalid UTF-8', _invalid_utf8, 'metrics.jsonl:5 is damaged'),
    ('metrics.jsonl as a directory', _replace_with_directory('metrics.jsonl'),
     'metrics.jsonl is not a regular file'),
    ('results.json as a directory', _replace_with_directory('results.json'),
     'results.json is not a regular file'),
    ('results.json cut short', _cut_results, 'results.json is damaged'),
    ('config.json as a directory', _replace_with_directory('config.json'),
     'config.json is not a regular file'),
    ('checkpoints as a file', _replace_with_file('checkpoints'),
     'checkpoints is not a directory'),
]


@pytest.mark.parametrize('name,damage,message', WORKDIR_DAMAGE,
                         ids=[name for name, _, _ in WORKDIR_DAMAGE])
def test_a_damaged_workdir_file_is_named_and_left_as_it_is(earlier_run, tmp_path, name, damage,
                                                          message):
  earlier, data = earlier_run
  run_dir = _copy_of(earlier, tmp_path)
  damage(run_dir)
  before = snapshot(run_dir)
  config = small_config(**{'data.path': data, 'total_steps': 9})
  with pytest.raises(UserError) as raised:
    train.run(config, str(run_dir))
  assert message in str(raised.value) and str(run_dir) in str(raised.value)
  assert snapshot(run_dir) == before


def test_config_files_with_odd_values_are_one_error_or_read_as_meant():
  """A section given as None or a scalar, a value of the wrong type, NumPy scalars, and a
  section set by a dict (only the keys it names change)."""
  import ml_collections

  from tljax import config as config_lib
  with pytest.raises(config_lib.ConfigError, match="config key 'model' must be a section"):
    config_lib.resolve(ml_collections.ConfigDict({'model': None}))
  with pytest.raises(config_lib.ConfigError,
                     match="config key total_steps='six' must be of type int"):
    config_lib.resolve(small_config(**{'total_steps': 100}).copy_and_resolve_references()
                       .to_dict() | {'total_steps': 'six'})
  config = small_config().to_dict()
  config['optim']['lr'], config['seed'] = np.float32(0.5), np.int64(3)
  resolved = config_lib.resolve(ml_collections.ConfigDict(config))
  assert resolved.optim.lr == 0.5 and type(resolved.seed) is int
  config_lib.set_override(resolved, 'optim', {'name': 'adam'})
  assert resolved.optim.name == 'adam' and resolved.optim.lr == 0.5
  assert resolved.optim.groups[0][0] == 'stem/.*'  # the file's frozen stem kept
  with pytest.raises(config_lib.ConfigError, match="unknown config key 'optim.lrr'"):
    config_lib.set_override(resolved, 'optim', {'lrr': 1.0})
  config_lib.set_override(resolved, 'eval_groupings.pair', ((0, 1), (2,)))  # free-form keys
  assert resolved.eval_groupings.pair == ((0, 1), (2,))


def test_hidden_folders_are_not_splits_or_classes_and_a_file_is_not_a_folder(tmp_path):
  from PIL import Image

  from tljax.data import sources
  for split in ('train', 'test', '__MACOSX/train', '.git'):
    for name in ('a', 'b', '.ipynb_checkpoints'):
      (tmp_path / split / name).mkdir(parents=True)
      Image.new('RGB', (4, 4)).save(tmp_path / split / name / '0.png')
  assert sources.FolderSource(str(tmp_path)).class_names == ['a', 'b']
  (tmp_path / 'file').write_text('x')
  with pytest.raises(sources.DataError, match="'.*file' \\(data.path\\) is not a directory"):
    sources.FolderSource(str(tmp_path / 'file'))


def test_a_bmp_decodes_to_one_channel_like_any_other_format(tmp_path):
  from PIL import Image

  from tljax.data import image_files
  from tljax.data.tf_quiet import tf
  pixels = np.random.default_rng(0).integers(0, 255, (6, 5, 3)).astype(np.uint8)
  Image.fromarray(pixels).save(tmp_path / 'cell.bmp')
  Image.fromarray(pixels).save(tmp_path / 'cell.png')
  gray = [image_files.decode(tf.io.read_file(str(tmp_path / name)), 1).numpy()
          for name in ('cell.bmp', 'cell.png')]
  assert gray[0].shape == gray[1].shape == (6, 5, 1)  # the same gray, up to rounding
  assert np.abs(gray[0].astype(int) - gray[1].astype(int)).max() <= 1


def test_a_warmup_longer_than_the_run_is_said(tmp_path, capsys):
  from tljax import train
  data = write_npz(tmp_path / 'data.npz')
  train.run(small_config(**{'data.path': data, 'optim.schedule.warmup_steps': 10**6}),
            str(tmp_path / 'run'))
  assert ("warning: optim.schedule.warmup_steps=1000000 is not below the run's 6 steps"
          in capsys.readouterr().err)
