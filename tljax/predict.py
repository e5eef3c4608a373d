"""Top-k classes of a fine-tuned run (or a zoo model) on image files and folders, or on texts.

  python -m tljax.predict --workdir DIR [--step best|last|N] IMAGE... | FOLDER... [--csv OUT]
  python -m tljax.predict --pretrained mobilenet_v2/imagenet photo.jpg
  python -m tljax.predict --workdir TEXT_RUN --text "..." [--text "..."] | --file TEXTS.txt

A text run's workdir brings its tokenizer (tokenizer.json) and max_length; `--file` holds one
text a line (blank lines are left out).

A workdir brings its class names and preprocessing (model.json); a folder is searched for image
files (.png, .jpg, .jpeg, .bmp, .gif, .webp) at any depth and run in batches. Every input is checked
before anything is computed: a file that is not a usable image is an error naming it, unless
--skip-unreadable leaves it out (and says so). Exit status: 0 done, 2 bad input.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from tljax import cli
from tljax.errors import UserError

# As tljax.data.sources.IMAGE_EXTENSIONS (a test keeps them equal); importing that module here
# would load TensorFlow and TFDS before the first argument is checked.
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp')

CLASS_FILE = os.path.join(os.path.dirname(__file__), 'data', 'imagenet_classes.tsv')
MAX_PIXELS = 100_000_000


def imagenet_classes() -> list[str]:
  """ImageNet-1k class names in label order (WordNet lemmas, first synonym first)."""
  with open(CLASS_FILE) as f:
    return [line.rstrip('\n').split('\t')[1] for line in f]


@dataclasses.dataclass
class Predictor:
  """A model ready to classify images: variables, class names and its evaluation view."""
  model: Any
  variables: dict[str, Any]
  class_names: list[str]
  preprocessing: dict[str, Any]  # image_size, resize_size, channels, mean, std
  source: str  # what was loaded, for the report

  @classmethod
  def from_workdir(cls, workdir: str, step: str | int = 'best') -> Predictor:
    from tljax import saved_model
    model, variables, record = saved_model.load(workdir, step)
    count = int(record['model']['num_classes'])
    names = record.get('class_names') or [f'class {i}' for i in range(count)]
    return cls(model, variables, list(names), dict(record['preprocessing']),
               f'{workdir} step {record["step"]}')

  @property
  def is_text(self) -> bool:
    return self.preprocessing.get('modality') == 'text'

  @classmethod
  def from_zoo(cls, name: str) -> Predictor:
    import tljax
    from tljax.weights import zoo
    entry = zoo.get(name)
    if entry.labels != 'imagenet':
      raise UserError(f'{name!r} is not an ImageNet-1k classifier')
    model, variables = tljax.create(entry.model, pretrained=name)
    pre = entry.preprocessing
    return cls(model, variables, imagenet_classes(),
               dict(image_size=pre.image_size, resize_size=pre.resize, channels=3,
                    mean=pre.mean, std=pre.std), name)

  def view_config(self) -> dict[str, Any]:
    """The preprocessing as tljax.data.preprocess reads it (its evaluation view)."""
    pre = self.preprocessing
    return dict(image_size=pre['image_size'], resize_size=pre['resize_size'], augment=True,
                resize_mode=pre.get('resize_mode', 'crop'), channels=pre.get('channels', 3),
                mean=tuple(pre['mean']), std=tuple(pre['std']))


def find_images(inputs: Sequence[str]) -> list[str]:
  """Image files named by `inputs`: files as given, folders searched at any depth (sorted);
  a missing input or a folder without images is an error naming it."""
  found = []
  for item in inputs:
    if os.path.isdir(item):
      inside = sorted(_walk_images(item))
      if not inside:
        raise UserError(f'folder {item} holds no image files ({", ".join(IMAGE_EXTENSIONS)}); '
                        'name image files or a folder that holds some')
      found += inside
    elif os.path.lexists(item):
      found.append(item)
    else:
      raise UserError(f'{item}: no such file or folder')
  return found


def _walk_images(folder: str) -> list[str]:
  """Image files under `folder` at any depth, through linked folders too, each real folder
  visited once (a link loop ends)."""
  seen, found = set(), []
  for root, dirs, names in os.walk(folder, followlinks=True):
    real = os.path.realpath(root)
    if real in seen:
      dirs[:] = []
      continue
    seen.add(real)
    found += [os.path.join(root, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
  return found


def check_images(paths: list[str], skip_unreadable: bool, max_pixels: int = MAX_PIXELS
                 ) -> tuple[list[str], dict[str, str]]:
  """(usable paths, {unusable path: why}); unusable ones are an error unless skipped."""
  from tljax.data import image_files
  bad = image_files.problems(paths, max_pixels, limit_name='--max_pixels')
  if bad and not skip_unreadable:
    shown = '; '.join(f'{ascii(p)[1:-1]} ({why})' for p, why in sorted(bad.items())[:5])
    more = f'; and {len(bad) - 5} more' if len(bad) > 5 else ''
    raise UserError(f'{len(bad)} input(s) cannot be read as images: {shown}{more}. Remove them, '
                    'or pass --skip-unreadable to leave them out')
  return [p for p in paths if p not in bad], bad


def _batches(paths: list[str], config: dict[str, Any], batch_size: int
             ) -> Iterator[np.ndarray]:
  """Evaluation views of `paths`, decoded in parallel, in batches of `batch_size` (the last
  one padded, so one compiled program serves every batch)."""
  from tljax.data import image_files, preprocess
  from tljax.data.tf_quiet import tf
  channels = int(config['channels'])

  def view(path):
    image = image_files.decode(tf.io.read_file(path), channels)
    return preprocess.normalised_view(image, config)

  names = [os.fsencode(p) for p in paths]  # bytes: any file name the system allows
  dataset = (tf.data.Dataset.from_tensor_slices(tf.constant(names, tf.string))
             .map(view, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
             .batch(batch_size).prefetch(tf.data.AUTOTUNE))
  try:
    for batch in dataset.as_numpy_iterator():
      if len(batch) < batch_size:
        batch = np.concatenate([batch, np.zeros((batch_size - len(batch), *batch.shape[1:]),
                                                batch.dtype)])
      yield batch
  except tf.errors.OpError as e:  # a file changed or vanished after it was checked
    reason = (e.message or type(e).__name__).strip().splitlines()[-1]
    raise UserError(f'an input image could no longer be read ({reason}); was it changed '
                    'or removed during the run? Run the command again') from None


def predict(predictor: Predictor, paths: list[str], top_k: int = 5, batch_size: int = 32,
            progress: bool = False) -> list[list[tuple[str, float]]]:
  """Per image, the `top_k` (class name, probability), most likely first."""
  import jax
  apply = jax.jit(lambda variables, images: jax.nn.softmax(
      predictor.model.apply(variables, images, train=False), axis=-1))
  batch_size = max(1, min(batch_size, len(paths)))
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=len(paths), unit='image', file=sys.stderr, leave=False)
  results = []
  k = min(top_k, len(predictor.class_names))
  for batch in _batches(paths, predictor.view_config(), batch_size):
    probs = np.asarray(apply(predictor.variables, batch))[:len(paths) - len(results)]
    for row in probs:
      results.append([(predictor.class_names[i], float(row[i])) for i in np.argsort(-row)[:k]])
    if bar is not None:
      bar.update(len(probs))
  if bar is not None:
    bar.close()
  return results


def read_text_file(path: str) -> list[str]:
  """The non-blank lines of a UTF-8 file, one text each; other bytes are an error naming the
  line."""
  from tljax.data import text
  try:
    content = text.read_utf8(path)
  except UserError as e:
    raise UserError(f'--file {e}') from None
  texts = [line for line in content.splitlines() if line.strip()]
  if not texts:
    raise UserError(f'--file {path} holds no text (one text a line)')
  return texts


def predict_texts(predictor: Predictor, workdir: str, texts: list[str], top_k: int = 5,
                  batch_size: int = 32) -> tuple[list[list[tuple[str, float]]], int]:
  """Per text, the `top_k` (class name, probability), most likely first; and how many texts
  were longer than the run's max_length tokens (cut to it, as in training)."""
  import os

  import jax

  from tljax import saved_model
  from tljax.data import text
  path = os.path.join(workdir, saved_model.TOKENIZER_FILE)
  try:
    tokenizer = text.load_tokenizer(path, int(predictor.preprocessing['max_length']))
  except UserError as e:
    raise UserError(f'{str(e).replace(" (data.tokenizer)", "")}; the run copied its '
                    f'data.tokenizer to {path}: copy it there again') from None
  apply = jax.jit(lambda variables, *inputs: jax.nn.softmax(
      predictor.model.apply(variables, *inputs, train=False), axis=-1))
  k = min(top_k, len(predictor.class_names))
  results, truncated = [], 0
  for start in range(0, len(texts), batch_size):
    chunk = texts[start:start + batch_size]
    arrays = tokenizer.encode(chunk + [''] * (batch_size - len(chunk)) if len(texts) > batch_size
                              else chunk)  # one compiled shape for every batch
    truncated += int(arrays['truncated'][:len(chunk)].sum())
    probs = np.asarray(apply(predictor.variables, *(arrays[key] for key in text.INPUT_KEYS)))
    for row in probs[:len(chunk)]:
      results.append([(predictor.class_names[i], float(row[i])) for i in np.argsort(-row)[:k]])
  return results, truncated


