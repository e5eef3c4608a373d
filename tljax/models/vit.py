"""Vision Transformer (pre-LayerNorm encoder, class token), with converters from big_vision/vit_jax
npz, timm and HF transformers layouts.

Paths: `embed/patch` (the patchifying conv), `embed/cls`, `embed/pos_embedding`, `block{i}/...`,
`norm`, `head`. `STAGES` depends on depth, so the registry builds it with `stages(depth)`.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tljax.models.convert import TorchLayout

# (width, depth, heads, mlp width) of the standard sizes.
SIZES = {'ti': (192, 12, 3, 768), 's': (384, 12, 6, 1536), 'b': (768, 12, 12, 3072),
         'l': (1024, 24, 16, 4096)}


def stages(depth: int) -> tuple[str, ...]:
  return ('embed', *(f'block{i}' for i in range(depth)), 'norm', 'head')


class EncoderBlock(nn.Module):
  num_heads: int
  mlp_dim: int
  epsilon: float
  gelu_approximate: bool
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = nn.LayerNorm(self.epsilon, name='ln1')(x)
    y = nn.MultiHeadDotProductAttention(self.num_heads, name='attn', deterministic=not train,
                                        dropout_rate=self.dropout)(y, y)
    x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
    y = nn.LayerNorm(self.epsilon, name='ln2')(x)
    y = nn.Dense(self.mlp_dim, name='fc1')(y)
    y = nn.gelu(y, approximate=self.gelu_approximate)
    y = nn.Dense(x.shape[-1], name='fc2')(y)
    return x + nn.Dropout(self.dropout, deterministic=not train)(y)


POOLS = ('tok', 'gap')


class ViT(nn.Module):
  num_classes: int = 1000
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  pool: str = 'tok'  # one of POOLS: 'tok', the class token; 'gap', mean of the patch tokens
  epsilon: float = 1e-6  # timm and big_vision; HF ViT uses 1e-12
  gelu_approximate: bool = False  # big_vision trains with the tanh approximation
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    x = _Embed(self.width, self.patch_size, name='embed')(images.astype(self.dtype))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    for i in range(self.depth):
      x = EncoderBlock(self.num_heads, self.mlp_dim, self.epsilon, self.gelu_approximate,
                       self.dropout, name=f'block{i}')(x, train)
    x = nn.LayerNorm(self.epsilon, name='norm')(x)
    if self.pool not in POOLS:  # never a silent fallback
      raise ValueError(f'pool must be one of {POOLS}, got {self.pool!r}')
    x = x[:, 0] if self.pool == 'tok' else jnp.mean(x[:, 1:], axis=1)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name='head')(x)


class _Embed(nn.Module):
  width: int
  patch_size: int

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    p = self.patch_size
    height, width = images.shape[1:3]
    if height % p or width % p or height < p:  # border pixels would be dropped, or no patch
      raise ValueError(f'images of {height}x{width} are not whole {p}x{p} patches (set '
                       f'data.image_size to a multiple of {p}, or model.patch_size)')
    x = nn.Conv(self.width, (p, p), (p, p), padding='VALID', name='patch')(images)
    n, h, w, c = x.shape
    x = x.reshape(n, h * w, c)
    cls = self.param('cls', nn.initializers.zeros, (1, 1, c), x.dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, c)), x], axis=1)
    posemb = self.param('pos_embedding', nn.initializers.normal(0.02), (1, h * w + 1, c),
                        x.dtype)
    return x + posemb


def resize_posemb(posemb: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """Position embeddings (1, 1 + g*g, D) bilinearly resized to a new square patch grid; the class
  token's embedding is kept as it is."""
  old_grid = int(round(np.sqrt(posemb.shape[1] - 1)))
  new_grid = int(round(np.sqrt(shape[1] - 1)))
  if old_grid**2 != posemb.shape[1] - 1 or new_grid**2 != shape[1] - 1 \
      or posemb.shape[2] != shape[2]:
    raise ValueError(f'cannot resize position embeddings {posemb.shape} to {shape}')
  grid = posemb[0, 1:].reshape(old_grid, old_grid, -1)
  grid = jax.image.resize(jnp.asarray(grid, jnp.float32), (new_grid, new_grid, shape[2]),
                          'bilinear')
  resized = np.concatenate([posemb[0, :1], np.asarray(grid).reshape(new_grid**2, -1)], axis=0)
  return resized[None].astype(posemb.dtype)


RESIZERS = {'params/embed/pos_embedding': resize_posemb}


def _block(src: TorchLayout, i: int, s: str, names: Mapping[str, str], num_heads: int,
           fused_qkv: bool) -> None:
  d = f'block{i}'
  src.layer_norm(f'{s}/{names["ln1"]}', f'{d}/ln1')
  src.layer_norm(f'{s}/{names["ln2"]}', f'{d}/ln2')
  if fused_qkv:
    src.fused_attention(f'{s}/{names["qkv"]}', f'{d}/attn', f'{s}/{names["out"]}', num_heads)
  else:
    src.attention([f'{s}/{names[k]}' for k in ('q', 'k', 'v')], f'{d}/attn',
                  f'{s}/{names["out"]}', num_heads)
  src.dense(f'{s}/{names["fc1"]}', f'{d}/fc1')
  src.dense(f'{s}/{names["fc2"]}', f'{d}/fc2')


