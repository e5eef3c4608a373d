"""Fashion-MNIST halves for the Yosinski et al. (2014) layer-transfer experiment.

  python -m tljax.train --config=configs/yosinski_fmnist.py:A --workdir=workdirs/baseA

Arg 'A' or 'B' picks the half: a seeded random split of the ten classes (numpy
default_rng(0).permutation(10)), A = coat, shirt, pullover, sneaker, dress (2, 3, 4, 6, 7) and
B = T-shirt, trouser, sandal, bag, ankle boot (0, 1, 5, 8, 9), as the paper split ImageNet's
1000 classes at random. A `layered_cnn` (4 conv + 2 dense + head, each its own stage) trained
from scratch: the base network. The sweep is configs/ablations/yosinski_fmnist.py.
Data: Debian's dataset-fashion-mnist (MIT).
"""

from tljax.config import base_config

HALVES = dict(A=(2, 3, 4, 6, 7), B=(0, 1, 5, 8, 9))


def get_config(arg: str | None = None):
  half = arg or 'B'
  if half not in HALVES:
    raise ValueError(f"arg must be 'A' or 'B', got {arg!r}")
  c = base_config()
  c.model = dict(name='layered_cnn', num_classes=5,
                 conv_widths=(8, 8, 16, 16), dense_width=64)
  c.data.update(source='idx', path='/usr/share/datasets/fashion-mnist', classes=HALVES[half],
                image_size=28, channels=1, augment=False, mean=(0.286,), std=(0.353,),
                batch_size=64, eval_batch_size=1000)
  c.optim.update(name='sgd', lr=0.02, momentum=0.9, weight_decay=5e-4,
                 schedule=dict(name='cosine', warmup_steps=20))
  c.total_steps = 400
  c.log_every, c.checkpoint_every = 100, 1000
  return c
