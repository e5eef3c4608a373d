"""Fine-tuning strategies side by side on text: all-MiniLM-L6-v2 on BBC News topics.

  python -m tljax.ablate --config=configs/ablations/strategies_bbc.py --workdir=W
  python -m tljax.ablate --config=configs/ablations/strategies_bbc.py:quick --workdir=W

The strategies of configs/ablations/strategies_elpv.py on configs/bbc_news.py (AdamW 1e-4, the
head at 10x): full fine-tuning, the linear probe, the embeddings and layers 0-2 frozen
(stages:4), layer decay 0.65 and 0.8, gradual unfreezing (a layer more every 6 steps), BitFit
(every bias and LayerNorm), LoRA of rank 4 and 16 on the attention query and value projections
(as Hu et al. 2021) beside the head, and L2-SP. The head-only runs (probe, BitFit, LoRA) learn
at 1e-3 (the head at 1e-2), as the probe of configs/ablations/bbc_kshot.py does. 20 articles
per topic (8 epochs) and the whole training split (2 epochs), three seeds; `quick`: seed 0 on
20 articles per topic.

Measured: see the README ("Beyond freezing: which strategy, at what cost").
"""

from tljax.report import PlotSpec
from tljax.sweep import Axis, Sweep, strategy_variants

QUERY_VALUE = r'.*attn/(query|value)/kernel'
HEAD_ONLY_LR = {'optim.lr': 1e-3}


def get_config(arg=None):
  """arg 'quick': seed 0 on 20 articles per topic only."""
  if arg not in (None, 'quick'):
    raise ValueError(f"arg must be 'quick' or nothing, got {arg!r}")
  quick = arg == 'quick'
  return Sweep(
      title='BBC News topics, all-MiniLM-L6-v2, 128 tokens: fine-tuning strategies',
      base='configs/bbc_news.py',
      variants=strategy_variants(QUERY_VALUE, {'data.cache_features': True, **HEAD_ONLY_LR},
                                 HEAD_ONLY_LR, unfreeze_every=6, l2sp=0.01),
      overrides={'eval_every': 0},
      axes=[Axis('k', 'data.examples_per_class', (20,) if quick else (20, None),
                 linked={'total_epochs': (8.0,) if quick else (8.0, 2.0)}),
            Axis('seed', 'seed', (0,) if quick else (0, 1, 2),
                 linked={'data.subset_seed': (0,) if quick else (0, 1, 2)})],
      plot=PlotSpec(x='trainable_params', x_label='trainable parameters', x_log=True,
                    lines=False, annotate='strategy', reference=None),
  )
