"""Top-k classes of a pretrained (or fine-tuned) model on image files: a glance that weights loaded.

  python -m tljax.predict --pretrained mobilenet_v2/imagenet photo.jpg [more.jpg ...]
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import app, flags

from tljax.data.tf_quiet import tf
from tljax.errors import UserError

CLASS_FILE = os.path.join(os.path.dirname(__file__), 'data', 'imagenet_classes.tsv')


def imagenet_classes() -> list[str]:
  """ImageNet-1k class names in label order (WordNet lemmas, first synonym first)."""
  with open(CLASS_FILE) as f:
    return [line.rstrip('\n').split('\t')[1] for line in f]


def load_image(path: str, config: dict) -> np.ndarray:
  """A photo file as the model's evaluation view: shorter side resized, central crop, mean/std."""
  from tljax.data import preprocess
  if not os.path.isfile(path):
    raise UserError(f'{path}: no such image file')
  try:
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
  except tf.errors.InvalidArgumentError:
    raise UserError(f'{path}: not a readable image (jpeg, png, gif or bmp)') from None
  return preprocess.normalised_view(image, config).numpy()


def predict(pretrained: str, paths: list[str], top_k: int = 5) -> list[list[tuple[str, float]]]:
  """Per image, the `top_k` (class name, probability) of zoo model `pretrained`."""
  import jax

  import tljax
  from tljax.weights import zoo

  entry = zoo.get(pretrained)
  if entry.labels != 'imagenet':
    raise UserError(f'{pretrained!r} is not an ImageNet-1k classifier')
  model, variables = tljax.create(entry.model, pretrained=pretrained)
  pre = entry.preprocessing
  config = dict(image_size=pre.image_size, resize_size=pre.resize, mean=pre.mean, std=pre.std)
  images = np.stack([load_image(p, config) for p in paths])
  probs = np.asarray(jax.nn.softmax(jax.jit(model.apply)(variables, images), axis=-1))
  names = imagenet_classes()
  return [[(names[i], float(row[i])) for i in np.argsort(-row)[:top_k]] for row in probs]


_PRETRAINED = flags.DEFINE_string('pretrained', None, 'Zoo name, e.g. mobilenet_v2/imagenet.')
_TOP_K = flags.DEFINE_integer('top_k', 5, 'Classes to print per image.')


def main(argv: list[str]) -> None:
  if not _PRETRAINED.value or len(argv) < 2:
    raise app.UsageError('usage: python -m tljax.predict --pretrained NAME IMAGE [IMAGE ...]')
  try:
    results = predict(_PRETRAINED.value, argv[1:], _TOP_K.value)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  for path, top in zip(argv[1:], results, strict=True):
    print(path)
    for name, prob in top:
      print(f'  {prob:7.2%}  {name}')


if __name__ == '__main__':
  app.run(main)
