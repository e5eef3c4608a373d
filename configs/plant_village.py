"""Plant disease recognition: ImageNet MobileNetV2 transferred to TFDS `plant_village`.

  python -m tljax.train --config=configs/plant_village.py --workdir=workdirs/plant_village \
      --config.data.examples_per_class=10 --config.freeze.preset=linear_probe

PlantVillage (Hughes & Salathe 2015; TFDS `plant_village`, 54,303 leaf photos, 38 crop/disease
classes) ships one split; this config trains on `train[:80%]` and tests on `train[80%:]`, the
split TFDS users commonly take (TFDS writes examples in a seeded shuffled order, so the slices
are random, not per-crop). Prepare the data once where there is network:
  tfds build plant_village   # into ~/tensorflow_datasets; elsewhere: --data_dir and data.data_dir
The k-shot sweep over freeze depths is configs/ablations/plant_village_kshot.py. Tests run
this config on tfds mock data.
"""

from tljax.config import base_config


def get_config(arg=None):
  del arg
  c = base_config()
  c.model = dict(name='mobilenet_v2', num_classes=38)
  c.init.pretrained = 'mobilenet_v2/imagenet'
  c.init.dont_load = ('head/.*',)  # 38 leaf classes instead of 1000 ImageNet classes
  c.data.update(source='tfds', name='plant_village', train_split='train[:80%]',
                eval_split='train[80%:]', image_size=224, resize_size=256, augment=True,
                batch_size=64, eval_batch_size=256)
  c.optim.update(name='sgd', lr=0.01, momentum=0.9, weight_decay=1e-4, clip_norm=1.0,
                 schedule=dict(name='cosine', warmup_steps=50))
  c.freeze.update(preset='full', head_lr_mult=10.0)
  c.total_epochs = 5.0
  c.log_every, c.eval_every, c.checkpoint_every = 50, 0, 500
  return c
