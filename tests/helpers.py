"""Plain helpers the tests share: small data, a small config, a finished run, directory
snapshots, acting as `nobody`. Not fixtures (those are in conftest.py).

Nothing here imports jax, or tljax beyond its config, at module level: conftest.py sets the
simulated devices before jax's backend starts, and imports this module only after that."""

import contextlib
import os
import shutil
import tempfile

import numpy as np

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


def array_source():
  """An in-memory ArraySource of `make_arrays`: 3 classes, 16 training and 5 test images each
  (what `write_npz` writes)."""
  from tljax.data.sources import ArraySource
  return ArraySource({'train': make_arrays(per_class=16, seed=0),
                      'test': make_arrays(per_class=5, seed=1)})


def write_npz(path, num_classes: int = 3, train_per_class: int = 16, test_per_class: int = 5,
              seed: int = 0) -> str:
  """Writes train/test splits of `make_arrays` to the .npz `path` (an ArraySource layout)."""
  train = make_arrays(num_classes, train_per_class, seed=seed)
  test = make_arrays(num_classes, test_per_class, seed=seed + 1)
  np.savez(path, train_images=train[0], train_labels=train[1], test_images=test[0],
           test_labels=test[1])
  return str(path)


def small_config(**overrides):
  """A small CNN config over arrays: frozen stem, everything else trainable."""
  from tljax.config import base_config
  c = base_config()
  c.model = dict(name='small_cnn', num_classes=3, width=4)
  c.data.update(source='npz', image_size=16, augment=False, batch_size=16, eval_batch_size=16)
  c.optim.update(name='sgd', lr=0.1, momentum=0.9,
                 groups=[('stem/.*', None), ('.*', {})])
  c.total_steps, c.log_every, c.checkpoint_every = 6, 2, 3
  return set_keys(c, overrides)


def set_keys(config, overrides):
  """`config` with each dotted key of `overrides` set (parents must exist)."""
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split('.')
    for part in parents:
      target = target[part]
    target[leaf] = value
  return config


def step_parts(config, total_steps=None):
  """What train.run builds before its loop from the resolved `config`: the model, optimizer,
  trainable mask, schedule (over `total_steps`, default the config's) and first TrainState."""
  from tljax import build
  built = build.build(config, total_steps)
  return built.model, built.optimizer, built.mask, built.schedule, built.state


def finished_run(root, **overrides):
  """Trains `small_config(**overrides)` for its 6 steps (checkpoints 3 and 6) on a fresh
  `root/data.npz` into `root/run`; returns that run directory and the data path."""
  from tljax import train
  data = write_npz(root / 'data.npz')
  train.run(small_config(**{'data.path': data, **overrides}), str(root / 'run'))
  return root / 'run', data


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


@contextlib.contextmanager
def walkable_copy(run_dir):
  """A copy of `run_dir` under a fresh directory in /tmp (pytest's tmp_path is 0700, which the
  `nobody` user cannot walk); removed afterwards."""
  base = tempfile.mkdtemp()
  os.chmod(base, 0o755)
  copy = os.path.join(base, os.path.basename(run_dir))
  shutil.copytree(run_dir, copy)
  try:
    yield copy
  finally:
    for root, dirs, _ in os.walk(base):
      for name in dirs:
        os.chmod(os.path.join(root, name), 0o755)
    shutil.rmtree(base)


@contextlib.contextmanager
def as_nobody():
  """Permission bits do not stop root: as root, the block runs with the effective user
  `nobody`; as anyone else, as that user."""
  as_root = os.geteuid() == 0
  if as_root:
    os.seteuid(65534)
  try:
    yield
  finally:
    if as_root:
      os.seteuid(0)


def read_metrics(workdir) -> list[dict]:
  """Every line of a run's metrics.jsonl, parsed."""
  import json
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def latest_state(workdir) -> dict:
  """Every array of a workdir's newest checkpoint (step, params, batch_stats, optimizer state),
  by its key path."""
  import jax

  from tljax.weights.read import restore_latest
  flat, _ = jax.tree_util.tree_flatten_with_path(restore_latest(str(workdir)))
  return {jax.tree_util.keystr(path): np.asarray(value) for path, value in flat}


def cut_run_resumes_bit_exact(config, root, last_step: int):
  """Trains `config` into `root/whole`; copies it to `root/cut` without its final checkpoint
  (`last_step`) and results, as a kill after the checkpoint before leaves it; trains the copy
  again. Asserts both end in bitwise the same state; returns (whole, resumed) results."""
  from tljax import train
  whole = train.run(config, str(root / 'whole'))
  shutil.copytree(root / 'whole', root / 'cut')
  shutil.rmtree(root / 'cut' / 'checkpoints' / str(last_step))
  os.remove(root / 'cut' / 'results.json')
  resumed = train.run(config, str(root / 'cut'))
  expected, actual = latest_state(root / 'whole'), latest_state(root / 'cut')
  assert expected.keys() == actual.keys()
  for key in expected:
    np.testing.assert_array_equal(expected[key], actual[key], err_msg=key)
  return whole, resumed
