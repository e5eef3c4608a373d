"""k-shot plant disease recognition: freeze depth x examples per class x seed on PlantVillage.

  python -m tljax.ablate --config=configs/ablations/plant_village_kshot.py \
      --workdir=workdirs/plant_village_kshot [--print-commands]

ImageNet MobileNetV2 (configs/plant_village.py) with 1, 5 and 20 training leaves per class and
the whole 80% training slice; five freeze depths; three seeds (the k-shot subset is drawn per
`data.subset_seed`, kept fixed, so the seeds vary initialisation and data order only). Epochs
shrink as data grows (about 90, 180, 360 and 1,360 steps at batch 64). Needs the prepared TFDS
data (see configs/plant_village.py); not run here, so no measured table yet.
"""

from tljax.report import PlotSpec
from tljax.sweep import Axis, Sweep

PRESETS = ('scratch', 'full', 'stages:4', 'stages:7', 'linear_probe')


def get_config(arg=None):
  del arg
  return Sweep(
      title='PlantVillage k-shot, ImageNet MobileNetV2',
      base='configs/plant_village.py',
      variants=[(preset.replace(':', ''), {'freeze.preset': preset}) for preset in PRESETS],
      axes=[Axis('k', 'data.examples_per_class', (1, 5, 20, None),
                 linked={'total_epochs': (150.0, 60.0, 30.0, 2.0)}),
            Axis('seed', 'seed', (0, 1, 2))],
      plot=PlotSpec(),
  )