def _embed(src: TorchLayout, patch: str, cls: str, posemb: str) -> None:
  src.conv(patch, 'embed/patch')
  src.put('embed/cls', src.take(cls))
  src.put('embed/pos_embedding', src.take(posemb))


HF_NAMES_V5 = dict(ln1='layernorm_before', ln2='layernorm_after', q='attention/q_proj',
                   k='attention/k_proj', v='attention/v_proj', out='attention/o_proj',
                   fc1='mlp/fc1', fc2='mlp/fc2')
HF_NAMES_V4 = dict(ln1='layernorm_before', ln2='layernorm_after', q='attention/attention/query',
                   k='attention/attention/key', v='attention/attention/value',
                   out='attention/output/dense', fc1='intermediate/dense', fc2='output/dense')
TIMM_NAMES = dict(ln1='norm1', ln2='norm2', qkv='attn/qkv', out='attn/proj', fc1='mlp/fc1',
                  fc2='mlp/fc2')


def from_hf(flat: Mapping[str, np.ndarray], model: ViT) -> dict[str, np.ndarray]:
  """HF transformers ViT(ForImageClassification), old (`encoder/layer/i`) or new (`layers/i`)
  key names -> tljax variables."""
  src = TorchLayout(flat, 'vit/' if any(k.startswith('vit/') for k in flat) else '')
  _embed(src, 'embeddings/patch_embeddings/projection', 'embeddings/cls_token',
         'embeddings/position_embeddings')
  layers, names = ('layers', HF_NAMES_V5) if src.has('layers/0/layernorm_before/weight') else (
      'encoder/layer', HF_NAMES_V4)
  i = 0
  while src.has(f'{layers}/{i}/layernorm_before/weight'):
    _block(src, i, f'{layers}/{i}', names, model.num_heads, fused_qkv=False)
    i += 1
  src.layer_norm('layernorm', 'norm')
  src.prefix = ''
  src.dense('classifier', 'head')
  return src.result()


def from_timm(flat: Mapping[str, np.ndarray], model: ViT) -> dict[str, np.ndarray]:
  """timm VisionTransformer state dict (fused `attn/qkv`) -> tljax variables."""
  src = TorchLayout(flat)
  _embed(src, 'patch_embed/proj', 'cls_token', 'pos_embed')
  i = 0
  while src.has(f'blocks/{i}/norm1/weight'):
    _block(src, i, f'blocks/{i}', TIMM_NAMES, model.num_heads, fused_qkv=True)
    i += 1
  src.layer_norm('norm', 'norm')
  src.dense('head', 'head')
  return src.result()


def from_big_vision(flat: Mapping[str, np.ndarray], model: ViT | None = None
                    ) -> dict[str, np.ndarray]:
  """big_vision / vit_jax npz (`Transformer/encoderblock_i/...`, already flax-shaped) -> tljax."""
  out, taken = {}, set()

  def move(src: str, dst: str) -> None:
    if src in flat:
      out[f'params/{dst}'] = np.asarray(flat[src])
      taken.add(src)

  for leaf in ('kernel', 'bias'):
    move(f'embedding/{leaf}', f'embed/patch/{leaf}')
    move(f'head/{leaf}', f'head/{leaf}')
  move('cls', 'embed/cls')
  move('Transformer/posembed_input/pos_embedding', 'embed/pos_embedding')
  move('Transformer/encoder_norm/scale', 'norm/scale')
  move('Transformer/encoder_norm/bias', 'norm/bias')
  i = 0
  while f'Transformer/encoderblock_{i}/LayerNorm_0/scale' in flat:
    s, d = f'Transformer/encoderblock_{i}', f'block{i}'
    for leaf in ('scale', 'bias'):
      move(f'{s}/LayerNorm_0/{leaf}', f'{d}/ln1/{leaf}')
      move(f'{s}/LayerNorm_2/{leaf}', f'{d}/ln2/{leaf}')
    for leaf in ('kernel', 'bias'):
      for name in ('query', 'key', 'value', 'out'):
        move(f'{s}/MultiHeadDotProductAttention_1/{name}/{leaf}', f'{d}/attn/{name}/{leaf}')
      move(f'{s}/MlpBlock_3/Dense_0/{leaf}', f'{d}/fc1/{leaf}')
      move(f'{s}/MlpBlock_3/Dense_1/{leaf}', f'{d}/fc2/{leaf}')
    i += 1
  out.update({f'unconverted/{k}': v for k, v in flat.items() if k not in taken})
  return out


def build(size: str, patch_size: int, **kwargs) -> ViT:
  """`build('b', 16)` is ViT-B/16."""
  width, depth, heads, mlp_dim = SIZES[size]
  return ViT(patch_size=patch_size, width=width, depth=depth, num_heads=heads, mlp_dim=mlp_dim,
             **kwargs)
