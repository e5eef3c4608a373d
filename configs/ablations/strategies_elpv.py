"""Fine-tuning strategies side by side: ImageNet MobileNetV2 on ELPV solar-cell defects.

  python -m tljax.ablate --config=configs/ablations/strategies_elpv.py --workdir=W
  python -m tljax.ablate --config=configs/ablations/strategies_elpv.py:quick --workdir=W

Ten strategies on equal terms (the same data, schedule, validation split and selection as
configs/ablations/elpv_full.py, 128 px): full fine-tuning, the linear probe, the first 4
stages frozen, layer-wise learning-rate decay 0.65 and 0.8, gradual unfreezing (a stage more
every 10 steps, from the head down), BitFit (biases and BatchNorm; MobileNetV2's convolutions
have no biases, so here it is the norm-only set), LoRA of rank 4 and 16 on the pointwise (1x1)
convolutions with the rest as in the linear probe, and L2-SP towards the ImageNet weights; on
20 cells per class (100 steps) and the whole training split (310 steps), three seeds. `quick`:
seed 0 at `make demo`'s 64 px and 50 / 120 steps. The table adds the optimizer-state bytes to
the accuracies and times; the plot is test accuracy against trainable parameters.

Measured: see the README ("Beyond freezing: which strategy, at what cost").
"""

from tljax.report import PlotSpec
from tljax.sweep import Axis, Sweep, strategy_variants

POINTWISE = r'.*(expand|project)_conv/kernel|final/conv/kernel'


def get_config(arg=None):
  """arg 'quick': seed 0 at the 64 px and 50 / 120 steps of `make demo` (a stage unfrozen every
  5 steps), what fits beside development on a 2-core CPU."""
  if arg not in (None, 'quick'):
    raise ValueError(f"arg must be 'quick' or nothing, got {arg!r}")
  quick = arg == 'quick'
  return Sweep(
      title='ELPV, ImageNet MobileNetV2, {}: fine-tuning strategies'.format(
          '64 px, short schedule' if quick else '128 px'),
      base='configs/elpv.py:demo',
      variants=strategy_variants(POINTWISE, {}, {}, unfreeze_every=5 if quick else 10,
                                 l2sp=0.01),
      overrides={} if quick else {'data.image_size': 128, 'data.resize_size': 144},
      axes=[Axis('k', 'data.examples_per_class', (20, None),
                 linked={'total_steps': (50, 120) if quick else (100, 310)}),
            Axis('seed', 'seed', (0,) if quick else (0, 1, 2))],
      plot=PlotSpec(x='trainable_params', x_label='trainable parameters', x_log=True,
                    lines=False, annotate='strategy', reference=None),
  )
