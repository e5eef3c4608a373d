"""Per-example image preprocessing in tf.data: decode, resize, crop, flip, normalise.

Training randomness is stateless and seeded by the example's position in the stream, so a
resumed run sees exactly the augmentations an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from tljax.config import RESIZE_MODES
from tljax.data.tf_quiet import tf  # TF with accelerators hidden

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_size(config: Mapping[str, Any]) -> int:
  """Side the image is resized to before cropping `image_size` (default: 8/7 of it)."""
  return int(config.get('resize_size') or round(config['image_size'] * 8 / 7))


def resize_mode(config: Mapping[str, Any]) -> str:
  """data.resize_mode: 'crop' keeps the aspect ratio (shorter side resized, then a square crop:
  random in training, central otherwise); 'squash' resizes to a square first. Training and
  evaluation use the same one."""
  mode = config.get('resize_mode') or 'crop'
  if mode not in RESIZE_MODES:
    raise ValueError(f'data.resize_mode must be one of {RESIZE_MODES}, got {mode!r}')
  return mode


def _resized(image: tf.Tensor, side: int, mode: str) -> tf.Tensor:
  """`image` with its shorter side `side` (aspect kept), or squashed to `side` x `side`."""
  if mode == 'squash':
    return tf.image.resize(image, (side, side), antialias=True)
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  new_shape = tf.cast(tf.round(shape * (side / tf.reduce_min(shape))), tf.int32)
  return tf.image.resize(image, tf.maximum(new_shape, side), antialias=True)


def _central(image: tf.Tensor, size: int) -> tf.Tensor:
  shape = tf.shape(image)
  top, left = (shape[0] - size) // 2, (shape[1] - size) // 2
  return tf.ensure_shape(image[top:top + size, left:left + size], (size, size, image.shape[-1]))


def _to_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
  """Grayscale arrays to RGB; encoded images were decoded with `channels` already."""
  if channels == 3 and image.shape[-1] == 1:
    return tf.image.grayscale_to_rgb(image)
  return image


def _normalise(image: tf.Tensor, config: Mapping[str, Any]) -> tf.Tensor:
  mean = tf.constant(config.get('mean') or IMAGENET_MEAN, tf.float32)
  std = tf.constant(config.get('std') or IMAGENET_STD, tf.float32)
  return (tf.cast(image, tf.float32) / 255.0 - mean) / std


def make_decode_fn(config: Mapping[str, Any], decode: Callable) -> Callable:
  """record -> record with the image decoded and resized as `resize_mode` says to the side
  augmentation crops from (`resize_size`), or without augmentation to the evaluation view's
  central crop; still uint8: deterministic, so `data.cache_decoded` can keep its output in
  memory."""
  channels = int(config.get('channels', 3))
  augment, mode = config.get('augment', True), resize_mode(config)
  side = resize_size(config) if augment else int(config['image_size'])

  def fn(record: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    image = _to_channels(decode(record['image'], channels), channels)
    image = _resized(image, side, mode)
    if not augment:
      image = _central(image, side)
    image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    return {'image': image, 'label': tf.cast(record['label'], tf.int32)}

  return fn


def make_augment_fn(config: Mapping[str, Any], seed: int) -> Callable:
  """(position, decoded record) -> example; random crop + flip keyed on (seed, position)."""
  size, channels = int(config['image_size']), int(config.get('channels', 3))
  augment = bool(config.get('augment', True))

  def fn(position: tf.Tensor, record: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    image = record['image']
    if augment:
      key = tf.stack([tf.constant(seed, tf.int64), tf.cast(position, tf.int64)])
      crop_key, flip_key = tf.unstack(
          tf.random.experimental.stateless_split(key, num=2))
      image = tf.image.stateless_random_crop(image, (size, size, channels), seed=crop_key)
      image = tf.image.stateless_random_flip_left_right(image, seed=flip_key)
    return {'image': _normalise(image, config), 'label': record['label']}

  return fn


def make_train_fn(config: Mapping[str, Any], decode: Callable, seed: int) -> Callable:
  """(position, record) -> example: decode and resize, then augment."""
  decode_fn, augment_fn = make_decode_fn(config, decode), make_augment_fn(config, seed)
  return lambda position, record: augment_fn(position, decode_fn(record))


def central_crop(image: tf.Tensor, size: int, resize: int, mode: str = 'crop') -> tf.Tensor:
  """Resized to `resize` as `mode` says (shorter side, aspect kept, for 'crop': the usual
  ImageNet evaluation view), then the central `size` x `size` crop."""
  return _central(_resized(image, resize, mode), size)


def normalised_view(image: tf.Tensor, config: Mapping[str, Any]) -> tf.Tensor:
  """A decoded image as the model sees it at evaluation (crop, then mean/std)."""
  size = int(config['image_size'])
  resize = resize_size(config) if config.get('augment', True) else size
  return _normalise(central_crop(image, size, resize, resize_mode(config)), config)


def make_eval_fn(config: Mapping[str, Any], decode: Callable) -> Callable:
  """record -> example; resize then central crop, no randomness."""
  channels = int(config.get('channels', 3))

  def fn(record: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    image = _to_channels(decode(record['image'], channels), channels)
    return {'image': normalised_view(image, config),
            'label': tf.cast(record['label'], tf.int32)}

  return fn
