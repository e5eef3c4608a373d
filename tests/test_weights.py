"""Pretrained weights: safe readers, real weights on real photos, errors, zoo, round trip."""

import numpy as np
import pytest
from helpers import small_config, write_npz

import tljax
from tljax import build, resolve, train
from tljax.errors import UserError
from tljax.freeze import flat_paths
from tljax.models import mobilenet_v2
from tljax.predict import Predictor, imagenet_classes, predict
from tljax.weights import load, read, zoo
from tljax.weights.errors import WeightsError

CATS = {'tabby, tabby cat', 'tiger cat', 'Persian cat', 'Siamese cat, Siamese', 'Egyptian cat'}
COFFEE = {'espresso', 'cup', 'coffee mug'}


@pytest.mark.parametrize('zip_format', [True, False])
def test_torch_reader_matches_torch_without_importing_it(tmp_path, zip_format):
  torch = pytest.importorskip('torch')
  gen = torch.Generator().manual_seed(0)
  base = torch.randn(6, 4, 3, 3, generator=gen)
  state = {
      'conv.weight': base,
      'transposed': base[:, :, 0, 0].t(),  # non-contiguous view of the same storage
      'slice': base[2:4],  # storage offset
      'half': torch.randn(5, generator=gen).half(),
      'bf16': torch.randn(3, 2, generator=gen).bfloat16(),
      'steps': torch.tensor(7),
      'nested': {'bias': torch.arange(4, dtype=torch.int32)},
  }
  path = tmp_path / 'state.pth'
  torch.save(state, path, _use_new_zipfile_serialization=zip_format)
  flat = read.read_file(str(path))
  expected = {'conv/weight': base, 'transposed': state['transposed'], 'slice': state['slice'],
              'half': state['half'], 'bf16': state['bf16'], 'steps': state['steps'],
              'nested/bias': state['nested']['bias']}
  assert set(flat) == set(expected)
  for key, tensor in expected.items():
    ref = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
    np.testing.assert_array_equal(np.asarray(flat[key], ref.dtype), ref, err_msg=key)
    assert flat[key].shape == ref.shape


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
  from PIL import Image
  from skimage import data
  folder = tmp_path_factory.mktemp('photos')
  Image.fromarray(data.chelsea()).save(folder / 'chelsea.png')
  Image.fromarray(data.coffee()).save(folder / 'coffee.jpg', quality=95)
  return [str(folder / 'chelsea.png'), str(folder / 'coffee.jpg')]


@pytest.mark.parametrize('source', ['mobilenet_v2/imagenet', 'efficientnet_lite0/imagenet'])
def test_real_weights_classify_real_photos(source, photos):
  cat, coffee = predict(Predictor.from_zoo(source), photos)
  assert cat[0][0] in CATS, cat
  assert coffee[0][0] in COFFEE, coffee
  assert len(imagenet_classes()) == 1000


def test_missing_mismatched_and_unexpected_keys_in_one_line():
  flat = read.read_file(zoo.fetch('mobilenet_v2/imagenet'))
  del flat['features/3/conv/1/0/weight']
  flat['classifier/1/weight'] = np.zeros((10, 1280), np.float32)
  flat['extra/weight'] = np.zeros(3, np.float32)
  model, fresh = tljax.create('mobilenet_v2', num_classes=1000, image_size=32)
  with pytest.raises(WeightsError) as error:
    load.merge(fresh, mobilenet_v2.from_torchvision(flat))
  message = str(error.value)
  assert '\n' not in message
  assert 'missing (1): params/stage2/block1/dw_conv/kernel;' in message
  assert ('mismatched (1): params/head/kernel: checkpoint (1280, 10) vs model (1280, 1000);'
          in message)
  assert 'unexpected (1): unconverted/extra/weight.' in message


def test_zoo_package_files_match_their_pinned_sha256():
  checked = []
  for name, entry in zoo.ZOO.items():
    if entry.where.startswith('package:'):
      assert len(entry.sha256) == 64, name
      read.verify_sha256(zoo.locate(entry.where), entry.sha256)  # raises on mismatch
      checked.append(name)
  assert {'mobilenet_v2/imagenet', 'efficientnet_lite0/imagenet',
          'minilm_l6/all-v2'} <= set(checked), checked


