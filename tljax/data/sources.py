"""Where examples come from: TFDS, an image folder, or arrays in an .npz file.

Every source yields undecoded records `{'image', 'label'}` of one split in a fixed order, so the
pipeline can shard, subsample, shuffle and skip them before paying for decoding.
"""

from __future__ import annotations

import functools
import gzip
import os
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from tljax.data.tf_quiet import tf  # TF with accelerators hidden
from tljax.errors import UserError

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif')


class DataError(UserError):
  """A dataset that cannot be read as configured; the message names the path or key."""


class Source:
  """Interface: records, labels and size of each split, and how to decode an image."""
  num_classes: int | None = None

  def records(self, split: str) -> tf.data.Dataset:
    raise NotImplementedError

  def labels(self, split: str) -> np.ndarray:
    raise NotImplementedError

  def num_examples(self, split: str) -> int:
    return len(self.labels(split))

  def decode(self, image: tf.Tensor, channels: int) -> tf.Tensor:
    return tf.io.decode_image(image, channels=channels, expand_animations=False)


class TfdsSource(Source):
  """A TFDS dataset already prepared in `data_dir` (or mocked with tfds.testing.mock_data)."""

  def __init__(self, name: str, data_dir: str | None = None, image_key: str = 'image',
               label_key: str = 'label'):
    self.builder = tfds.builder(name, data_dir=data_dir)
    self.image_key, self.label_key = image_key, label_key
    features = self.builder.info.features
    for key in (image_key, label_key):
      if key not in features:
        raise DataError(f'TFDS dataset {name!r} has no feature {key!r} (data.image_key / '
                        f'data.label_key); it has {sorted(features)}')
    self.num_classes = getattr(features[label_key], 'num_classes', None)

  def records(self, split: str) -> tf.data.Dataset:
    ds = self.builder.as_dataset(split=split, shuffle_files=False,
                                 decoders={self.image_key: tfds.decode.SkipDecoding()})
    return ds.map(lambda ex: {'image': ex[self.image_key],
                              'label': tf.cast(ex[self.label_key], tf.int32)})

  @functools.lru_cache(maxsize=8)  # noqa: B019  (sources live as long as the run)
  def labels(self, split: str) -> np.ndarray:
    ds = self.builder.as_dataset(split=split, shuffle_files=False,
                                 decoders={self.image_key: tfds.decode.SkipDecoding()})
    labels = ds.map(lambda ex: ex[self.label_key]).batch(4096)
    return np.concatenate([np.asarray(b) for b in labels.as_numpy_iterator()] or
                          [np.zeros(0, np.int64)]).astype(np.int32)

  def num_examples(self, split: str) -> int:
    splits = self.builder.info.splits
    if splits:  # real prepared data: the count is in the metadata, no scan needed
      return int(splits[split].num_examples)
    return len(self.labels(split))


class FolderSource(Source):
  """`root/<split>/<class name>/*.png|jpg`, the tfds ImageFolder layout; classes sorted by name."""

  def __init__(self, root: str):
    if not os.path.isdir(root):
      raise DataError(f'image folder {root!r} (data.path) does not exist')
    self.root = root
    splits = [d for d in sorted(os.listdir(root)) if os.path.isdir(os.path.join(root, d))]
    names = sorted({c for s in splits for c in os.listdir(os.path.join(root, s))
                    if os.path.isdir(os.path.join(root, s, c))})
    if not names:
      raise DataError(f'image folder {root!r} has no <split>/<class>/ subfolders')
    self.class_names = names
    self.num_classes = len(names)

  @functools.lru_cache(maxsize=8)  # noqa: B019
  def _files(self, split: str) -> tuple[list[str], np.ndarray]:
    split_dir = os.path.join(self.root, split)
    if not os.path.isdir(split_dir):
      raise DataError(f'split {split!r} not found: no folder {split_dir}')
    paths, labels = [], []
    for label, name in enumerate(self.class_names):
      class_dir = os.path.join(split_dir, name)
      if not os.path.isdir(class_dir):
        continue
      for file in sorted(os.listdir(class_dir)):
        if file.lower().endswith(IMAGE_EXTENSIONS):
          paths.append(os.path.join(class_dir, file))
          labels.append(label)
    return paths, np.asarray(labels, np.int32)

  def records(self, split: str) -> tf.data.Dataset:
    paths, labels = self._files(split)
    return tf.data.Dataset.from_tensor_slices({'image': tf.constant(paths, tf.string),
                                               'label': labels})

  def labels(self, split: str) -> np.ndarray:
    return self._files(split)[1]

  def decode(self, image: tf.Tensor, channels: int) -> tf.Tensor:
    return tf.io.decode_image(tf.io.read_file(image), channels=channels,
                              expand_animations=False)


