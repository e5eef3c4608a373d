"""BERT encoder (post-LayerNorm, as in HF transformers `BertModel`) with a classification head.

Paths: `embeddings/{word,position,token_type,norm}`, `layer{i}/{attn,attn_norm,fc1,fc2,out_norm}`,
`head`. The head classifies the sentence vector `pool` names: 'mean' (the token states averaged
over real tokens, as sentence-transformers pools) or 'cls' (BERT's pooler, tanh(dense([CLS])), at
`head/pooler`, then the classifier, as HF `BertForSequenceClassification`). Either way the head
is the last of STAGES and its input is one vector per text, so a frozen encoder can be cached.
`encode` gives the token states; `mean_pool` sentence embeddings.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tljax.errors import UserError
from tljax.models.convert import TorchLayout

POOLS = ('mean', 'cls')  # model.pool
INPUTS = ('input_ids', 'attention_mask', 'token_type_ids')  # what a text batch feeds the model


def stages(depth: int) -> tuple[str, ...]:
  return ('embeddings', *(f'layer{i}' for i in range(depth)), 'head')


class _Embeddings(nn.Module):
  vocab_size: int
  max_positions: int
  type_vocab_size: int
  width: int
  epsilon: float

  @nn.compact
  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
    init = nn.initializers.normal(0.02)
    x = nn.Embed(self.vocab_size, self.width, embedding_init=init, name='word')(input_ids)
    positions = jnp.arange(input_ids.shape[1])[None]
    x = x + nn.Embed(self.max_positions, self.width, embedding_init=init,
                     name='position')(positions)
    x = x + nn.Embed(self.type_vocab_size, self.width, embedding_init=init,
                     name='token_type')(token_type_ids)
    return nn.LayerNorm(self.epsilon, name='norm')(x)


class _Layer(nn.Module):
  num_heads: int
  mlp_dim: int
  epsilon: float
  dropout: float

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, train: bool) -> jax.Array:
    y = nn.MultiHeadDotProductAttention(self.num_heads, dropout_rate=self.dropout,
                                        deterministic=not train, name='attn')(x, x, mask=mask)
    x = nn.LayerNorm(self.epsilon, name='attn_norm')(
        x + nn.Dropout(self.dropout, deterministic=not train)(y))
    y = nn.gelu(nn.Dense(self.mlp_dim, name='fc1')(x), approximate=False)
    y = nn.Dense(x.shape[-1], name='fc2')(y)
    return nn.LayerNorm(self.epsilon, name='out_norm')(
        x + nn.Dropout(self.dropout, deterministic=not train)(y))


class _Head(nn.Module):
  """Classifier of the pooled vector; with `pooler`, BERT's tanh(dense) pooler first."""
  num_classes: int
  pooler: bool
  dropout: float

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.pooler:
      x = jnp.tanh(nn.Dense(x.shape[-1], name='pooler')(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    kernel = self.param('kernel', nn.initializers.zeros, (x.shape[-1], self.num_classes))
    bias = self.param('bias', nn.initializers.zeros, (self.num_classes,))
    return x @ kernel.astype(x.dtype) + bias.astype(x.dtype)


class Bert(nn.Module):
  num_classes: int = 2
  vocab_size: int = 30522
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  max_positions: int = 512
  type_vocab_size: int = 2
  epsilon: float = 1e-12
  dropout: float = 0.1
  pool: str = 'cls'  # one of POOLS

  def setup(self):
    if self.pool not in POOLS:
      raise ValueError(f'model.pool={self.pool!r} must be one of {POOLS}')
    self.embeddings = _Embeddings(self.vocab_size, self.max_positions, self.type_vocab_size,
                                  self.width, self.epsilon)
    self.layers = [_Layer(self.num_heads, self.mlp_dim, self.epsilon, self.dropout,
                          name=f'layer{i}') for i in range(self.depth)]
    self.head = _Head(self.num_classes, self.pool == 'cls', self.dropout)
    self.drop = nn.Dropout(self.dropout)

  def encode(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
             token_type_ids: jax.Array | None = None, train: bool = False) -> jax.Array:
    """Token states (N, L, D)."""
    if input_ids.shape[-1] > self.max_positions:
      raise ValueError(f'{input_ids.shape[-1]} tokens, more than the model\'s '
                       f'{self.max_positions} positions (data.max_length must not exceed '
                       'model.max_positions)')
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = self.drop(self.embeddings(input_ids, token_type_ids), deterministic=not train)
    mask = nn.make_attention_mask(jnp.ones_like(attention_mask), attention_mask)
    for layer in self.layers:
      x = layer(x, mask, train)
    return x

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               token_type_ids: jax.Array | None = None, train: bool = False) -> jax.Array:
    states = self.encode(input_ids, attention_mask, token_type_ids, train)
    if self.pool == 'cls':
      pooled = states[:, 0]
    else:
      pooled = mean_pool(states, jnp.ones_like(input_ids) if attention_mask is None
                         else attention_mask)
    return self.head(pooled, train)


def mean_pool(states: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """Mean of the token states over real (unpadded) tokens, as sentence-transformers pools."""
  weights = attention_mask[..., None].astype(states.dtype)
  return jnp.sum(states * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1e-9)


def from_hf(flat: Mapping[str, np.ndarray], model: Bert) -> dict[str, np.ndarray]:
  """HF transformers BertModel / BertForSequenceClassification safetensors -> tljax variables."""
  src = TorchLayout(flat, 'bert/' if any(k.startswith('bert/') for k in flat) else '')
  for name in ('word', 'position', 'token_type'):
    src.put(f'embeddings/{name}/embedding', src.take(f'embeddings/{name}_embeddings/weight'))
  src.layer_norm('embeddings/LayerNorm', 'embeddings/norm')
  i = 0
  while src.has(f'encoder/layer/{i}/attention/self/query/weight'):
    s, d = f'encoder/layer/{i}', f'layer{i}'
    src.attention([f'{s}/attention/self/{n}' for n in ('query', 'key', 'value')], f'{d}/attn',
                  f'{s}/attention/output/dense', model.num_heads)
    src.layer_norm(f'{s}/attention/output/LayerNorm', f'{d}/attn_norm')
    src.dense(f'{s}/intermediate/dense', f'{d}/fc1')
    src.dense(f'{s}/output/dense', f'{d}/fc2')
    src.layer_norm(f'{s}/output/LayerNorm', f'{d}/out_norm')
    i += 1
  if model.pool == 'cls':
    src.dense('pooler/dense', 'head/pooler')
  else:  # a mean-pooling head has no use for the pooler
    src.take('pooler/dense/weight')
    src.take('pooler/dense/bias')
  src.prefix = ''
  src.dense('classifier', 'head')
  return src.result()


def hf_config(model: Bert) -> dict[str, object]:
  """The `transformers.BertConfig` arguments of `model`'s encoder."""
  return dict(vocab_size=model.vocab_size, hidden_size=model.width,
              num_hidden_layers=model.depth, num_attention_heads=model.num_heads,
              intermediate_size=model.mlp_dim, max_position_embeddings=model.max_positions,
              type_vocab_size=model.type_vocab_size, layer_norm_eps=model.epsilon,
              hidden_act='gelu', hidden_dropout_prob=model.dropout,
              attention_probs_dropout_prob=model.dropout)


def to_hf(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """tljax variables -> HF `BertModel` state-dict keys (the inverse of `from_hf`), so
  `transformers.BertModel(config, add_pooling_layer=<pool 'cls'>)` loads the encoder with
  strict loading. The classifier (`head/kernel`, `head/bias`) has no place in BertModel."""
  flat = dict(flat)
  used: set[str] = set()
  out: dict[str, np.ndarray] = {}

  def take(path: str) -> np.ndarray:
    used.add(f'params/{path}')
    return np.asarray(flat[f'params/{path}'])

  def dense(path: str, key: str) -> None:
    out[f'{key}.weight'] = np.ascontiguousarray(take(f'{path}/kernel').T)
    out[f'{key}.bias'] = take(f'{path}/bias')

  def norm(path: str, key: str) -> None:
    out[f'{key}.weight'], out[f'{key}.bias'] = take(f'{path}/scale'), take(f'{path}/bias')

  for name in ('word', 'position', 'token_type'):
    out[f'embeddings.{name}_embeddings.weight'] = take(f'embeddings/{name}/embedding')
  norm('embeddings/norm', 'embeddings.LayerNorm')
  i = 0
  while f'params/layer{i}/fc1/kernel' in flat:
    s, d = f'encoder.layer.{i}', f'layer{i}'
    for name in ('query', 'key', 'value'):
      kernel = take(f'{d}/attn/{name}/kernel')  # (D, heads, head_dim)
      out[f'{s}.attention.self.{name}.weight'] = np.ascontiguousarray(
          kernel.reshape(kernel.shape[0], -1).T)
      out[f'{s}.attention.self.{name}.bias'] = take(f'{d}/attn/{name}/bias').reshape(-1)
    kernel = take(f'{d}/attn/out/kernel')  # (heads, head_dim, D)
    out[f'{s}.attention.output.dense.weight'] = np.ascontiguousarray(
        kernel.reshape(-1, kernel.shape[-1]).T)
    out[f'{s}.attention.output.dense.bias'] = take(f'{d}/attn/out/bias')
    norm(f'{d}/attn_norm', f'{s}.attention.output.LayerNorm')
    dense(f'{d}/fc1', f'{s}.intermediate.dense')
    dense(f'{d}/fc2', f'{s}.output.dense')
    norm(f'{d}/out_norm', f'{s}.output.LayerNorm')
    i += 1
  if 'params/head/pooler/kernel' in flat:
    dense('head/pooler', 'pooler.dense')
  used |= {'params/head/kernel', 'params/head/bias'}
  left = sorted(k for k in set(flat) - used if not k.startswith('batch_stats/'))
  if left:
    raise UserError(f'the hf layout has no place for {len(left)} variable(s) of this model: '
                    f'{", ".join(left[:5])}; export it in the tljax layout instead')
  return out