def write_csv(path: str, paths: list[str], results: list[list[tuple[str, float]]],
              force: bool = False, first_column: str = 'path') -> None:
  """One row per image: path, then (class, probability) for each of the top k; written whole
  or not at all."""
  k = max((len(r) for r in results), default=0)
  partial = f'{path}.{os.getpid()}.partial'  # its own: another run may write the same CSV
  try:
    with open(partial, 'w', newline='', encoding='utf-8', errors='surrogateescape') as f:
      writer = csv.writer(f)
      writer.writerow([first_column] + [f'{kind}_{i}' for i in range(1, k + 1)
                                  for kind in ('class', 'probability')])
      for image, top in zip(paths, results, strict=True):
        writer.writerow([image] + [cell for name, prob in top
                                   for cell in (name, f'{prob:.6f}')])
    if force:
      os.replace(partial, path)
    else:  # a file made meanwhile (another run) is kept: link fails where it exists
      taken = UserError(f'--csv {path} was created by someone else while this ran; pass '
                        '--force to replace it, or name another file')
      try:
        os.link(partial, path)
      except FileExistsError:
        raise taken from None
      except OSError:  # a filesystem without hard links: check, then rename
        if os.path.lexists(path):
          raise taken from None
        os.replace(partial, path)
      finally:
        if os.path.exists(partial):
          os.remove(partial)
  except OSError as e:
    if os.path.exists(partial):
      os.remove(partial)
    raise UserError(f'could not write --csv {path}: {e.strerror or e}') from None