class ArraySource(Source):
  """In-memory uint8 images `[N, H, W, C]` and integer labels per split."""

  def __init__(self, splits: Mapping[str, tuple[np.ndarray, np.ndarray]],
               num_classes: int | None = None):
    self.splits = {k: (np.asarray(x), np.asarray(y, np.int32)) for k, (x, y) in splits.items()}
    self.num_classes = num_classes

  @classmethod
  def from_npz(cls, path: str) -> ArraySource:
    """Reads `<split>_images` / `<split>_labels` arrays; object arrays are refused."""
    if not os.path.isfile(path):
      raise DataError(f'npz file {path!r} (data.path) does not exist')
    with np.load(path, allow_pickle=False) as npz:
      names = {k.rsplit('_', 1)[0] for k in npz.files if k.endswith(('_images', '_labels'))}
      splits = {n: (npz[f'{n}_images'], npz[f'{n}_labels']) for n in sorted(names)}
    return cls(splits)

  def _split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    if split not in self.splits:
      raise DataError(f'split {split!r} not in the arrays; have {sorted(self.splits)}')
    return self.splits[split]

  def records(self, split: str) -> tf.data.Dataset:
    images, labels = self._split(split)
    if images.ndim == 3:
      images = images[..., None]
    return tf.data.Dataset.from_tensor_slices({'image': images, 'label': labels})

  def labels(self, split: str) -> np.ndarray:
    return self._split(split)[1]

  def decode(self, image: tf.Tensor, channels: int) -> tf.Tensor:
    return image


def read_idx(path: str) -> np.ndarray:
  """An MNIST-format IDX file (optionally gzipped) as an unsigned-byte array."""
  opener = gzip.open if path.endswith('.gz') else open
  try:
    with opener(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise DataError(f'cannot read IDX file {path}: {e}') from None
  if len(data) < 4 or data[:2] != b'\0\0' or data[2] != 0x08:
    raise DataError(f'{path} is not an unsigned-byte IDX file')
  ndim = data[3]
  shape = struct.unpack(f'>{ndim}I', data[4:4 + 4 * ndim])
  body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if body.size != int(np.prod(shape)):
    raise DataError(f'{path} is truncated: header says {shape}, found {body.size} bytes')
  return body.reshape(shape)


def idx_source(directory: str) -> ArraySource:
  """MNIST / Fashion-MNIST IDX files: `train-*` is split 'train', `t10k-*` is split 'test'."""
  splits = {}
  for split, prefix in (('train', 'train'), ('test', 't10k')):
    images = os.path.join(directory, f'{prefix}-images-idx3-ubyte.gz')
    labels = os.path.join(directory, f'{prefix}-labels-idx1-ubyte.gz')
    if os.path.exists(images):
      splits[split] = (read_idx(images)[..., None], read_idx(labels).astype(np.int32))
  if not splits:
    raise DataError(f'no IDX files (train-images-idx3-ubyte.gz, ...) in {directory!r} (data.path)')
  return ArraySource(splits, num_classes=int(max(y.max() for _, y in splits.values())) + 1)


class ClassSubset(Source):
  """Only the examples of `classes`, relabelled 0..len(classes)-1 in the order given."""

  def __init__(self, source: Source, classes: Sequence[int]):
    self.source, self.classes = source, [int(c) for c in classes]
    self.num_classes = len(self.classes)
    self.decode = source.decode

  def _remap(self) -> np.ndarray:
    """Old label -> new label, -1 for classes left out."""
    size = max(max(self.classes) + 1, self.source.num_classes or 0)
    remap = np.full(size, -1, np.int32)
    remap[self.classes] = np.arange(len(self.classes))
    return remap

  def records(self, split: str) -> tf.data.Dataset:
    table = tf.constant(self._remap())
    return (self.source.records(split).map(lambda r: {**r, 'label': table[r['label']]})
            .filter(lambda r: r['label'] >= 0))

  @functools.lru_cache(maxsize=8)  # noqa: B019
  def labels(self, split: str) -> np.ndarray:
    relabelled = self._remap()[self.source.labels(split)]
    return relabelled[relabelled >= 0]


def make_source(config: Mapping[str, Any]) -> Source:
  """The source named by `config.data.source`: 'tfds', 'folder', 'npz' or 'idx'."""
  kind = config['source']
  if kind == 'tfds':
    source = TfdsSource(config['name'], config.get('data_dir'),
                        config.get('image_key', 'image'), config.get('label_key', 'label'))
  elif kind == 'folder':
    source = FolderSource(config['path'])
  elif kind == 'npz':
    source = ArraySource.from_npz(config['path'])
  elif kind == 'idx':
    source = idx_source(config['path'])
  else:
    raise DataError(f"data.source must be 'tfds', 'folder', 'npz' or 'idx', got {kind!r}")
  if config.get('classes'):
    source = ClassSubset(source, config['classes'])
  return source
