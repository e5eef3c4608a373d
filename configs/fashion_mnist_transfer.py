"""Transfer between halves of Fashion-MNIST: pretrain a CNN on 5 classes, fine-tune on the others.

  python -m tljax.train --config=configs/fashion_mnist_transfer.py:pretrain --workdir=W/pretrain
  python -m tljax.train --config=configs/fashion_mnist_transfer.py:transfer --workdir=W/transfer \
      --config.init.pretrained=W/pretrain

`pretrain` trains on classes 0-4 (T-shirt, trouser, pullover, dress, coat); `transfer` starts from
those weights, freezes the stem and stage1, gives the new zero-initialised head (5 classes:
sandal, shirt, sneaker, bag, ankle boot) a 10x learning rate and trains the rest with
`examples_per_class` labelled images per class (arg `transfer:N`, default 100).
`scratch[:N]` trains the same network with the same data from random weights, for comparison.
A small worked example (it was the first `make demo`); data from Debian's dataset-fashion-mnist
(MIT).
"""

from tljax.config import base_config


def get_config(arg: str | None = None):
  mode, _, shots = (arg or 'transfer').partition(':')
  if mode not in ('pretrain', 'transfer', 'scratch'):
    raise ValueError(f"arg must be 'pretrain', 'transfer[:N]' or 'scratch[:N]', got {arg!r}")
  c = base_config()
  c.model = dict(name='small_cnn', num_classes=5, width=16)
  c.data.update(source='idx', path='/usr/share/datasets/fashion-mnist', image_size=28,
                channels=1, augment=False, mean=(0.286,), std=(0.353,), batch_size=64,
                eval_batch_size=500)
  c.optim.update(name='sgd', lr=0.05, momentum=0.9, weight_decay=5e-4, clip_norm=1.0,
                 schedule=dict(name='cosine', warmup_steps=20))
  c.log_every, c.checkpoint_every = 50, 200
  if mode == 'pretrain':
    c.data.classes = (0, 1, 2, 3, 4)
    c.total_steps = 600
  else:
    c.data.classes = (5, 6, 7, 8, 9)
    c.data.examples_per_class = int(shots or 100)
    c.total_steps = 300
    if mode == 'transfer':
      c.init.dont_load = ('head/.*',)
      c.optim.groups = [('stem/.*|stage1/.*', None), ('head/.*', dict(lr_mult=10.0)),
                        ('.*', {})]
  return c