def printable(path: str) -> str:
  """A file name as the terminal can show it: undecodable bytes replaced, control characters
  (a newline in a name) escaped, so one name is one line."""
  text = os.fsencode(path).decode('utf-8', 'replace')
  return ''.join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _check_csv(path: str | None, force: bool) -> None:
  from tljax import workdir
  if path is not None:
    workdir.check_new_file(path, '--csv', force)


def main(argv: Sequence[str] | None = None) -> None:
  from tljax import preemption
  preemption.install_early()
  parser = cli.ArgumentParser(prog='python -m tljax.predict', description=__doc__.split(
      '\n')[0])
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument('--workdir', help='a tljax run (its model.json and checkpoints)')
  source.add_argument('--pretrained', help='a zoo ImageNet classifier, e.g. mobilenet_v2/imagenet')
  parser.add_argument('--step', default='best', help="'best' (selected on validation; the last "
                      "without a validation split), 'last' or a step number")
  parser.add_argument('inputs', nargs='*', metavar='IMAGE_OR_FOLDER')
  parser.add_argument('--text', action='append', help='a text to classify (a text run; may be '
                      'given several times)')
  parser.add_argument('--file', help='a UTF-8 file of texts to classify, one a line')
  parser.add_argument('--top_k', '--top-k', type=int, default=5, help='classes per image')
  parser.add_argument('--csv', help='write one row per image to this file')
  parser.add_argument('--force', action='store_true', help='replace an existing --csv file')
  parser.add_argument('--batch_size', '--batch-size', type=int, default=32)
  parser.add_argument('--max_pixels', '--max-pixels', type=int, default=MAX_PIXELS,
                      help='refuse (or skip) images with more pixels than this, read from '
                      'their headers before decoding')
  parser.add_argument('--skip-unreadable', '--skip_unreadable', action='store_true',
                      help='leave out inputs that are not usable images (counted) instead of '
                      'failing')
  args = parser.parse_args(argv)
  try:
    if args.top_k < 1 or args.batch_size < 1:
      raise UserError(f'--top_k={args.top_k} and --batch_size={args.batch_size} must be >= 1')
    _check_csv(args.csv, args.force)
    if args.text or args.file:
      _main_text(args)
      return
    if not args.inputs:
      raise UserError('name image files or folders, or give --text / --file for a text run')
    if args.max_pixels < 1:
      raise UserError(f'--max_pixels={args.max_pixels} must be >= 1')
    if args.workdir:  # its record says what it reads, before any image is opened
      from tljax import saved_model
      if saved_model.read_record(args.workdir)['preprocessing'].get('modality') == 'text':
        raise UserError(f'{args.workdir} is a text run: give texts with --text or --file, not '
                        'images')
    paths, bad = check_images(find_images(args.inputs), args.skip_unreadable, args.max_pixels)
    if args.csv and os.path.realpath(args.csv) in {os.path.realpath(p) for p in paths}:
      raise UserError(f'--csv {args.csv} is one of the input images; name another file')
    if not paths:
      raise UserError('none of the inputs is a usable image')
    predictor = (Predictor.from_workdir(args.workdir, args.step) if args.workdir
                 else Predictor.from_zoo(args.pretrained))
    results = predict(predictor, paths, args.top_k, args.batch_size,
                      progress=len(paths) > args.batch_size)
    if args.csv:
      write_csv(args.csv, paths, results, args.force)
  except UserError as e:
    print('error: ' + ' '.join(str(e).splitlines()), file=sys.stderr)
    sys.exit(2)
  finally:
    preemption.ignore_from_now()
  if bad:
    print(f'skipped {len(bad)} unreadable input(s): '
          f'{", ".join(printable(p) for p in sorted(bad)[:5])}'
          + (' ...' if len(bad) > 5 else ''), file=sys.stderr)
  _print_results(f'# {predictor.source}: {len(paths)} image(s)',
                 [printable(p) for p in paths], results, args.csv)


