"""Image files checked before a run writes anything: each must be a readable regular file whose
header claims at most `data.max_image_pixels` pixels, and that TensorFlow decodes.

Validity is decided by decoding (a PNG or JPEG with bytes after its end is fine; one damaged
inside its data is not), in one parallel tf.data pass. The pixel count is read from the header
first (PIL, without decoding), so a small file that claims gigabytes of pixels is never decoded.
Results are kept per (path, size, mtime) for the life of the process, so a sweep checks each
file once.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence

from tljax.data.tf_quiet import tf  # TF with accelerators hidden

UNDECODABLE = 'cannot be decoded (damaged, truncated or not an image)'
_decoded_ok: dict[tuple[str, int, int], bool] = {}  # (path, size, mtime_ns) -> decodes


def _entry_problem(path: str) -> tuple[str | None, os.stat_result | None]:
  """Why `path` cannot be read as a file (a dangling or looping link, a directory, a FIFO, no
  permission, a name that is not UTF-8), and its stat when it can."""
  try:
    path.encode('utf-8')
  except UnicodeEncodeError:
    return 'its name is not valid UTF-8, which TensorFlow cannot open; rename it', None
  try:
    info = os.stat(path)
  except OSError as e:
    if os.path.islink(path):
      return f'a dangling or looping symbolic link ({e.strerror})', None
    return e.strerror or str(e), None
  if stat.S_ISDIR(info.st_mode):
    return 'a directory, not an image file', None
  if not stat.S_ISREG(info.st_mode):
    return 'not a regular file', None
  if not os.access(path, os.R_OK, effective_ids=os.access in os.supports_effective_ids):
    return 'not readable (permission denied)', None
  return None, info


def _header_size(path: str) -> tuple[int, int] | None:
  """(width, height) from the file's header, without decoding; None when PIL cannot tell (the
  decoder then decides)."""
  from PIL import Image
  limit = Image.MAX_IMAGE_PIXELS
  Image.MAX_IMAGE_PIXELS = None  # our own limit applies; PIL's would raise before we see size
  try:
    with Image.open(path) as image:
      return image.size
  except Exception:  # noqa: BLE001 (any unreadable header: the decode pass names it)
    return None
  finally:
    Image.MAX_IMAGE_PIXELS = limit


def _decode_webp(data: tf.Tensor, channels: int) -> tf.Tensor:
  """WebP's first frame; decode_image cannot drop the alpha of an RGBA WebP, so this does."""
  rgb = tf.ensure_shape(tf.image.decode_webp(data)[0][..., :3], [None, None, 3])
  return tf.image.rgb_to_grayscale(rgb) if channels == 1 else rgb


def _decode_other(data: tf.Tensor, channels: int) -> tf.Tensor:
  if channels != 1:
    return tf.ensure_shape(tf.io.decode_image(data, channels=channels, expand_animations=False),
                           [None, None, channels])
  is_bmp = tf.strings.substr(data, 0, 2) == b'BM'
  return tf.cond(
      is_bmp,
      lambda: tf.image.rgb_to_grayscale(tf.io.decode_bmp(data, channels=3)),
      lambda: tf.ensure_shape(tf.io.decode_image(data, channels=1, expand_animations=False),
                              [None, None, 1]))


def decode(data: tf.Tensor, channels: int) -> tf.Tensor:
  """Encoded image bytes (PNG, JPEG, GIF's and WebP's first frame, BMP) as uint8
  [H, W, channels]. BMP decodes only to 3 or 4 channels, so a grayscale BMP is decoded as RGB
  and converted."""
  is_webp = tf.logical_and(tf.strings.substr(data, 0, 4) == b'RIFF',
                           tf.strings.substr(data, 8, 4) == b'WEBP')
  return tf.cond(is_webp, lambda: _decode_webp(data, channels),
                 lambda: _decode_other(data, channels))


def undecodable(paths: Sequence[str]) -> list[str]:
  """The image files among `paths` that TensorFlow cannot decode, in one parallel pass."""
  def index_if_readable(index, path):
    image = decode(tf.io.read_file(path), 3)
    return index, tf.shape(image)[0]

  if not paths:
    return []
  readable = (tf.data.Dataset.from_tensor_slices(tf.constant(list(paths), tf.string))
              .enumerate().map(index_if_readable, num_parallel_calls=tf.data.AUTOTUNE)
              .ignore_errors())
  good = {int(index) for index, _ in readable.as_numpy_iterator()}
  return [path for index, path in enumerate(paths) if index not in good]


def problems(paths: Sequence[str], max_pixels: int, limit_name: str = 'data.max_image_pixels'
             ) -> dict[str, str]:
  """`{path: why it cannot be used}` for the files among `paths` that are not usable images."""
  found: dict[str, str] = {}
  to_decode: list[tuple[str, tuple[str, int, int]]] = []
  for path in paths:
    problem, info = _entry_problem(path)
    if problem is not None:
      found[path] = problem
      continue
    size = _header_size(path)
    if size is not None and size[0] * size[1] > max_pixels:
      found[path] = (f'{size[0]} x {size[1]} = {size[0] * size[1]:,} pixels, over '
                     f'{limit_name}={max_pixels:,}')
      continue
    key = (os.path.abspath(path), info.st_size, info.st_mtime_ns)
    if key not in _decoded_ok:
      to_decode.append((path, key))
    elif not _decoded_ok[key]:
      found[path] = _why_undecodable(path)
  bad = set(undecodable([path for path, _ in to_decode]))
  for path, key in to_decode:
    _decoded_ok[key] = path not in bad
    if path in bad:
      found[path] = _why_undecodable(path)
  return found


def _why_undecodable(path: str) -> str:
  """A valid image in a variant TensorFlow lacks (a 1-bit BMP, a TIFF named .png) is not
  'damaged': say what it is and what to do."""
  from PIL import Image
  try:
    with Image.open(path) as image:  # under the pixel limit, checked before decoding
      image.load()  # decodes every pixel: a truncated or damaged file fails here too
      kind = f'a valid {image.format} image of mode {image.mode}'
  except Exception:  # noqa: BLE001 (PIL cannot read it either)
    return UNDECODABLE
  return f'{kind} that TensorFlow cannot decode; convert it to PNG or JPEG'



def message(split: str, found: dict[str, str]) -> str:
  """One line naming the unusable files of `split` (the first five) and what to do."""
  files = sorted(found)
  shown = '; '.join(f'{ascii(str(path))[1:-1]} ({found[path]})' for path in files[:5])
  more = f'; and {len(files) - 5} more' if len(files) > 5 else ''
  return (f'{len(files)} image file(s) of split {split!r} cannot be used: {shown}{more}. '
          'Replace or remove them, or set data.skip_corrupt_images=True to leave them out and '
          'count them')
