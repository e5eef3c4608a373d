"""How much of ImageNet MobileNetV2 to freeze for your own image folder (configs/folder.py).

  python -m tljax.ablate --config=configs/ablations/folder_freeze.py:PATH --workdir=DIR

Linear probe, the first 7 stages frozen, and full fine-tuning, one seed each; every run selects
its checkpoint on the validation split, and the table reports validation accuracy and the test
scores of that checkpoint.
"""

from tljax.sweep import Sweep

PRESETS = ('linear_probe', 'stages:7', 'full')


def get_config(arg=None):
  if not arg:
    raise ValueError('name the image folder: --config=configs/ablations/folder_freeze.py:PATH')
  return Sweep(
      title=f'{arg}: how much of ImageNet MobileNetV2 to freeze',
      base=f'configs/folder.py:{arg}',
      variants=[(preset.replace(':', ''), {'freeze.preset': preset}) for preset in PRESETS],
  )