def _print_results(header: str, inputs: list[str], results: list[list[tuple[str, float]]],
                   csv_path: str | None) -> None:
  """Each input's line, then its top classes with their probabilities."""
  print(header)
  for shown, top in zip(inputs, results, strict=True):
    print(shown)
    for name, prob in top:
      print(f'  {prob:7.2%}  {name}')
  if csv_path:
    print(f'wrote {csv_path} ({len(inputs)} rows)')


def _shown(text: str, width: int = 70) -> str:
  line = ' '.join(text.split())
  return printable(line if len(line) <= width else line[:width - 3] + '...')


def _main_text(args: Any) -> None:
  """--text / --file: classify texts with a text run's workdir."""
  if args.inputs:
    raise UserError(f'--text/--file classify texts; {args.inputs[0]!r} looks like an image '
                    'input: give one or the other')
  if not args.workdir:
    raise UserError('--text and --file need --workdir (a text run)')
  texts = list(args.text or []) + (read_text_file(args.file) if args.file else [])
  empty = [i for i, t in enumerate(texts) if not t.strip()]
  if empty:
    raise UserError(f'--text number {empty[0] + 1} is empty; give the text to classify')
  predictor = Predictor.from_workdir(args.workdir, args.step)
  if not predictor.is_text:
    raise UserError(f'{args.workdir} is an image run: name image files or folders, not '
                    '--text or --file')
  results, truncated = predict_texts(predictor, args.workdir, texts, args.top_k,
                                     args.batch_size)
  if args.csv:
    write_csv(args.csv, texts, results, args.force, first_column='text')
  _print_results(f'# {predictor.source}: {len(texts)} text(s)'
                 + (f', {truncated} longer than max_length='
                    f'{predictor.preprocessing["max_length"]} tokens (cut to it)'
                    if truncated else ''), [_shown(t) for t in texts], results, args.csv)


if __name__ == '__main__':
  main()
