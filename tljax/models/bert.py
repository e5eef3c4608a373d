"""BERT encoder (post-LayerNorm, as in HF transformers `BertModel`) with a classification head.

Paths: `embeddings/{word,position,token_type,norm}`, `layer{i}/{attn,attn_norm,fc1,fc2,out_norm}`,
`pooler`, `head`. `encode` gives token states and the pooled [CLS] vector; `__call__` gives logits;
`mean_pool` gives sentence-transformers style sentence embeddings.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tljax.models.convert import TorchLayout


def stages(depth: int) -> tuple[str, ...]:
  return ('embeddings', *(f'layer{i}' for i in range(depth)), 'pooler', 'head')


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

  def setup(self):
    self.embeddings = _Embeddings(self.vocab_size, self.max_positions, self.type_vocab_size,
                                  self.width, self.epsilon)
    self.layers = [_Layer(self.num_heads, self.mlp_dim, self.epsilon, self.dropout,
                          name=f'layer{i}') for i in range(self.depth)]
    self.pooler = nn.Dense(self.width, name='pooler')
    self.head = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name='head')
    self.drop = nn.Dropout(self.dropout)

  def encode(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
             token_type_ids: jax.Array | None = None, train: bool = False
             ) -> tuple[jax.Array, jax.Array]:
    """(token states (N, L, D), pooled tanh(dense([CLS])) (N, D))."""
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = self.drop(self.embeddings(input_ids, token_type_ids), deterministic=not train)
    mask = nn.make_attention_mask(jnp.ones_like(attention_mask), attention_mask)
    for layer in self.layers:
      x = layer(x, mask, train)
    return x, jnp.tanh(self.pooler(x[:, 0]))

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               token_type_ids: jax.Array | None = None, train: bool = False) -> jax.Array:
    _, pooled = self.encode(input_ids, attention_mask, token_type_ids, train)
    return self.head(self.drop(pooled, deterministic=not train))


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
  src.dense('pooler/dense', 'pooler')
  src.prefix = ''
  src.dense('classifier', 'head')
  return src.result()
