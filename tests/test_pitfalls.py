"""Data and config pitfalls a newcomer met: WebP files, train and eval geometry, optim.groups
from the command line, stage names against counts, total_steps raised on resume, and
TensorBoard after a resume."""

import numpy as np
import pytest
from helpers import image_folder

from tljax import resolve
from tljax.data import preprocess, sources
from tljax.data.tf_quiet import tf


def _stripes(height=24, width=96):
  """Left third red, middle green, right third blue."""
  image = np.zeros((height, width, 3), np.uint8)
  third = width // 3
  image[:, :third, 0] = image[:, third:2 * third, 1] = image[:, 2 * third:, 2] = 255
  return image


def _views(mode, augment):
  config = dict(image_size=16, resize_size=18, augment=augment, resize_mode=mode, channels=3,
                mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
  record = {'image': tf.constant(_stripes()), 'label': tf.constant(0)}
  same = lambda image, channels: image  # noqa: E731 (arrays need no decoding)
  decoded = preprocess.make_decode_fn(config, same)(record)['image'].numpy()
  train = preprocess.make_train_fn(config, same, seed=0)(tf.constant(3), record)['image']
  evaluated = preprocess.make_eval_fn(config, same)(record)['image']
  return decoded, train.numpy(), evaluated.numpy()


@pytest.mark.parametrize('mode', ['crop', 'squash'])
def test_training_and_evaluation_see_the_same_geometry(mode):
  decoded, train, evaluated = _views(mode, augment=False)
  np.testing.assert_allclose(train, evaluated, atol=1 / 255 + 1e-6)  # uint8 rounding apart
  colours = set(np.argmax(evaluated.reshape(-1, 3), axis=1).tolist())
  # 'crop' keeps the aspect ratio: the central square is the green middle only; 'squash'
  # keeps the whole width, all three stripes.
  assert colours == ({1} if mode == 'crop' else {0, 1, 2})


@pytest.mark.parametrize('mode, shape', [('crop', (18, 72, 3)), ('squash', (18, 18, 3))])
def test_augmented_training_crops_from_the_evaluation_resize(mode, shape):
  decoded, train, evaluated = _views(mode, augment=True)
  assert decoded.shape == shape  # what the random crop is taken from
  assert train.shape == evaluated.shape == (16, 16, 3)
  if mode == 'crop':  # a 16 px crop of an 18 x 72 image never sees more than two stripes
    assert len(set(np.argmax(train.reshape(-1, 3), axis=1).tolist())) <= 2


def test_resize_mode_is_checked():
  from tljax.config import ConfigError, base_config
  config = base_config()
  config.data.update(source='npz', resize_mode='stretch')
  with pytest.raises(ConfigError, match="data.resize_mode='stretch' must be 'crop'"):
    resolve.resolve_config(config)


def _webp_folder(root):
  from PIL import Image
  image_folder(root, {'red': (200, 30, 30), 'blue': (30, 30, 200)}, dict(train=4, test=2),
               size=24, suffix='webp')
  rgba = np.full((24, 30, 4), 255, np.uint8)
  rgba[..., :3] = (200, 30, 30)
  Image.fromarray(rgba).save(root / 'train' / 'red' / 'alpha.webp')
  (root / 'train' / 'blue' / 'scan.tif').write_bytes(b'II*\x00')
  return root


def test_webp_images_are_read_and_other_files_named(tmp_path, capsys):
  root = _webp_folder(tmp_path / 'photos')
  source = sources.FolderSource(str(root))
  assert len(source.labels('train')) == 9  # 4 + 4 WebP, and the RGBA one
  warning = capsys.readouterr().err
  assert "split 'train': 1 file(s) without an image extension" in warning
  assert 'scan.tif' in warning
  for channels in (3, 1):
    images = [source.decode(record['image'], channels).numpy()
              for record in source.records('train')]
    assert all(image.shape[-1] == channels for image in images)
    shapes = {image.shape[:2] for image in images}
    assert shapes == {(24, 24), (24, 30)}
  rgb = [source.decode(r['image'], 3).numpy() for r in source.records('train')]
  red = rgb[[i for i, r in enumerate(source.records('train'))
             if r['image'].numpy().endswith(b'alpha.webp')][0]]
  # The alpha channel dropped, not mixed in (lossy WebP: within a few levels).
  assert np.abs(red[0, 0].astype(int) - (200, 30, 30)).max() <= 6, red[0, 0]


def _lrs(workdir):
  import json
  lines = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return {m['step']: m['lr'] for m in lines if m['split'] == 'train'}


def test_raising_total_steps_on_resume_is_refused_and_the_named_fix_keeps_the_schedule(
    tmp_path):
  from helpers import array_source, small_config, snapshot

  from tljax import train
  from tljax.workdir import WorkdirError
  schedule = {'optim.schedule.name': 'cosine', 'optim.schedule.end_factor': 0.1,
              'log_every': 1}
  workdir = tmp_path / 'run'
  train.run(small_config(**schedule), str(workdir), source=array_source())
  before = snapshot(workdir)
  with pytest.raises(WorkdirError) as error:
    train.run(small_config(**schedule, total_steps=12), str(workdir), source=array_source())
  assert snapshot(workdir) == before  # refused before anything was written
  message = str(error.value)
  assert 'cosine schedule over 6 steps; this run would stretch it over 12' in message
  fix = message.split('add --config.')[1].split(';')[0]
  assert fix == 'optim.schedule.steps=6'
  results = train.run(small_config(**schedule, total_steps=12, **{'optim.schedule.steps': 6}),
                      str(workdir), source=array_source())
  assert results['final_step'] == 12 and results['resumed_from_step'] == 6
  lrs = _lrs(workdir)
  # Steps 1-6 as they were; after them the schedule's end value, no jump back up.
  assert all(lrs[step] == pytest.approx(0.1 * 0.1) for step in range(7, 13))
  assert all(lrs[a] >= lrs[b] for a, b in zip(range(1, 12), range(2, 13), strict=True))
  assert lrs[1] > 5 * lrs[12]  # it did decay over the first 6 steps


def test_a_constant_schedule_trains_on_without_the_key(tmp_path):
  from helpers import array_source, small_config

  from tljax import train
  constant = {'optim.schedule.name': 'constant'}
  workdir = tmp_path / 'run'
  train.run(small_config(**constant), str(workdir), source=array_source())
  results = train.run(small_config(**constant, total_steps=9), str(workdir),
                      source=array_source())
  assert results['final_step'] == 9


def test_optim_groups_from_the_command_line():
  from tljax import config as config_lib
  text = "[('stem/.*', None), ('head/.*', {'lr_mult': 10.0}), ('.*', {})]"
  config = config_lib.apply_overrides(config_lib.base_config(), [('optim.groups', text)])
  assert list(config.optim.groups) == [('stem/.*', None), ('head/.*', {'lr_mult': 10.0}),
                                       ('.*', {})]
  with pytest.raises(config_lib.ConfigError, match='a Python literal list is needed'):
    config_lib.apply_overrides(config_lib.base_config(), [('optim.groups', "[('stem/.*', None")])


def test_stage_presets_name_what_they_freeze():
  from tljax import freeze
  from tljax.models import get_entry
  line = freeze.preset_line('stages:7', get_entry('mobilenet_v2').stages, 'mobilenet_v2')
  assert 'frozen: stem, stage1, stage2, stage3, stage4, stage5, stage6;' in line
  assert line.endswith('trained: stage7, final, head')
  assert freeze.preset_line('full', get_entry('mobilenet_v2').stages, 'mobilenet_v2') is None
