"""Export: a workdir's checkpoint as .safetensors, read back bit for bit by tljax, and in
torchvision's layout loaded by PyTorch with strict=True, giving the same logits."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from flax import traverse_util
from helpers import REPO, snapshot
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import tljax
from benchmarks import torch_models
from tljax import checkpoint, export, saved_model
from tljax.config import base_config
from tljax.weights import read


def _perturbed(variables, seed=0):
  """Every variable moved off its initial value (zero heads, unit BatchNorm statistics), so a
  misplaced or mistransposed array changes the logits."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(jax.device_get(variables), sep='/')
  for key, value in flat.items():
    noise = rng.normal(0, 0.05, np.shape(value)).astype(np.float32)
    flat[key] = (np.abs(value) + 0.5 + noise if key.endswith('/var') else value + noise)
  return traverse_util.unflatten_dict(flat, sep='/')


def _workdir(root, name, num_classes=5, image_size=32, step=7):
  """A workdir as a run leaves it: model.json and one checkpoint of the (perturbed) variables."""
  model, variables = tljax.create(name, num_classes=num_classes, image_size=image_size)
  variables = _perturbed(variables)
  config = base_config()
  config.model = dict(name=name, num_classes=num_classes)
  config.data.image_size = image_size
  os.makedirs(root)
  with open(os.path.join(root, saved_model.RECORD_FILE), 'w') as f:
    json.dump(saved_model.make_record(config, [f'c{i}' for i in range(num_classes)]), f)
  saver = checkpoint.Checkpointer(str(root), keep=1)
  saver.save(step, dict(step=np.int32(step), params=variables['params'],
                        batch_stats=variables['batch_stats'], opt_state={}))
  saver.close()
  return model, variables


def _flat(variables):
  return traverse_util.flatten_dict(
      {'params': variables['params'], 'batch_stats': variables['batch_stats']}, sep='/')


def test_a_reloaded_export_is_bitwise_the_checkpoint_with_its_record(tmp_path):
  _, variables = _workdir(tmp_path / 'run', 'resnet18')
  out = str(tmp_path / 'model.safetensors')
  metadata = export.export(str(tmp_path / 'run'), out, 'last')
  written = read.read_safetensors(out)
  expected = _flat(variables)
  assert written.keys() == expected.keys()
  for key, value in expected.items():
    assert written[key].dtype == value.dtype and np.array_equal(written[key], value), key
  with safe_open(out, 'np') as f:
    stored = f.metadata()
  assert stored == metadata and json.loads(stored['class_names'])[0] == 'c0'
  assert json.loads(stored['preprocessing'])['image_size'] == 32 and stored['step'] == '7'
  # tljax.create reads it back as pretrained weights, every array in place.
  _, loaded = tljax.create('resnet18', num_classes=5, image_size=32, pretrained=out)
  for key, value in _flat(loaded).items():
    assert np.array_equal(np.asarray(value), expected[key]), key


class _TorchvisionMobileNetV2(nn.Module):
  """torchvision's MobileNetV2 module tree (`features`, `classifier`), from the benchmark's
  layers (torchvision has no wheel for our pinned torch)."""

  def __init__(self, num_classes):
    super().__init__()
    stages = torch_models.mobilenet_v2(num_classes)
    blocks = [block for stage in stages[1:-2] for block in stage]
    self.features = nn.Sequential(stages[0], *blocks, stages[-2])
    self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

  def forward(self, x):
    return self.classifier(self.features(x).mean((2, 3)))


class _BasicBlock(nn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                     nn.BatchNorm2d(cout))
                       if stride != 1 or cin != cout else None)

  def forward(self, x):
    out = torch.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class _TorchvisionResNet18(nn.Module):
  """torchvision's resnet18 module tree, written out."""

  def __init__(self, num_classes):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    cin = 64
    for index, width in enumerate((64, 128, 256, 512), start=1):
      stride = 1 if index == 1 else 2
      setattr(self, f'layer{index}', nn.Sequential(_BasicBlock(cin, width, stride),
                                                   _BasicBlock(width, width, 1)))
      cin = width
    self.fc = nn.Linear(512, num_classes)

  def forward(self, x):
    x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
    for index in range(1, 5):
      x = getattr(self, f'layer{index}')(x)
    return self.fc(x.mean((2, 3)))


@pytest.mark.slow
@pytest.mark.parametrize('name, torch_model', [('mobilenet_v2', _TorchvisionMobileNetV2),
                                               ('resnet18', _TorchvisionResNet18)])
def test_torchvision_layout_loads_strictly_in_pytorch_with_the_same_logits(
    tmp_path, name, torch_model):
  model, variables = _workdir(tmp_path / 'run', name)
  out = str(tmp_path / f'{name}.safetensors')
  export.export(str(tmp_path / 'run'), out, 'last', layout='torchvision')
  reference = torch_model(5).eval()
  reference.load_state_dict(load_file(out), strict=True)
  images = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
  expected = np.asarray(model.apply(variables, images, train=False))
  with torch.no_grad():
    logits = reference(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  assert np.abs(expected).max() > 0.1  # the logits depend on every layer
  np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)


def test_export_refuses_to_replace_a_file_and_names_a_layout_the_model_lacks(tmp_path):
  _workdir(tmp_path / 'run', 'small_cnn')
  existing = tmp_path / 'kept.safetensors'
  existing.write_bytes(b'earlier export')
  before = snapshot(tmp_path / 'run')

  def run(*args):
    return subprocess.run([sys.executable, '-m', 'tljax.export', '--workdir',
                           str(tmp_path / 'run'), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})

  for args, fragment in [
      (['--out', str(existing)], f'--out {existing} exists; pass --force'),
      (['--out', str(tmp_path / 'new.safetensors'), '--layout', 'torchvision'],
       "--layout torchvision: model 'small_cnn' exports to tljax"),
      (['--out', str(tmp_path / 'no' / 'x.safetensors')], 'does not exist')]:
    result = run(*args)
    errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert result.returncode == 2 and len(errors) == 1 and fragment in errors[0], result.stderr
  assert existing.read_bytes() == b'earlier export'
  assert not (tmp_path / 'new.safetensors').exists()
  assert snapshot(tmp_path / 'run') == before
  result = run('--out', str(existing), '--force')
  assert result.returncode == 0, result.stderr[-2000:]
  assert read.read_safetensors(str(existing))
