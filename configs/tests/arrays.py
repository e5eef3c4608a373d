"""Test config: the small CNN on an .npz of arrays (set --config.data.path), frozen stem.

  python -m tljax.train --config=configs/tests/arrays.py --workdir=W --config.data.path=F.npz
"""

from tljax.config import base_config


def get_config(arg=None):
  c = base_config()
  c.model = dict(name='small_cnn', num_classes=3, width=4)
  c.data.update(source='npz', image_size=16, resize_size=18, augment=False, batch_size=16,
                eval_batch_size=16)
  c.optim.update(name='sgd', lr=0.1, momentum=0.9, groups=[('stem/.*', None), ('.*', {})])
  c.total_steps, c.log_every, c.checkpoint_every = 6, 2, 3
  return c
