"""Batches for training and evaluation, per process, positioned by the global step.

Training: the split (optionally k examples per class) is reshuffled each epoch with a seed derived
from the epoch, repeated, started at the example the step implies (so resuming needs no pipeline
state beyond the step) and split into per-process slices of each global batch. Evaluation pads
the last batch and masks the padding, so every example counts exactly once on any process count.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from tljax.data import image_files, preprocess, text
from tljax.data.sources import DataError, Source, validation_split
from tljax.data.tf_quiet import tf  # TF with accelerators hidden

AUTOTUNE = -1


def select_per_class(labels: np.ndarray, examples_per_class: int, seed: int) -> np.ndarray:
  """Sorted indices of `examples_per_class` examples of each class, stratified and seeded.

  A class with fewer examples contributes all it has.
  """
  rng = np.random.default_rng(seed)
  chosen = []
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label)
    chosen.append(rng.permutation(members)[:examples_per_class])
  return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def subset_indices(source: Source, split: str, config: Mapping[str, Any]) -> np.ndarray | None:
  """Indices of the k-per-class subset, or None when the whole split is used."""
  k = config.get('examples_per_class')
  if not k:
    return None
  return select_per_class(source.labels(split), int(k), int(config.get('subset_seed', 0)))


def train_size(source: Source, config: Mapping[str, Any]) -> int:
  """Training examples per epoch: the whole split or its k-per-class subset."""
  chosen = subset_indices(source, config['train_split'], config)
  return source.num_examples(config['train_split']) if chosen is None else len(chosen)


def _split_keys(source: Source, config: Mapping[str, Any]) -> dict[str, str]:
  """data.<key> -> split name, for the splits a run reads (val_split only when set)."""
  keys = {'train_split': config['train_split'], 'eval_split': config['eval_split']}
  val = validation_split(config)
  if val is not None:
    keys['val_split'] = val
  return keys


def check_splits(source: Source, config: Mapping[str, Any], num_classes: int) -> int:
  """Training examples per epoch, once every split is known to be usable by a model with
  `num_classes` outputs: not empty, the dataset's class count equal to it, labels in range,
  and the validation split sharing no example with the training or test split."""
  if source.num_classes is not None and source.num_classes != num_classes:
    names = getattr(source, 'class_names', None)
    raise DataError(f'model.num_classes={num_classes} but the dataset has '
                    f'{source.num_classes} classes' + (f' ({", ".join(names)})' if names else ''))
  keys = _split_keys(source, config)
  if 'val_split' in keys:
    for key in ('eval_split', 'train_split'):
      if source.overlaps(keys['val_split'], keys[key]):
        raise DataError(f'data.val_split={config["val_split"]!r} shares examples with '
                        f'data.{key}={keys[key]!r}; validation must be disjoint from both the '
                        'training and the test split (e.g. train[:90%] / train[90%:], or a '
                        'fraction such as 0.1)')
  train_examples = train_size(source, config)
  for split in keys.values():
    source.check_channels(split, int(config.get('channels', 3)))
  for key, split in keys.items():
    size = train_examples if key == 'train_split' else source.num_examples(split)
    if size == 0:
      raise DataError(f'split {split!r} (data.{key}) has no examples')
  if source.num_classes is None:  # labels of arrays: nothing else bounds them
    for key in keys:
      labels = source.labels(keys[key])
      bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
      if bad.size:
        raise DataError(f'label {labels[bad[0]]} of example {bad[0]} in split {keys[key]!r} '
                        f'(data.{key}) is outside [0, {num_classes}) (model.num_classes); '
                        f'{bad.size} labels are out of range')
  if source.labels_in_memory:  # a class never seen in training is one the model cannot learn
    seen = np.bincount(source.labels(config['train_split']), minlength=num_classes)
    absent = np.flatnonzero(seen[:num_classes] == 0).tolist()
    if absent:
      names = getattr(source, 'class_names', None)
      shown = [names[c] for c in absent] if names else absent
      raise DataError(f'class(es) {shown} have no examples in split {config["train_split"]!r} '
                      '(data.train_split); add examples, or leave the class out (data.classes '
                      'or model.num_classes)')
  return train_examples


def _named_decode_errors(batches: Iterator[Any], source: Source, split: str) -> Iterator[Any]:
  """`batches`, with an image that fails to decode reported as one error naming the files."""
  try:
    yield from batches
  except tf.errors.InvalidArgumentError as e:
    found = source.corrupt_files(split)  # changed since they were checked at the start
    if found:
      raise DataError(image_files.message(split, found)) from None
    reason = e.message.strip().splitlines()[-1] if e.message else type(e).__name__
    raise DataError(f'cannot decode an example of split {split!r}: {reason}') from None


def _train_records(source: Source, config: Mapping[str, Any]) -> tuple[tf.data.Dataset, int]:
  """The training split's records (k per class if asked) and how many; an empty split is an
  error naming it."""
  split = config['train_split']
  records = source.records(split)
  chosen = subset_indices(source, split, config)
  if chosen is None:
    total = source.num_examples(split)
  else:
    keep = np.zeros(source.num_examples(split), bool)
    keep[chosen] = True
    keep_table = tf.constant(keep)
    records = records.enumerate().filter(lambda i, _: keep_table[i]).map(lambda _, r: r)
    # A k-shot subset is small: keep its undecoded records in memory instead of rescanning the
    # whole split every epoch.
    records, total = records.cache(), int(keep.sum())
  if total == 0:
    raise DataError(f'split {split!r} (data.train_split) has no examples')
  return records, total


def _global_stream(records: tf.data.Dataset, total: int, config: Mapping[str, Any], *,
                   start_step: int, seed: int, process_index: int, process_count: int
                   ) -> tf.data.Dataset:
  """(global position, record) pairs of this process, from the example `start_step` implies.

  Every epoch reshuffles with a seed derived from the epoch; the order depends only on the
  number of records and the seed, so cached features walk the same order as the examples.
  """
  global_batch = int(config['batch_size'])
  local_batch = global_batch // process_count
  start_epoch, offset = divmod(start_step * global_batch, total)
  buffer = min(total, int(config.get('shuffle_buffer', 10_000)))

  def epoch(e: tf.Tensor) -> tf.data.Dataset:
    shuffled = records.shuffle(buffer, seed=seed * 1_000_003 + e, reshuffle_each_iteration=False)
    # Global position in the stream: it picks the process and keys the augmentation.
    return shuffled.enumerate().map(lambda pos, r: (e * total + pos, r))

  stream = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch).skip(offset)
  return stream.filter(lambda pos, _: (pos % global_batch) // local_batch == process_index)


def is_text(source: Source) -> bool:
  return getattr(source, 'modality', 'image') == 'text'


def _tokenized(texts: tf.data.Dataset, config: Mapping[str, Any]) -> tf.data.Dataset:
  """Batches of text records -> batches of model inputs and labels (tljax.data.text)."""
  tokenizer = text.load_tokenizer(config['tokenizer'], int(config['max_length']))
  return texts.map(lambda b: {**tokenizer.tf_encode(b['text']), 'label': b['label']},
                   num_parallel_calls=AUTOTUNE, deterministic=True)


def text_inputs(texts: list[str], config: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The model inputs of `texts`, tokenised as the pipeline tokenises them."""
  tokenizer = text.load_tokenizer(config['tokenizer'], int(config['max_length']))
  return {k: v for k, v in tokenizer.encode(texts).items() if k != 'truncated'}


