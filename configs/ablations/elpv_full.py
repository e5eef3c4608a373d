"""The ELPV freeze ablation at higher fidelity than `make demo`: 128 px, longer schedules.

  python -m tljax.ablate --config=configs/ablations/elpv_full.py --workdir=workdirs/elpv_full

The variants of configs/ablations/elpv_demo.py (scratch, full fine-tune, first 4 or 7 stages
frozen, linear probe; 20 cells per class and the whole 1,968-cell training split) at 128 px,
with 100 steps for the 20-per-class runs and 5 epochs (310 steps) for the whole split: about
half an hour on a 2-core CPU. configs/elpv.py (224 px, 30 epochs) is the full-resolution run
for an accelerator.

Measured on the 2-core CPU with the command above (35 min for the ten runs, one seed; test
accuracy on the 656 test cells; Deitsch et al. 2019 published 88.42% for VGG-19, 82.44% SVM;
scratch-k20 shared the CPU with a test run, which inflates its times):

  variant            frozen  k    4-class %  binary %  wall   median step
  scratch-k20             0  20       17.84     42.38  241 s  2.065 s
  scratch-kall            0  all      64.79     75.30  578 s  1.752 s
  full-k20                0  20       47.56     72.10  184 s  1.696 s
  full-kall               0  all      73.63     82.47  556 s  1.703 s
  stages4-k20             4  20       53.51     75.00   83 s  0.592 s
  stages4-kall            4  all      75.46     85.37  222 s  0.618 s
  stages7-k20             7  20       47.71     75.76   34 s  0.210 s
  stages7-kall            7  all      71.80     81.86   89 s  0.224 s
  linear_probe-k20        9  20       51.52     74.09   36 s  0.233 s
  linear_probe-kall       9  all      73.63     82.62   86 s  0.235 s
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
