"""Your own image folder: ImageNet MobileNetV2 fine-tuned on `PATH/<split>/<class>/*.jpg|png`.

  python -m tljax.train --config=configs/folder.py:PATH --workdir=DIR [--config.KEY=VALUE ...]

Classes are the folder names under PATH/train (sorted); PATH/test is the test split. PATH/val,
when it exists, is the validation split; otherwise 10% of each class of PATH/train is held out
(seeded, stratified). The checkpoint with the best validation accuracy is kept and reported.
128 px, 10 epochs, full fine-tuning with a 10x head learning rate; every key can be overridden.
"""

import os

from tljax.config import base_config


def get_config(arg=None):
  if not arg:
    raise ValueError('name the image folder: --config=configs/folder.py:PATH')
  train_dir = os.path.join(arg, 'train')
  classes = sorted(d for d in os.listdir(train_dir)
                   if os.path.isdir(os.path.join(train_dir, d))) if os.path.isdir(train_dir) else []
  c = base_config()
  c.model = dict(name='mobilenet_v2', num_classes=max(len(classes), 2))
  c.init.pretrained = 'mobilenet_v2/imagenet'
  c.init.dont_load = ('head/.*',)  # your classes, not ImageNet's 1000
  c.data.update(source='folder', path=arg, train_split='train', eval_split='test',
                val_split='val' if os.path.isdir(os.path.join(arg, 'val')) else 0.1,
                image_size=128, resize_size=146, augment=True, cache_decoded=True,
                batch_size=32, eval_batch_size=64)
  c.optim.update(name='sgd', lr=0.01, momentum=0.9, weight_decay=1e-4, clip_norm=1.0,
                 schedule=dict(name='cosine', warmup_steps=0))
  c.freeze.update(preset='full', head_lr_mult=10.0)
  c.select.update(metric='accuracy', mode='max')
  c.total_epochs = 10.0
  c.log_every, c.eval_every, c.checkpoint_every = 10, 10, 100
  return c
