"""Test set-up: 8 simulated CPU devices (before JAX's backend starts) and small data helpers."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tljax.config import base_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_arrays(num_classes: int = 3, per_class: int = 16, size: int = 16, seed: int = 0):
  """Class-dependent uint8 images (a learnable signal) and their labels."""
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(num_classes), per_class).astype(np.int32)
  rng.shuffle(labels)
  images = rng.integers(0, 64, (len(labels), size, size, 3)).astype(np.uint8)
  for c in range(num_classes):
    images[labels == c, :, :, c % 3] += np.uint8(120)
  return images, labels


def write_npz(path, num_classes: int = 3, train_per_class: int = 16, test_per_class: int = 5,
              seed: int = 0) -> str:
  """Writes train/test splits of `make_arrays` to the .npz `path` (an ArraySource layout)."""
  train = make_arrays(num_classes, train_per_class, seed=seed)
  test = make_arrays(num_classes, test_per_class, seed=seed + 1)
  np.savez(path, train_images=train[0], train_labels=train[1], test_images=test[0],
           test_labels=test[1])
  return str(path)


@pytest.fixture
def npz_path(tmp_path):
  """An .npz with train/test splits, for subprocess runs that cannot share in-memory arrays."""
  return write_npz(tmp_path / 'data.npz')


def small_config(**overrides):
  """A small CNN config over arrays: frozen stem, everything else trainable."""
  c = base_config()
  c.model = dict(name='small_cnn', num_classes=3, width=4)
  c.data.update(source='npz', image_size=16, augment=False, batch_size=16, eval_batch_size=16)
  c.optim.update(name='sgd', lr=0.1, momentum=0.9,
                 groups=[('stem/.*', None), ('.*', {})])
  c.total_steps, c.log_every, c.checkpoint_every = 6, 2, 3
  for key, value in overrides.items():
    target = c
    *parents, leaf = key.split('.')
    for p in parents:
      target = target[p]
    target[leaf] = value
  return c


def snapshot(directory) -> dict[str, bytes]:
  """Every file under `directory` (relative path -> bytes): equal snapshots mean untouched."""
  return {os.path.relpath(os.path.join(root, name), directory):
          open(os.path.join(root, name), 'rb').read()  # noqa: SIM115
          for root, _, names in os.walk(directory) for name in names}


def image_folder(root, classes, counts, size=20, suffix='png', spread=25):
  """`root/<split>/<class>/<i>.<suffix>`: each class a colour (`classes`: name -> RGB) with
  Gaussian noise, `counts` (split -> images per class), seeded."""
  from PIL import Image
  rng = np.random.default_rng(0)
  for split, count in counts.items():
    for name, colour in classes.items():
      folder = root / split / name
      folder.mkdir(parents=True)
      for i in range(count):
        pixels = np.clip(rng.normal(colour, spread, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f'{i}.{suffix}')
  return root