@pytest.mark.slow  # two runs
def test_workdir_round_trip_into_a_task_with_other_classes(tmp_path, npz_path):
  source = small_config(**{'data.path': npz_path})
  train.run(source, str(tmp_path / 'source'))
  trained = read.read_tljax_workdir(str(tmp_path / 'source'))

  five = write_npz(tmp_path / 'five.npz', num_classes=5, seed=2)  # another task
  target = small_config(**{'data.path': five, 'model.num_classes': 5})
  target.init.update(pretrained=str(tmp_path / 'source'), dont_load=['head/.*'])
  from tljax.config import resolve
  built = build.build(resolve(target))
  loaded = flat_paths({'params': built.params, 'batch_stats': built.batch_stats})
  assert loaded['params/head/kernel'].shape[-1] == 5
  assert not np.any(loaded['params/head/kernel'])  # a fresh zero head
  for path, value in trained.items():
    if not path.startswith('params/head/'):
      np.testing.assert_array_equal(loaded[path], value, err_msg=path)
  results = train.run(target, str(tmp_path / 'target'))
  assert results['final_step'] == target.total_steps


def test_unknown_layout_names_the_choices(tmp_path):
  path = tmp_path / 'w.safetensors'
  from safetensors.numpy import save_file
  save_file({'fc.weight': np.zeros((2, 2), np.float32)}, str(path))
  model, fresh = tljax.create('resnet18', num_classes=2, image_size=32)
  with pytest.raises(WeightsError, match=r"init.layout=None .* converts from \['hf', 'timm', "
                                         r"'torchvision'\]"):
    load.load_pretrained(str(path), 'resnet18', model, fresh)


def test_a_zoo_source_brings_its_normalisation_and_checks_the_model_name():
  from tljax.config import base_config
  config = base_config()
  config.model = dict(name='efficientnet_lite0', num_classes=4)
  config.init.pretrained = 'efficientnet_lite0/imagenet'
  resolved = resolve.resolve_config(config, source_given=True)
  assert tuple(resolved.data.mean) == zoo.TF_MEAN and tuple(resolved.data.std) == zoo.TF_STD
  config.model.name = 'mobilenet_v2'
  with pytest.raises(UserError, match="holds 'efficientnet_lite0' weights but model.name is"):
    resolve.resolve_config(config, source_given=True)


def test_downloads_are_cached_by_the_whole_url_and_a_failed_one_is_one_error(tmp_path,
                                                                             monkeypatch):
  monkeypatch.setattr(zoo, 'CACHE', str(tmp_path / 'cache'))
  for name, content in (('a', b'first'), ('b', b'second')):
    (tmp_path / name).mkdir()
    (tmp_path / name / 'model.npz').write_bytes(content)
  first = zoo._download(f'file://{tmp_path}/a/model.npz')
  second = zoo._download(f'file://{tmp_path}/b/model.npz')  # same file name, other URL
  assert open(first, 'rb').read() == b'first' and open(second, 'rb').read() == b'second'
  with pytest.raises(WeightsError, match=r'https://127.0.0.1:1/x.pth: cannot download it '
                                         r'\(URLError'):
    zoo._download('https://127.0.0.1:1/x.pth')
  assert not [p for p in (tmp_path / 'cache').rglob('*') if p.suffix == '.partial']


def test_a_vit_refuses_images_that_are_not_whole_patches():
  with pytest.raises(UserError, match=r'images of 8x8 are not whole 16x16 patches'):
    tljax.create('vit_b16', num_classes=2, image_size=8)


def test_weights_that_are_integers_or_not_finite_are_named_not_loaded():
  model, fresh = tljax.create('small_cnn', num_classes=3, image_size=16)
  flat = {k: np.asarray(v) for k, v in flat_paths(fresh).items()}
  flat['params/head/kernel'] = flat['params/head/kernel'].astype(np.int64)
  bias = flat['params/head/bias'].copy()
  bias[1] = np.nan
  flat['params/head/bias'] = bias
  with pytest.raises(WeightsError) as error:
    load.merge(fresh, flat)
  message = str(error.value)
  assert 'params/head/kernel: checkpoint int64 for a float32 variable' in message
  assert 'params/head/bias: checkpoint holds 1 NaN/Inf values' in message


def test_a_legitimately_expanded_torch_tensor_reads_and_odd_dtypes_are_named(tmp_path):
  torch = pytest.importorskip('torch')
  expanded = torch.arange(3, dtype=torch.float32).expand(4, 3)  # stride 0: 3 stored, 12 held
  torch.save({'w': expanded}, tmp_path / 'expanded.pth')
  read_back = read.read_file(str(tmp_path / 'expanded.pth'))['w']
  np.testing.assert_array_equal(read_back, np.tile(np.arange(3, dtype=np.float32), (4, 1)))
  torch.save({'w': torch.zeros(2, dtype=torch.uint16)}, tmp_path / 'uint16.pth')
  with pytest.raises(WeightsError, match='holds tensors of a dtype tljax does not read'):
    read.read_file(str(tmp_path / 'uint16.pth'))
  from safetensors.numpy import save_file
  save_file({}, str(tmp_path / 'empty.safetensors'))
  with pytest.raises(WeightsError, match='empty.safetensors: holds no tensors'):
    read.read_file(str(tmp_path / 'empty.safetensors'))
