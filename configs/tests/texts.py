"""Test config: a tiny BERT (MiniLM's layout and tokenizer, 6 layers of width 16) on a folder of
<split>.csv texts (set --config.data.path).

  python -m tljax.train --config=configs/tests/texts.py --workdir=W --config.data.path=DIR
"""

from tljax.config import base_config
from tljax.weights.zoo import TOKENIZERS


def get_config(arg=None):
  c = base_config()
  c.model = dict(name='minilm_l6', num_classes=3, width=16, num_heads=2, mlp_dim=32,
                 max_positions=64, dropout=0.0)
  c.data.update(source='csv', tokenizer=TOKENIZERS['minilm_l6/all-v2'], max_length=24,
                batch_size=8, eval_batch_size=8)  # data.augment: images only
  c.optim.update(name='adamw', lr=3e-3, schedule=dict(name='constant'))
  c.total_steps, c.log_every, c.checkpoint_every = 6, 2, 3
  return c
