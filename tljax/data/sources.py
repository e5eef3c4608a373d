"""Where examples come from: TFDS, an image folder, arrays (.npz, IDX files) or ELPV; text
sources (CSV, JSONL, BBC News, TFDS text) live in tljax.data.text.

Every source yields undecoded records `{'image', 'label'}` (or `{'text', 'label'}`) of one split
in a fixed order, so the pipeline can shard, subsample, shuffle and skip them before paying for
decoding or tokenising.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import math
import os
import struct
import sys
import types
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from tljax import config as config_lib
from tljax import npz
from tljax.data import image_files
from tljax.data.tf_quiet import tf  # TF with accelerators hidden
from tljax.errors import UserError

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp')
DEFAULT_MAX_PIXELS = 100_000_000  # data.max_image_pixels


class DataError(UserError):
  """A dataset that cannot be read as configured; the message names the path or key."""


class Source:
  """Interface: records, labels and size of each split, and how to decode an image."""
  num_classes: int | None = None
  class_names: list[str] | None = None  # label order; None where the data has no names
  labels_in_memory = True  # labels() costs nothing (not a scan of a whole dataset)
  modality = 'image'  # or 'text': records hold 'text' and the pipeline tokenises them

  def records(self, split: str) -> tf.data.Dataset:
    raise NotImplementedError

  def labels(self, split: str) -> np.ndarray:
    raise NotImplementedError

  def num_examples(self, split: str) -> int:
    return len(self.labels(split))

  def decode(self, image: tf.Tensor, channels: int) -> tf.Tensor:
    return image_files.decode(image, channels)

  def corrupt_files(self, split: str) -> dict[str, str]:
    """Files of `split` that cannot be used, and why (sources that read files say which)."""
    return {}

  def skipped_files(self) -> dict[str, list[str]]:
    """Unreadable files left out of each split (data.skip_corrupt_images)."""
    return {}

  def check_channels(self, split: str, channels: int) -> None:
    """Refuses stored images the pipeline cannot turn into `channels` channels (encoded files
    are decoded to the channels asked for)."""

  def overlaps(self, split: str, other: str) -> bool:
    """Whether two split names can share examples (different names of a folder or of arrays
    cannot; TFDS slices and ELPV's 'all' say so themselves)."""
    return split == other


class TfdsSource(Source):
  """A TFDS dataset already prepared in `data_dir` (or mocked with tfds.testing.mock_data)."""

  labels_in_memory = False

  def __init__(self, name: str, data_dir: str | None = None, image_key: str = 'image',
               label_key: str = 'label'):
    try:
      self.builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
      raise DataError(f'TFDS dataset {name!r} (data.name) is not a tensorflow-datasets name; '
                      'see https://www.tensorflow.org/datasets/catalog') from None
    self.name, self.data_dir = name, data_dir
    self.image_key, self.label_key = image_key, label_key
    features = self.builder.info.features
    for key in (image_key, label_key):
      if key not in features:
        raise DataError(f'TFDS dataset {name!r} has no feature {key!r} (data.image_key / '
                        f'data.label_key); it has {sorted(features)}')
    self.num_classes = getattr(features[label_key], 'num_classes', None)
    names = getattr(features[label_key], 'names', None)
    self.class_names = list(names) if names else None

  def overlaps(self, split: str, other: str) -> bool:
    """Whether two TFDS split strings ('train[:90%]', 'train[90%:]+test') share examples."""
    def ranges(spec: str) -> list[tuple[str, int, int]]:
      try:
        instruction = tfds.core.ReadInstruction.from_spec(spec)
        bases = {part.split('[')[0].strip() for part in spec.split('+')}
        sizes = {base: types.SimpleNamespace(num_examples=self.num_examples(base))
                 for base in bases}
        return [(a.splitname, a.from_ or 0,
                 sizes[a.splitname].num_examples if a.to is None else a.to)
                for a in instruction.to_absolute(sizes)]
      except (ValueError, AssertionError, KeyError) as e:
        raise DataError(f'TFDS dataset {self.name!r}: split {spec!r} cannot be read: '
                        f'{" ".join(str(e).split())[:200]}') from None
    return any(a == b and max(lo, lo2) < min(hi, hi2)
               for a, lo, hi in ranges(split) for b, lo2, hi2 in ranges(other))

  def _dataset(self, split: str) -> tf.data.Dataset:
    try:
      return self.builder.as_dataset(split=split, shuffle_files=False,
                                     decoders={self.image_key: tfds.decode.SkipDecoding()})
    except AssertionError:  # what tfds raises for data that was never prepared
      raise DataError(f'TFDS dataset {self.name!r} is not prepared in data.data_dir='
                      f'{self.data_dir!r}; prepare it once with network access (tfds build '
                      f'{self.name}) or point data.data_dir at a prepared copy') from None
    except ValueError as e:  # an unknown split or a bad slice
      raise DataError(f'TFDS dataset {self.name!r}: split {split!r} cannot be read: '
                      f'{" ".join(str(e).split())[:200]}') from None

  def records(self, split: str) -> tf.data.Dataset:
    return self._dataset(split).map(lambda ex: {'image': ex[self.image_key],
                                                'label': tf.cast(ex[self.label_key], tf.int32)})

  @functools.lru_cache(maxsize=8)  # noqa: B019  (sources live as long as the run)
  def labels(self, split: str) -> np.ndarray:
    labels = self._dataset(split).map(lambda ex: ex[self.label_key]).batch(4096)
    return np.concatenate([np.asarray(b) for b in labels.as_numpy_iterator()] or
                          [np.zeros(0, np.int64)]).astype(np.int32)

  def num_examples(self, split: str) -> int:
    splits = self.builder.info.splits
    if splits:  # real prepared data: the count is in the metadata, no scan needed
      try:
        return int(splits[split].num_examples)
      except (KeyError, ValueError) as e:
        raise DataError(f'TFDS dataset {self.name!r}: no split {split!r} ({e}); it has '
                        f'{sorted(splits)}') from None
    return len(self.labels(split))


def _listdir(directory: str) -> list[str]:
  try:
    return os.listdir(directory)
  except OSError as e:
    raise DataError(f'cannot list the image folder {directory}: {e.strerror or e}') from None


def _hidden(name: str) -> bool:
  """Folders no dataset means: hidden ones (.git, .ipynb_checkpoints) and macOS's __MACOSX."""
  return name.startswith('.') or name == '__MACOSX'


class FolderSource(Source):
  """`root/<split>/<class name>/*.png|jpg`, the tfds ImageFolder layout; classes sorted by name.

  Listing a split checks every file before anything is written (tljax.data.image_files): a link
  that leads nowhere, an image over `max_pixels` or one that does not decode fails the run,
  naming the files, or with `skip_corrupt` is left out and counted. A class folder without
  images is an error, not a class the model could never predict.
  """

  def __init__(self, root: str, skip_corrupt: bool = False,
               max_pixels: int = DEFAULT_MAX_PIXELS):
    if not os.path.isdir(root):
      state = 'is not a directory' if os.path.exists(root) else 'does not exist'
      raise DataError(f'image folder {root!r} (data.path) {state}')
    self.root, self.skip_corrupt, self.max_pixels = root, skip_corrupt, max_pixels
    self.skipped: dict[str, list[str]] = {}
    splits = [d for d in sorted(_listdir(root)) if os.path.isdir(os.path.join(root, d))
              and not _hidden(d)]
    names = sorted({c for s in splits for c in _listdir(os.path.join(root, s))
                    if os.path.isdir(os.path.join(root, s, c)) and not _hidden(c)})
    if not names:
      raise DataError(f'image folder {root!r} has no <split>/<class>/ subfolders')
    self.class_names = names
    self.num_classes = len(names)

  @functools.lru_cache(maxsize=8)  # noqa: B019
  def _files(self, split: str) -> tuple[list[str], np.ndarray]:
    split_dir = os.path.join(self.root, split)
    if not os.path.isdir(split_dir):
      raise DataError(f'split {split!r} not found: no folder {split_dir}')
    paths, labels, ignored = [], [], []
    for label, name in enumerate(self.class_names):
      class_dir = os.path.join(split_dir, name)
      if not os.path.isdir(class_dir):
        continue
      names = [f for f in sorted(_listdir(class_dir)) if not _hidden(f)]
      files = [f for f in names if f.lower().endswith(IMAGE_EXTENSIONS)]
      ignored += [os.path.join(class_dir, f) for f in names if f not in files]
      if not files:
        raise DataError(f'class folder {class_dir} holds no image files '
                        f'({", ".join(IMAGE_EXTENSIONS)}); add images or remove the folder')
      paths += [os.path.join(class_dir, f) for f in files]
      labels += [label] * len(files)
    if ignored:  # a .tif or .heic among the images: said, not silently left out
      shown = ', '.join(ascii(p)[1:-1] for p in ignored[:5])
      print(f'warning: split {split!r}: {len(ignored)} file(s) without an image extension '
            f'({", ".join(IMAGE_EXTENSIONS)}) are not read: {shown}'
            + (f' and {len(ignored) - 5} more' if len(ignored) > 5 else '')
            + '; convert them to PNG or JPEG to use them', file=sys.stderr, flush=True)
    found = image_files.problems(paths, self.max_pixels)
    if found and not self.skip_corrupt:
      raise DataError(image_files.message(split, found))
    self.skipped[split] = sorted(found)
    labels = [y for p, y in zip(paths, labels, strict=True) if p not in found]
    paths = [p for p in paths if p not in found]
    return paths, np.asarray(labels, np.int32)

  def corrupt_files(self, split: str) -> dict[str, str]:
    return image_files.problems(self._files(split)[0], self.max_pixels)

  def skipped_files(self) -> dict[str, list[str]]:
    return {split: files for split, files in self.skipped.items() if files}

  def records(self, split: str) -> tf.data.Dataset:
    paths, labels = self._files(split)
    return tf.data.Dataset.from_tensor_slices({'image': tf.constant(paths, tf.string),
                                               'label': labels})

  def labels(self, split: str) -> np.ndarray:
    return self._files(split)[1]

  def decode(self, image: tf.Tensor, channels: int) -> tf.Tensor:
    return image_files.decode(tf.io.read_file(image), channels)


class ArraySource(Source):
  """In-memory uint8 images `[N, H, W, C]` and integer labels per split."""

  def __init__(self, splits: Mapping[str, tuple[np.ndarray, np.ndarray]],
               num_classes: int | None = None):
    self.splits = {}
    for name, (images, labels) in splits.items():
      images, labels = np.asarray(images), np.asarray(labels)
      if (images.dtype != np.uint8 or images.ndim not in (3, 4) or 0 in images.shape[1:3]
          or (images.ndim == 4 and images.shape[3] not in (1, 3))):
        raise DataError(f'images of split {name!r} must be uint8 [N, H, W] or [N, H, W, C] with '
                        f'C 1 or 3, got {images.dtype} {list(images.shape)}')
      if labels.ndim != 1 or labels.dtype.kind not in 'iu' or len(labels) != len(images):
        raise DataError(f'labels of split {name!r} must be {len(images)} integers (one per '
                        f'image), got {labels.dtype} {list(labels.shape)}')
      outside = np.flatnonzero((labels < 0) | (labels > np.iinfo(np.int32).max))
      if outside.size:  # before the int32 cast, which would wrap them into valid classes
        raise DataError(f'label {labels[outside[0]]} of example {outside[0]} in split {name!r} '
                        f'is not a class id (an integer from 0); {outside.size} such labels')
      self.splits[name] = (images, labels.astype(np.int32))
    self.num_classes = num_classes

  @classmethod
  def from_npz(cls, path: str) -> ArraySource:
    """Reads `<split>_images` / `<split>_labels` arrays; anything but plain arrays is refused."""
    arrays = npz.read(path, DataError, f'npz file {path!r} (data.path)',
                      wanted=lambda name: name.endswith(('_images', '_labels')))
    names = {k.rsplit('_', 1)[0] for k in arrays if k.endswith(('_images', '_labels'))}
    missing = [f'{n}_{kind}' for n in sorted(names) for kind in ('images', 'labels')
               if f'{n}_{kind}' not in arrays]
    if missing:
      raise DataError(f'npz file {path!r} (data.path) lacks {", ".join(missing)}; each split '
                      'needs <split>_images and <split>_labels')
    return cls({n: (arrays[f'{n}_images'], arrays[f'{n}_labels']) for n in sorted(names)})

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

  def check_channels(self, split: str, channels: int) -> None:
    images = self._split(split)[0]
    have = images.shape[3] if images.ndim == 4 else 1
    if have not in (1, channels):
      raise DataError(f'images of split {split!r} have {have} channels but data.channels='
                      f'{channels}')


MAX_IDX_BYTES = 2**32  # 4 GiB: far above any IDX dataset; a header claiming more is damaged


def read_idx(path: str) -> np.ndarray:
  """An MNIST-format IDX file (optionally gzipped) as an unsigned-byte array. The header is read
  first and the body never beyond what it claims, so a gzip bomb costs nothing."""
  opener = gzip.open if path.endswith('.gz') else open
  try:
    with opener(path, 'rb') as f:
      head = f.read(4)
      if len(head) < 4 or head[:2] != b'\0\0' or head[2] != 0x08 or head[3] == 0:
        raise DataError(f'{path} is not an unsigned-byte IDX file')
      dims = f.read(4 * head[3])
      if len(dims) != 4 * head[3]:
        raise DataError(f'{path} is truncated inside its header')
      shape = struct.unpack(f'>{head[3]}I', dims)
      size = math.prod(shape)
      if size > MAX_IDX_BYTES:
        raise DataError(f'{path}: its header claims {shape} ({size:,} bytes), more than any IDX '
                        'dataset; damaged or not an IDX file')
      body = f.read(size + 1)
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(f'cannot read IDX file {path}: {e}') from None
  if len(body) != size:
    raise DataError(f'{path}: header says {shape} ({size:,} bytes) but the file holds '
                    f'{len(body):,}{" or more" if len(body) > size else ""}; truncated or damaged')
  return np.frombuffer(body, np.uint8).reshape(shape)


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
  for split, (images, labels) in splits.items():
    if not len(labels) or len(images) != len(labels):
      raise DataError(f'IDX split {split!r} in {directory!r} has {len(images)} images and '
                      f'{len(labels)} labels')
  return ArraySource(splits, num_classes=int(max(y.max() for _, y in splits.values())) + 1)


class ClassSubset(Source):
  """Only the examples of `classes`, relabelled 0..len(classes)-1 in the order given."""

  def __init__(self, source: Source, classes: Sequence[int]):
    self.source, self.classes = source, [int(c) for c in classes]
    outside = [c for c in self.classes if source.num_classes and c >= source.num_classes]
    if outside:
      raise DataError(f'data.classes={tuple(self.classes)} names class id(s) {outside} but the '
                      f'dataset has classes 0..{source.num_classes - 1}')
    self.num_classes = len(self.classes)
    names = source.class_names  # else the ids the config named them by
    self.class_names = ([names[c] for c in self.classes] if names
                        else [str(c) for c in self.classes])
    self.overlaps = source.overlaps
    self.labels_in_memory, self.modality = source.labels_in_memory, source.modality
    self.check_channels = source.check_channels
    self.decode = source.decode
    self.corrupt_files = source.corrupt_files
    self.skipped_files = source.skipped_files

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

  def texts(self, split: str) -> list[str]:
    keep = self._remap()[self.source.labels(split)] >= 0
    return [t for t, k in zip(self.source.texts(split), keep, strict=True) if k]


ELPV_CLASSES = ('functional', 'mildly defective', 'likely defective', 'defective')
ELPV_PROBABILITIES = (0, 1, 2, 3)  # defect probability x 3


def elpv_root() -> str:
  """The data folder of the installed `elpv-dataset` package (its labels.csv and images/)."""
  spec = importlib.util.find_spec('elpv_dataset')
  if spec is None or not spec.submodule_search_locations:
    raise DataError('data.source=elpv needs the ELPV dataset: pip install elpv-dataset '
                    '(CC-BY-NC-SA-4.0), or set data.path to a folder holding labels.csv')
  return os.path.join(list(spec.submodule_search_locations)[0], 'data')


def stratified_split(strata: np.ndarray, test_fraction: float, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Sorted (train, test) indices, seeded, with each stratum's share of test in proportion.

  Per-stratum counts are rounded by largest remainder, so the test split holds exactly
  round(test_fraction * N) examples (656 of ELPV's 2,624, as in its paper).
  """
  rng = np.random.default_rng(seed)
  names, sizes = np.unique(strata, return_counts=True)
  exact = sizes * test_fraction
  n_test = np.floor(exact).astype(int)
  short = int(round(len(strata) * test_fraction)) - int(n_test.sum())
  n_test[np.argsort(-(exact - n_test), kind='stable')[:short]] += 1
  train, test = [], []
  for name, count in zip(names, n_test, strict=True):
    members = rng.permutation(np.flatnonzero(strata == name))
    test.append(members[:count])
    train.append(members[count:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


class ElpvSource(Source):
  """ELPV electroluminescence solar cells (Buerhop-Lutz et al. 2018; Deitsch et al. 2019).

  2,624 grayscale 300x300 PNGs; the label is the defect probability 0, 1/3, 2/3 or 1 as class
  0..3. Splits: 'train' and 'test' are a fixed 75/25 split, seeded and stratified by class and
  cell type (mono/poly), as in the dataset's paper; 'all' is every cell. A split's files are
  checked as an image folder's are when it is first used.
  """
  TEST_FRACTION, SPLIT_SEED = 0.25, 0
  num_classes = len(ELPV_CLASSES)
  class_names = list(ELPV_CLASSES)

  def overlaps(self, split: str, other: str) -> bool:
    return split == other or 'all' in (split, other)

  def __init__(self, root: str | None = None, skip_corrupt: bool = False,
               max_pixels: int = DEFAULT_MAX_PIXELS):
    root = root or elpv_root()
    self.skip_corrupt, self.max_pixels = skip_corrupt, max_pixels
    self.skipped: dict[str, list[str]] = {}
    labels_csv = os.path.join(root, 'labels.csv')
    if not os.path.isfile(labels_csv):
      raise DataError(f'ELPV labels file {labels_csv} not found (data.path)')
    paths, labels, types = [], [], []
    try:
      with open(labels_csv, encoding='utf-8') as f:
        lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
      raise DataError(f'ELPV labels file {labels_csv} cannot be read: {e}') from None
    for line_number, line in enumerate(lines, 1):
      fields = line.split()
      if not fields:
        continue
      try:
        path, probability, cell_type = fields
        thirds = float(probability) * 3
        if abs(thirds - round(thirds)) > 1e-4:
          raise ValueError(probability)
        label = ELPV_PROBABILITIES.index(round(thirds))
      except (ValueError, OverflowError):
        raise DataError(f'{labels_csv}:{line_number}: expected "<image> <probability in '
                        f'0, 1/3, 2/3, 1> <type>", got {line.strip()!r}') from None
      paths.append(os.path.join(root, path))
      labels.append(label)
      types.append(cell_type)
    if not paths:
      raise DataError(f'ELPV labels file {labels_csv} lists no images')
    self.paths = np.asarray(paths)
    self.all_labels = np.asarray(labels, np.int32)
    self.types = np.asarray(types)
    strata = np.char.add(self.all_labels.astype(str), self.types)
    train, test = stratified_split(strata, self.TEST_FRACTION, self.SPLIT_SEED)
    self.split_indices = {'train': train, 'test': test, 'all': np.arange(len(paths))}

  @functools.lru_cache(maxsize=8)  # noqa: B019
  def _indices(self, split: str) -> np.ndarray:
    if split not in self.split_indices:
      raise DataError(f'ELPV has splits {sorted(self.split_indices)}, not {split!r}')
    index = self.split_indices[split]
    found = image_files.problems(list(self.paths[index]), self.max_pixels)
    if found and not self.skip_corrupt:
      raise DataError(image_files.message(split, found))
    self.skipped[split] = sorted(found)
    return np.asarray([i for i in index if self.paths[i] not in found], np.int64)

  def corrupt_files(self, split: str) -> dict[str, str]:
    return image_files.problems(list(self.paths[self._indices(split)]), self.max_pixels)

  def skipped_files(self) -> dict[str, list[str]]:
    return {split: files for split, files in self.skipped.items() if files}

  def records(self, split: str) -> tf.data.Dataset:
    index = self._indices(split)
    return tf.data.Dataset.from_tensor_slices({'image': tf.constant(self.paths[index]),
                                               'label': self.all_labels[index]})

  def labels(self, split: str) -> np.ndarray:
    return self.all_labels[self._indices(split)]

  def decode(self, image: tf.Tensor, channels: int) -> tf.Tensor:
    # Any format the up-front check accepts (a cell saved as BMP or JPEG, not only PNG).
    return image_files.decode(tf.io.read_file(image), channels)


# Sources by the name data.source gives: (resolved data section) -> Source.
SOURCES: dict[str, Callable[[Mapping[str, Any]], Source]] = {
    'tfds': lambda data: TfdsSource(data['name'], data['data_dir'], data['image_key'],
                                    data['label_key']),
    'folder': lambda data: FolderSource(data['path'], bool(data['skip_corrupt_images']),
                                        int(data['max_image_pixels'])),
    'npz': lambda data: ArraySource.from_npz(data['path']),
    'idx': lambda data: idx_source(data['path']),
    'elpv': lambda data: ElpvSource(data['path'] or None, bool(data['skip_corrupt_images']),
                                    int(data['max_image_pixels'])),
}


def _text_sources() -> dict[str, Callable[[Mapping[str, Any]], Source]]:
  from tljax.data import text

  def files(kind: str) -> Callable[[Mapping[str, Any]], Source]:
    return lambda data: text.file_source(data['path'], kind, data['text_key'],
                                         data['label_key'], data['train_split'],
                                         data['class_names'])
  return {
      'csv': files('csv'), 'jsonl': files('jsonl'),
      'bbc_news': lambda data: text.BbcNewsSource(data['path'] or None),
      'tfds': lambda data: text.TfdsTextSource(data['name'], data['data_dir'],
                                               data['text_key'], data['label_key']),
  }


TEXT_SOURCES = ('csv', 'jsonl', 'bbc_news', 'tfds')  # data.source values for text models


def make_source(config: Mapping[str, Any], modality: str = 'image') -> Source:
  """The source named by `config.data.source` (a key of SOURCES, or of TEXT_SOURCES for a
  model of `modality` 'text'), with its class subset and held-out validation fraction."""
  kind = config['source']
  table = _text_sources() if modality == 'text' else SOURCES
  if kind not in table:
    other = SOURCES if modality == 'text' else TEXT_SOURCES
    what = ('reads text' if modality == 'text' else 'reads images')
    hint = (f'; {kind!r} gives {"images" if modality == "text" else "texts"}, for a model that '
            f'{"reads images" if modality == "text" else "reads text"}') if kind in other else ''
    raise DataError(f'data.source must be one of {", ".join(map(repr, table))} for a model that '
                    f'{what}, got {kind!r}{hint}')
  if config.get('class_names') and kind not in ('csv', 'jsonl'):
    raise DataError(f'data.class_names names the classes of csv and jsonl files; source {kind!r} '
                    'brings its own: unset it (data.classes picks a subset)')
  source = table[kind](config)
  if config.get('classes'):
    source = ClassSubset(source, config['classes'])
  return with_validation(source, config)


def with_validation(source: Source, config: Mapping[str, Any]) -> Source:
  """`source` with the fraction data.val_split holds out of the training split (if it is a
  fraction) set apart as split HELD_OUT_SPLIT."""
  fraction = config_lib.held_out_fraction(config.get('val_split'))
  if fraction is None or isinstance(source, HeldOut):
    return source
  return HeldOut(source, config['train_split'], fraction, int(config.get('val_seed', 0)))


HELD_OUT_SPLIT = '<held out of the training split>'  # no folder, array or TFDS split name


def validation_split(config: Mapping[str, Any]) -> str | None:
  """The split name periodic evaluation and selection run on; None without one."""
  val_split = config.get('val_split')
  if val_split is None or val_split == '':
    return None
  return HELD_OUT_SPLIT if config_lib.held_out_fraction(val_split) is not None else str(val_split)


class HeldOut(Source):
  """`fraction` of `train_split` held out as split HELD_OUT_SPLIT, seeded and stratified by
  class, before any k-per-class sampling: the training split then holds only the rest, so the
  two never share an example. Every class must keep examples on both sides."""

  def __init__(self, source: Source, train_split: str, fraction: float, seed: int):
    self.source, self.train_split = source, train_split
    self.num_classes, self.class_names = source.num_classes, source.class_names
    self.labels_in_memory, self.modality = source.labels_in_memory, source.modality
    self.decode, self.skipped_files = source.decode, source.skipped_files
    labels = source.labels(train_split)
    train, held = stratified_split(labels, fraction, seed)
    classes = np.unique(labels)
    for name, part in (('validation', held), ('training', train)):
      counts = np.bincount(labels[part], minlength=int(classes.max()) + 1 if classes.size else 0)
      empty = [int(c) for c in classes if counts[c] == 0]
      if empty:
        shown = [self.class_names[c] if self.class_names and c < len(self.class_names) else c
                 for c in empty]
        raise DataError(
            f'data.val_split={fraction:g} of split {train_split!r} leaves class(es) {shown} with '
            f'no {name} example ({", ".join(str(int((labels == c).sum())) for c in empty)} '
            'example(s) in all); choose another fraction, or give a split name')
    self.indices = {train_split: train, HELD_OUT_SPLIT: held}

  def _base(self, split: str) -> str:
    return self.train_split if split == HELD_OUT_SPLIT else split

  def overlaps(self, split: str, other: str) -> bool:
    if {split, other} == {HELD_OUT_SPLIT, self.train_split}:
      return False
    return split == other or self.source.overlaps(self._base(split), self._base(other))

  def records(self, split: str) -> tf.data.Dataset:
    records = self.source.records(self._base(split))
    if split not in self.indices:
      return records
    keep = np.zeros(self.source.num_examples(self.train_split), bool)
    keep[self.indices[split]] = True
    table = tf.constant(keep)
    return records.enumerate().filter(lambda i, _: table[i]).map(lambda _, r: r)

  def labels(self, split: str) -> np.ndarray:
    labels = self.source.labels(self._base(split))
    return labels[self.indices[split]] if split in self.indices else labels

  def num_examples(self, split: str) -> int:
    if split in self.indices:
      return len(self.indices[split])
    return self.source.num_examples(split)

  def texts(self, split: str) -> list[str]:
    texts = self.source.texts(self._base(split))
    return [texts[i] for i in self.indices[split]] if split in self.indices else texts

  def corrupt_files(self, split: str) -> dict[str, str]:
    return self.source.corrupt_files(self._base(split))

  def check_channels(self, split: str, channels: int) -> None:
    self.source.check_channels(self._base(split), channels)
