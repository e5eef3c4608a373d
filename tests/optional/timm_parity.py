"""timm ResNet-50 and ViT-S/16 against tljax, outside `make test`: timm needs torchvision, and only
a 5.5 GB CUDA build of torch 2.14.1 + torchvision 0.29.1 installs offline.

Two interpreters, so tljax's environment never needs torchvision:

  python3 -m venv /tmp/timmvenv
  /tmp/timmvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm safetensors numpy
  /tmp/timmvenv/bin/python tests/optional/timm_parity.py export /tmp/timm_parity
  .venv/bin/python tests/optional/timm_parity.py check /tmp/timm_parity
"""

import os
import sys

import numpy as np

MODELS = {'resnet50': 'resnet50', 'vit_small_patch16_224': 'vit_s16'}


def export(directory: str) -> None:
  import timm
  import torch
  from safetensors.torch import save_file

  os.makedirs(directory, exist_ok=True)
  gen = torch.Generator().manual_seed(0)
  images = torch.randn(2, 3, 224, 224, generator=gen)
  for name in MODELS:
    model = timm.create_model(name, pretrained=False, num_classes=1000).eval()
    with torch.no_grad():  # random biases and BatchNorm terms (timm zero-inits some of them)
      for key, tensor in model.state_dict().items():
        if key.endswith('running_var'):
          tensor.copy_(0.5 + torch.rand(tensor.shape, generator=gen))
        elif key.endswith(('running_mean', 'bias')):
          tensor.copy_(0.1 * torch.randn(tensor.shape, generator=gen))
        elif tensor.ndim == 1 and tensor.is_floating_point():  # norm scales
          tensor.copy_(1 + 0.1 * torch.randn(tensor.shape, generator=gen))
      logits = model(images).numpy()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(directory, f'{name}.safetensors'))
    np.save(os.path.join(directory, f'{name}_logits.npy'), logits)
  np.save(os.path.join(directory, 'images.npy'), images.numpy().transpose(0, 2, 3, 1))
  print(f'exported {list(MODELS)} with timm {timm.__version__}, torch {torch.__version__}')


def check(directory: str) -> None:
  import jax

  import tljax

  images = np.load(os.path.join(directory, 'images.npy'))
  for name, tljax_name in MODELS.items():
    model, variables = tljax.create(
        tljax_name, num_classes=1000, pretrained=os.path.join(directory, f'{name}.safetensors'),
        layout='timm')
    ours = np.asarray(jax.jit(model.apply)(variables, images))
    ref = np.load(os.path.join(directory, f'{name}_logits.npy'))
    diff = np.abs(ours - ref).max()
    print(f'{name}: max |logit difference| {diff:.2e} (logits up to {np.abs(ref).max():.2f})')
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
  print('timm parity: OK')


if __name__ == '__main__':
  {'export': export, 'check': check}[sys.argv[1]](sys.argv[2])
