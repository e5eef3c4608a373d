"""Smoke config: the small CNN on TFDS `plant_village` mocked by tfds.testing.mock_data.

Frozen stem, trainable rest, head at 10x learning rate. Used by tests; with real data prepared,
  python -m tljax.train --config=configs/mock_tfds_small_cnn.py --workdir=/tmp/smoke
"""

from tljax.config import base_config


def get_config(arg=None):
  c = base_config()
  c.model = dict(name='small_cnn', num_classes=38, width=8)
  c.data.update(source='tfds', name='plant_village', train_split='train', eval_split='train',
                image_size=16, resize_size=18, batch_size=8)
  c.optim.update(name='sgd', lr=0.05, momentum=0.9, weight_decay=1e-4, clip_norm=1.0,
                 groups=[('stem/.*', None), ('head/.*', dict(lr_mult=10.0)), ('.*', {})])
  c.total_steps, c.log_every, c.checkpoint_every = 20, 5, 10
  return c
