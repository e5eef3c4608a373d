"""ImageNet MobileNetV2 transferred to ELPV solar-cell defects (4 grades; binary at p >= 0.5).

  python -m tljax.train --config=configs/elpv.py --workdir=workdirs/elpv
  python -m tljax.train --config=configs/elpv.py:demo --workdir=workdirs/elpv_demo \
      --config.freeze.preset=linear_probe --config.data.examples_per_class=25

ELPV (`pip install elpv-dataset`, CC-BY-NC-SA-4.0): 2,624 grayscale 300x300 electroluminescence
images of solar cells, each with a defect probability 0, 1/3, 2/3 or 1 (classes 0-3). Train and
test are the fixed 75/25 split (1,968 / 656 cells) stratified by grade and cell type, as in
Deitsch et al. 2019, whose ImageNet-transfer VGG-19 reached 88.42% average accuracy. 10% of the
training cells (197) are held out for validation, which selects the reported checkpoint.

`full` (default) trains at 224 px for 30 epochs; `demo` at 64 px for a short schedule, the
resolution and length that keep `make demo` (10 runs) within ten minutes on a 2-core CPU. The
freeze depth comes from `freeze.preset`; the sweeps are configs/ablations/elpv_*.py.
"""

from tljax.config import base_config


def get_config(arg: str | None = None):
  mode = arg or 'full'
  if mode not in ('full', 'demo'):
    raise ValueError(f"arg must be 'full' or 'demo', got {arg!r}")
  c = base_config()
  c.model = dict(name='mobilenet_v2', num_classes=4)
  c.init.pretrained = 'mobilenet_v2/imagenet'
  c.init.dont_load = ('head/.*',)  # 4 defect grades instead of 1000 ImageNet classes
  # Validation: 10% of the 1,968 training cells, stratified by grade; the paper's 656 test
  # cells are evaluated once at the end, for the last and the selected checkpoint.
  c.data.update(source='elpv', train_split='train', eval_split='test', val_split=0.1,
                channels=3, augment=True, cache_decoded=True, batch_size=32,
                eval_batch_size=128)
  c.optim.update(name='sgd', lr=0.01, momentum=0.9, weight_decay=1e-4, clip_norm=1.0,
                 label_smoothing=0.0, schedule=dict(name='cosine', warmup_steps=10))
  c.freeze.update(preset='full', head_lr_mult=10.0)
  c.eval_groupings = dict(binary=((0, 1), (2, 3)))  # defective when probability >= 0.5
  if mode == 'full':
    c.data.update(image_size=224, resize_size=256)
    c.total_epochs = 30.0
  else:
    c.data.update(image_size=64, resize_size=72)
    c.total_steps = 60
  c.log_every, c.checkpoint_every = 10, 1000
  c.eval_every = 50 if mode == 'full' else 10  # on the validation split; selects `best`
  return c