def truncated_counts(source: Source, config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  """For each split a run reads (by its data.* key): its name, how many texts it holds and how
  many of them are longer than data.max_length tokens (cut to it)."""
  tokenizer = text.load_tokenizer(config['tokenizer'], int(config['max_length']))
  counts = {}
  for key, split in _split_keys(source, config).items():
    texts = source.texts(split)
    counts[key] = dict(split=split, texts=len(texts),
                       truncated=tokenizer.count_truncated(texts))
  return counts


def train_batches(source: Source, config: Mapping[str, Any], *, start_step: int, seed: int,
                  process_index: int = 0, process_count: int = 1
                  ) -> Iterator[dict[str, np.ndarray]]:
  """Endless local batches for steps `start_step`, `start_step + 1`, ... of this process.

  Every process walks the same seeded global order (records are cheap: paths, encoded bytes
  or array rows) and decodes only its slice of each global batch, so the global batch at each
  step is the same whatever the number of processes.
  """
  records, total = _train_records(source, config)
  local_batch = int(config['batch_size']) // process_count
  if is_text(source):  # each process tokenises its own share, a batch at a time
    stream = _global_stream(records, total, config, start_step=start_step, seed=seed,
                            process_index=process_index, process_count=process_count)
    stream = stream.map(lambda _, record: record).batch(local_batch, drop_remainder=True)
    yield from _tokenized(stream, config).prefetch(AUTOTUNE).as_numpy_iterator()
    return
  if config.get('cache_decoded'):
    # Decode and resize every example once (on every process) and keep the uint8 result.
    records = records.map(preprocess.make_decode_fn(config, source.decode),
                          num_parallel_calls=AUTOTUNE, deterministic=True).cache()
    example_fn = preprocess.make_augment_fn(config, seed)
  else:
    example_fn = preprocess.make_train_fn(config, source.decode, seed)
  stream = _global_stream(records, total, config, start_step=start_step, seed=seed,
                          process_index=process_index, process_count=process_count)
  stream = stream.map(example_fn, num_parallel_calls=AUTOTUNE, deterministic=True)
  stream = stream.batch(local_batch, drop_remainder=True)
  yield from _named_decode_errors(stream.prefetch(AUTOTUNE).as_numpy_iterator(), source,
                                  config['train_split'])


def ordered_train_examples(source: Source, config: Mapping[str, Any], seed: int
                           ) -> Iterator[dict[str, np.ndarray]]:
  """The training examples (k per class if asked) once, in record order, preprocessed as
  `train_batches` preprocesses them: the input of feature caching."""
  records, total = _train_records(source, config)
  if is_text(source):
    yield from _tokenized(records.batch(int(config['batch_size'])), config).prefetch(
        AUTOTUNE).as_numpy_iterator()
    return
  example_fn = preprocess.make_train_fn(config, source.decode, seed)
  examples = records.enumerate().map(example_fn, num_parallel_calls=AUTOTUNE, deterministic=True)
  yield from _named_decode_errors(
      examples.batch(int(config['batch_size'])).prefetch(AUTOTUNE).as_numpy_iterator(), source,
      config['train_split'])


def array_batches(arrays: Mapping[str, np.ndarray], config: Mapping[str, Any], *,
                  start_step: int, seed: int, process_index: int = 0, process_count: int = 1
                  ) -> Iterator[dict[str, np.ndarray]]:
  """Local batches of in-memory rows (cached features) in the order `train_batches` walks a
  split of the same size, so a cached run sees each example at the same step."""
  total = len(arrays['label'])
  positions = tf.data.Dataset.range(total)
  stream = _global_stream(positions, total, config, start_step=start_step, seed=seed,
                          process_index=process_index, process_count=process_count)
  stream = stream.map(lambda _, index: index)
  stream = stream.batch(int(config['batch_size']) // process_count, drop_remainder=True)
  for indices in stream.prefetch(AUTOTUNE).as_numpy_iterator():
    yield {k: v[indices] for k, v in arrays.items()}


class EvalBatches:
  """One eval split's pipeline, built once and walked at every eval.

  Building the tf.data graph (and listing files) once keeps periodic evals cheap and keeps source
  access out of the training loop. Every walk yields the same number of padded batches on every
  process, so collective eval steps line up.
  """

  def __init__(self, source: Source, config: Mapping[str, Any], *, process_index: int = 0,
               process_count: int = 1, split: str | None = None):
    split = self.split = split or config['eval_split']
    self.source = source
    total = source.num_examples(split)
    if total == 0:
      raise DataError(f'split {split!r} is empty')
    self.local_batch = int(config.get('eval_batch_size') or config['batch_size']) // process_count
    self.num_batches = math.ceil(math.ceil(total / process_count) / self.local_batch)
    ds = source.records(split).shard(process_count, process_index)
    if is_text(source):
      length = int(config['max_length'])
      self._empty = {**{k: np.zeros((0, length), np.int32) for k in text.INPUT_KEYS},
                     'label': np.zeros(0, np.int32)}
      ds = _tokenized(ds.batch(self.local_batch), config)
      if config.get('cache_decoded'):
        ds = ds.cache()
      self._dataset = ds.prefetch(AUTOTUNE)
      return
    size, channels = int(config['image_size']), int(config.get('channels', 3))
    self._empty = {'image': np.zeros((0, size, size, channels), np.float32),
                   'label': np.zeros(0, np.int32)}
    ds = ds.map(preprocess.make_eval_fn(config, source.decode), num_parallel_calls=AUTOTUNE)
    if config.get('cache_decoded'):
      ds = ds.cache()  # evaluation is deterministic: preprocess once, reuse at every eval
    self._dataset = ds.batch(self.local_batch).prefetch(AUTOTUNE)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    produced = 0
    batches = self._dataset.as_numpy_iterator()
    for batch in _named_decode_errors(batches, self.source, self.split):
      yield _pad(batch, self.local_batch)
      produced += 1
    for _ in range(produced, self.num_batches):
      yield _pad(self._empty, self.local_batch)


def _pad(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
  real = len(batch['label'])
  padded = {k: np.concatenate([v, np.zeros((size - real, *v.shape[1:]), v.dtype)])
            for k, v in batch.items()}
  padded['mask'] = np.arange(size) < real
  return padded
