"""The ground truth for transferability scores on BBC News: freeze every MiniLM layer cut.

  python -m tljax.ablate --config=configs/ablations/bbc_cuts.py --workdir=workdirs/bbc_cuts

all-MiniLM-L6-v2 (configs/bbc_news.py) with its first K stages frozen for every K from 1 (the
embeddings) to 7 (the embeddings and all six layers: the linear probe), on 20 training articles
per topic (the same subset for every run, data.subset_seed 0), 8 epochs, two seeds. The frozen
prefix is computed once and cached. As in configs/ablations/bbc_kshot.py the linear probe
learns at 1e-3 (its head at 1e-2), the others at 1e-4 (their new head at 1e-3), and validation
runs once, at the end. `python -m tljax.transferability --sweep` reads this directory.

Measured: see the README ("Which layers to freeze, before training").
"""

from tljax.sweep import Axis, Sweep

CUTS = range(1, 8)  # minilm_l6 has 8 stages: embeddings, layer0-5, head


def get_config(arg=None):
  del arg
  variants = [(f'stages{k}', {'freeze.preset': f'stages:{k}', 'optim.lr': 1e-3 if k == 7 else 1e-4},
               dict(cut=k)) for k in CUTS]
  return Sweep(
      title='BBC News, all-MiniLM-L6-v2, 20 articles per topic: every layer cut',
      base='configs/bbc_news.py',
      variants=variants,
      overrides={'data.cache_features': True, 'eval_every': 0, 'data.examples_per_class': 20,
                 'total_epochs': 8.0},
      axes=[Axis('seed', 'seed', (0, 1))],
  )
