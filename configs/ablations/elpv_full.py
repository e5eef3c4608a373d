"""The ELPV freeze ablation at higher fidelity than `make demo`: 128 px, longer schedules.

  python -m tljax.ablate --config=configs/ablations/elpv_full.py --workdir=workdirs/elpv_full

The variants of configs/ablations/elpv_demo.py (scratch, full fine-tune, first 4 or 7 stages
frozen, linear probe; 20 cells per class and the whole 1,968-cell training split) at 128 px,
with 100 steps for the 20-per-class runs and 5 epochs (310 steps) for the whole split: about
half an hour on a 2-core CPU. configs/elpv.py (224 px, 30 epochs) is the full-resolution run
for an accelerator.

Measured on the 2-core CPU: the table is in the README ("Higher fidelity").
"""

import dataclasses

from tljax.config import load_config_file
from tljax.sweep import Axis


def get_config(arg=None):
  del arg
  demo = load_config_file('configs/ablations/elpv_demo.py')
  return dataclasses.replace(
      demo, title='ELPV, ImageNet MobileNetV2, 128 px',
      overrides={'data.image_size': 128, 'data.resize_size': 144},
      axes=[Axis('k', 'data.examples_per_class', (20, None), linked={'total_steps': (100, 310)}),
            Axis('seed', 'seed', (0,))])
