"""A small-scale replication of Yosinski et al. 2014 on Fashion-MNIST halves A and B.

  python -m tljax.ablate --config=configs/ablations/yosinski_fmnist.py --workdir=workdirs/yosinski

baseA and baseB: `layered_cnn` trained from scratch on classes A and on classes B
(configs/yosinski_fmnist.py). Then, for n = 1..6, a network for B whose first n layers are
copied from baseA (AnB) or baseB (BnB, the "selffer") and whose upper layers start afresh,
with the copied layers frozen (AnB, BnB) or fine-tuned (AnB+, BnB+). Every network gets the
same schedule; three seeds, each transfer copying the base of its own seed.
Measured results: README, "Which layers transfer? (Yosinski et al. 2014)".
"""

from tljax.config import load_config_file
from tljax.report import PlotSpec
from tljax.sweep import Axis, Sweep

BASE = 'configs/yosinski_fmnist.py:B'
LAYERS = range(1, 7)  # layered_cnn has 7 stages; n = 7 would copy the head too


def _transfer(source: str, n: int, frozen: bool) -> tuple:
  family = f'{source}nB' + ('' if frozen else '+')
  overrides = {'init.pretrained': f'{{sweep_dir}}/base{source}-seed{{seed}}',
               'init.load_stages': n, 'freeze.preset': f'stages:{n}' if frozen else 'full'}
  return f'{family.replace("+", "plus")}{n}', overrides, dict(family=family, n=n)


def get_config(arg=None):
  """arg 'seed0': seed 0 alone (26 runs; a later run of all seeds in the same workdir skips
  them), what the transferability evaluation reads."""
  if arg not in (None, 'seed0'):
    raise ValueError(f"arg must be 'seed0' or nothing, got {arg!r}")
  a_classes = tuple(load_config_file('configs/yosinski_fmnist.py:A').data.classes)
  variants = [('baseA', {'data.classes': a_classes}, dict(family='baseA')),
              ('baseB', {}, dict(family='baseB'))]
  variants += [_transfer(source, n, frozen) for source in 'BA' for frozen in (True, False)
               for n in LAYERS]
  return Sweep(
      title='Fashion-MNIST halves: transfer of the first n layers (Yosinski et al. 2014)',
      base=BASE, variants=variants,
      axes=[Axis('seed', 'seed', (0,) if arg == 'seed0' else (0, 1, 2))],
      plot=PlotSpec(x='n', series='family', reference=('family', 'baseB'),
                    x_label='layers copied from the base network (n)', series_label='',
                    series_values=('BnB', 'BnB+', 'AnB', 'AnB+')))
