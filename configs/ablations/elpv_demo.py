"""`make demo`: how much of ImageNet MobileNetV2 to freeze for ELPV solar-cell defects.

  python -m tljax.ablate --config=configs/ablations/elpv_demo.py --workdir=workdirs/elpv_demo

Five freeze depths (scratch, full fine-tune, first 4 or 7 stages frozen, linear probe) x two
data sizes (20 training cells per class, and the whole 1,968-cell training split), one seed,
at 64 px with a short schedule so that the ten runs finish within ten minutes on a 2-core CPU.
configs/ablations/elpv_full.py is the same sweep at higher fidelity.

Measured on this 2-core CPU: see the README ("The default demo").
"""

from tljax.report import PlotSpec
from tljax.sweep import Axis, Sweep

PRESETS = ('scratch', 'full', 'stages:4', 'stages:7', 'linear_probe')
# Deitsch et al. 2019 (Solar Energy 185), trained on 1,968 cells at 300 px; their "average
# accuracy" over the four grades, shown in our 4-class accuracy column for comparison.
PUBLISHED = (('Deitsch et al. 2019: VGG-19, ImageNet transfer (published)', {'accuracy': 0.8842}),
             ('Deitsch et al. 2019: SVM on image features (published)', {'accuracy': 0.8244}))


def get_config(arg=None):
  del arg
  return Sweep(
      title='ELPV, ImageNet MobileNetV2, 64 px demo',
      base='configs/elpv.py:demo',
      variants=[(preset.replace(':', ''), {'freeze.preset': preset}) for preset in PRESETS],
      axes=[Axis('k', 'data.examples_per_class', (20, None), linked={'total_steps': (50, 120)}),
            Axis('seed', 'seed', (0,))],
      plot=PlotSpec(),
      published=PUBLISHED,
  )
