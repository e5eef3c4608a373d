"""Bad inputs: each gives one error naming the key, path or file at fault, and leaves an earlier
run's workdir (config, metrics, checkpoints, results) byte for byte as it was."""

import io
import os
import shutil
import tempfile

import numpy as np
import pytest
from conftest import make_arrays, small_config, snapshot
from PIL import Image

from tljax import train, workdir
from tljax.data.sources import DataError
from tljax.errors import UserError
from tljax.weights import zoo
from tljax.weights.errors import WeightsError


@pytest.fixture(scope='module')
def earlier_run(tmp_path_factory):
  """A finished 6-step run (checkpoints 3 and 6) and the npz it trained on."""
  root = tmp_path_factory.mktemp('earlier')
  data = root / 'data.npz'
  train_arrays, test_arrays = make_arrays(per_class=16, seed=0), make_arrays(per_class=5, seed=1)
  np.savez(data, train_images=train_arrays[0], train_labels=train_arrays[1],
           test_images=test_arrays[0], test_labels=test_arrays[1])
  train.run(small_config(**{'data.path': str(data)}), str(root / 'run'))
  return root / 'run', str(data)


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


def test_truncated_and_foreign_images_are_named_before_anything_is_written(earlier_run,
                                                                            tmp_path):
  run_dir, _ = earlier_run
  folder = _image_folder(tmp_path / 'images')
  truncated = folder / 'train' / 'cat' / 'truncated.png'
  truncated.write_bytes(_image_bytes('PNG')[:300])
  foreign = folder / 'train' / 'dog' / 'notes.jpg'
  foreign.write_bytes(b'not an image at all')
  message = _refused(run_dir, _folder_config(folder), DataError)
  assert f'2 image file(s) of split \'train\' are corrupt or truncated: {truncated}' in message
  assert str(foreign) in message and 'data.skip_corrupt_images=True' in message


def test_skip_corrupt_images_leaves_them_out_and_counts_them(tmp_path):
  folder = _image_folder(tmp_path / 'images')
  (folder / 'train' / 'cat' / 'truncated.png').write_bytes(_image_bytes('PNG')[:300])
  jpeg = _image_bytes('JPEG')
  (folder / 'test' / 'dog' / 'cut.jpg').write_bytes(jpeg[:len(jpeg) // 2])
  config = _folder_config(folder, **{'data.skip_corrupt_images': True})
  config.total_steps = 2
  results = train.run(config, str(tmp_path / 'run'))
  assert results['skipped_images'] == {'train': 1, 'test': 1}
  assert results['train_examples'] == 12 and results['eval']['examples'] == 4


def test_damage_inside_a_well_formed_image_is_named_when_training_meets_it(tmp_path):
  folder = _image_folder(tmp_path / 'images', per_class=8)
  damaged = bytearray(_image_bytes('PNG'))
  start = damaged.index(b'IDAT') + 10
  damaged[start:start + 40] = bytes(40)  # signature and IEND intact, pixel data broken
  path = folder / 'train' / 'dog' / 'damaged.png'
  path.write_bytes(bytes(damaged))
  with pytest.raises(DataError, match=f'1 image file.* corrupt or truncated: {path}'):
    train.run(_folder_config(folder), str(tmp_path / 'run'))


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


def _weights_files(tmp_path):
  import torch
  from safetensors.numpy import save_file
  arrays = {'stem/conv/kernel': np.ones((3, 3, 3, 4), np.float32)}
  save_file(arrays, tmp_path / 'w.safetensors')
  torch.save({k: torch.ones(v.shape) for k, v in arrays.items()}, tmp_path / 'w.pth')
  np.savez(tmp_path / 'w.npz', **{k.replace('/', '.'): v for k, v in arrays.items()})
  return [tmp_path / f'w.{suffix}' for suffix in ('safetensors', 'pth', 'npz')]


@pytest.mark.parametrize('kind', ['safetensors', 'pth', 'npz'])
def test_truncated_pretrained_file(earlier_run, tmp_path, kind):
  run_dir, data = earlier_run
  [path] = [p for p in _weights_files(tmp_path) if p.suffix == f'.{kind}']
  path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
  message = _refused(run_dir, small_config(**{'data.path': data, 'init.pretrained': str(path)}),
                     WeightsError)
  assert message.startswith(f'{path}: ')
  assert 'truncated' in message or 'not a readable' in message


def test_sha256_mismatch(earlier_run, tmp_path, monkeypatch):
  run_dir, data = earlier_run
  [path] = [p for p in _weights_files(tmp_path) if p.suffix == '.npz']
  entry = zoo.ZooEntry('small_cnn', 'tljax', str(path), '0' * 64, 3, labels=None)
  monkeypatch.setitem(zoo.ZOO, 'small_cnn/test', entry)
  config = small_config(**{'data.path': data, 'init.pretrained': 'small_cnn/test'})
  message = _refused(run_dir, config, WeightsError)
  assert f'{path}: sha256 ' in message and 'does not match the expected 0000' in message


def test_unwritable_workdir(earlier_run):
  """Permission bits do not stop root, so as root the run switches to the `nobody` user."""
  earlier, data = earlier_run
  base = tempfile.mkdtemp()  # /tmp: a path `nobody` can walk
  run_dir = os.path.join(base, 'run')
  shutil.copytree(earlier, run_dir)
  os.chmod(base, 0o755)
  os.chmod(run_dir, 0o555)
  before = snapshot(run_dir)
  arrays = np.load(data)
  source = train.sources.ArraySource({
      'train': (arrays['train_images'], arrays['train_labels']),
      'test': (arrays['test_images'], arrays['test_labels'])})
  as_root = os.geteuid() == 0
  try:
    if as_root:
      os.seteuid(65534)
    with pytest.raises(workdir.WorkdirError, match=f'workdir {run_dir!r} is not writable'):
      train.run(small_config(**{'data.path': data}), run_dir, source=source)
  finally:
    if as_root:
      os.seteuid(0)
    os.chmod(run_dir, 0o755)
  assert snapshot(run_dir) == before
  shutil.rmtree(base)


def test_keys_added_since_an_earlier_run_count_as_their_defaults():
  saved = {'optim': {'lr': 0.1}, 'data': {'path': 'a.npz'}}
  defaults = {'optim': {'lr': 0.01, 'grad_accum_steps': 1}, 'data': {'path': ''}}
  same = {'optim': {'lr': 0.1, 'grad_accum_steps': 1}, 'data': {'path': 'b.npz'}}
  assert workdir.config_differences(saved, same, workdir.RESUMABLE_CHANGES, defaults) == []
  changed = {'optim': {'lr': 0.1, 'grad_accum_steps': 2}, 'data': {'path': 'a.npz'}}
  assert workdir.config_differences(saved, changed, workdir.RESUMABLE_CHANGES, defaults) == [
      'optim.grad_accum_steps: 1 -> 2']
