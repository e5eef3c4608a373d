"""The ground truth for transferability scores on ELPV: freeze every stage cut, two models.

  python -m tljax.ablate --config=configs/ablations/elpv_cuts.py --workdir=workdirs/elpv_cuts

ImageNet MobileNetV2 and EfficientNet-Lite0, each with its first K stages frozen for every K
from 1 (the stem) to 9 (all but the head: the linear probe), on 20 cells per class (50 steps)
and the whole 1,968-cell training split (120 steps), at `make demo`'s 64 px, one seed. The
frozen prefix is computed once and cached (augmentation off), so a run costs its trainable
stages; the linear probe runs without the dropout before the head, which caching refuses.
`python -m tljax.transferability --sweep` reads this directory: how well the scores of each
cut, computed in one forward pass, rank the accuracies these 36 runs measure.

Measured: see the README ("Which layers to freeze, before training").
"""

from tljax.sweep import Axis, Sweep

MODELS = (('mnv2', 'mobilenet_v2', 'mobilenet_v2/imagenet'),
          ('effl0', 'efficientnet_lite0', 'efficientnet_lite0/imagenet'))
CUTS = range(1, 10)  # both models have 10 stages; stages:9 trains the head alone


def get_config(arg=None):
  del arg
  variants = [(f'{short}-stages{k}',
               {'model.name': name, 'init.pretrained': weights, 'freeze.preset': f'stages:{k}',
                # The dropout before the head would make the cached prefix random: off for
                # the linear probe (the other cuts train through it, and keep it).
                **({'model.dropout': 0.0} if k == CUTS[-1] else {})},
               dict(model=short, cut=k))
              for short, name, weights in MODELS for k in CUTS]
  return Sweep(
      title='ELPV, 64 px: every stage cut of two ImageNet models',
      base='configs/elpv.py:demo',
      variants=variants,
      overrides={'data.augment': False, 'data.cache_features': True},
      axes=[Axis('k', 'data.examples_per_class', (20, None), linked={'total_steps': (50, 120)}),
            Axis('seed', 'seed', (0,))],
  )
