"""Converters checked against independent implementations: HF transformers (PyTorch) ViT, ResNet
and BERT, and a NumPy forward pass of all-MiniLM-L6-v2."""

import numpy as np
import pytest

from tljax.models import bert, init_variables, resnet, vit
from tljax.models.layers import NormSpec
from tljax.weights import load, read, zoo

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')


def _randomise(model, seed=0):
  """Every weight and BatchNorm statistic random, so a mapping mistake cannot hide in the
  framework's zero/one initial values."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, tensor in model.state_dict().items():
      if not tensor.is_floating_point():
        continue
      if name.endswith('running_var'):
        tensor.copy_(0.5 + torch.rand(tensor.shape, generator=gen))
      else:
        tensor.copy_(0.1 * torch.randn(tensor.shape, generator=gen))
  return model.eval()


def _load(tmp_path, hf_model, converter, model, *example):
  hf_model.save_pretrained(tmp_path, safe_serialization=True)
  flat = read.read_file(str(tmp_path / 'model.safetensors'))
  fresh = model.init(__import__('jax').random.key(0), *example, train=False)
  variables, report = load.merge(fresh, converter(flat, model))
  assert not report['kept_fresh'] and report['loaded']
  return variables


def _assert_same_image_logits(hf, model, variables, images):
  ours = np.asarray(model.apply(variables, images))
  with torch.no_grad():
    ref = hf(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2))).logits.numpy()
  assert np.abs(ref).max() > 0.1  # random weights give non-trivial logits
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_hf_vit_logits_match(tmp_path):
  config = transformers.ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96, image_size=32, patch_size=8,
                                  num_labels=7)
  hf = _randomise(transformers.ViTForImageClassification(config))
  model = vit.ViT(num_classes=7, patch_size=8, width=48, depth=2, num_heads=4, mlp_dim=96,
                  epsilon=config.layer_norm_eps)
  images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  variables = _load(tmp_path, hf, vit.from_hf, model, images)
  _assert_same_image_logits(hf, model, variables, images)


@pytest.mark.parametrize('layer_type', [pytest.param('basic', marks=pytest.mark.slow),
                                        'bottleneck'])
def test_hf_resnet_logits_match(tmp_path, layer_type):
  width = 8
  hidden = [width * 2**i * (4 if layer_type == 'bottleneck' else 1) for i in range(4)]
  config = transformers.ResNetConfig(embedding_size=width, hidden_sizes=hidden,
                                     depths=[1, 2, 1, 1], layer_type=layer_type, num_labels=5)
  hf = _randomise(transformers.ResNetForImageClassification(config))
  block = resnet.Bottleneck if layer_type == 'bottleneck' else resnet.BasicBlock
  model = resnet.ResNet(stage_sizes=(1, 2, 1, 1), block=block, num_classes=5, width=width,
                        norm=NormSpec())
  images = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32)
  variables = _load(tmp_path, hf, resnet.from_hf, model, images)
  assert 'batch_stats' in variables
  _assert_same_image_logits(hf, model, variables, images)


def test_hf_bert_logits_and_states_match_with_padding(tmp_path):
  config = transformers.BertConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=96, num_labels=3,
                                   max_position_embeddings=64)
  hf = _randomise(transformers.BertForSequenceClassification(config))
  model = bert.Bert(num_classes=3, vocab_size=100, width=48, depth=2, num_heads=4, mlp_dim=96,
                    max_positions=64)
  rng = np.random.default_rng(2)
  ids = rng.integers(1, 100, (2, 11)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 7:] = 0  # padding in the second sentence
  types = np.zeros_like(ids)
  types[:, 6:] = 1
  variables = _load(tmp_path, hf, bert.from_hf, model, ids)
  ours = np.asarray(model.apply(variables, ids, mask, types))
  states = model.apply(variables, ids, mask, types, method=bert.Bert.encode)
  with torch.no_grad():
    out = hf(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
             token_type_ids=torch.from_numpy(types).long(), output_hidden_states=True)
  np.testing.assert_allclose(ours, out.logits.numpy(), rtol=1e-4, atol=1e-4)
  real = mask.astype(bool)  # padded positions' states are not used by anything
  np.testing.assert_allclose(np.asarray(states)[real], out.hidden_states[-1].numpy()[real],
                             rtol=1e-4, atol=1e-4)


def test_vit_posemb_resized_to_a_new_grid_keeps_the_class_token(tmp_path):
  config = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, image_size=32, patch_size=8,
                                  num_labels=3)
  hf = _randomise(transformers.ViTForImageClassification(config))
  hf.save_pretrained(tmp_path, safe_serialization=True)
  model = vit.ViT(num_classes=3, patch_size=8, width=16, depth=1, num_heads=2, mlp_dim=32)
  converted = vit.from_hf(read.read_file(str(tmp_path / 'model.safetensors')), model)
  source = converted['params/embed/pos_embedding']  # (1, 1 + 4*4, 16)
  fresh = init_variables(model, 48)  # a 6x6 grid
  variables, report = load.merge(fresh, converted, resizers=vit.RESIZERS)
  resized = np.asarray(variables['params']['embed']['pos_embedding'])
  assert resized.shape == (1, 37, 16)
  assert report['resized'] == ['params/embed/pos_embedding: (1, 17, 16) -> (1, 37, 16)']
  np.testing.assert_array_equal(resized[0, 0], source[0, 0])
  # Bilinear resizing keeps each channel within its original range.
  grid = source[0, 1:]
  assert np.all(resized[0, 1:] <= grid.max(0) + 1e-6)
  assert np.all(resized[0, 1:] >= grid.min(0) - 1e-6)
  same, report = load.merge(init_variables(model, 32), converted, resizers=vit.RESIZERS)
  assert not report['resized']
  np.testing.assert_array_equal(same['params']['embed']['pos_embedding'], source)


# --- all-MiniLM-L6-v2: tljax BERT vs a NumPy forward pass of the same safetensors file ---

def _numpy_bert(weights, ids, mask, heads=12, eps=1e-12):
  from math import erf, sqrt
  gelu = np.vectorize(lambda v: 0.5 * v * (1 + erf(v / sqrt(2))))

  def layer_norm(x, prefix):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weights[f'{prefix}.weight'] + weights[
        f'{prefix}.bias']

  def linear(x, prefix):
    return x @ weights[f'{prefix}.weight'].T + weights[f'{prefix}.bias']

  n, length = ids.shape
  x = (weights['embeddings.word_embeddings.weight'][ids]
       + weights['embeddings.position_embeddings.weight'][np.arange(length)][None]
       + weights['embeddings.token_type_embeddings.weight'][0])
  x = layer_norm(x, 'embeddings.LayerNorm')
  bias = np.where(mask[:, None, None, :] > 0, 0.0, -1e9)
  i = 0
  while f'encoder.layer.{i}.attention.self.query.weight' in weights:
    p = f'encoder.layer.{i}'
    q, k, v = (linear(x, f'{p}.attention.self.{m}').reshape(n, length, heads, -1)
               .transpose(0, 2, 1, 3) for m in ('query', 'key', 'value'))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1]) + bias
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    attn = (scores / scores.sum(-1, keepdims=True)) @ v
    attn = attn.transpose(0, 2, 1, 3).reshape(n, length, -1)
    x = layer_norm(x + linear(attn, f'{p}.attention.output.dense'),
                   f'{p}.attention.output.LayerNorm')
    y = linear(gelu(linear(x, f'{p}.intermediate.dense')), f'{p}.output.dense')
    x = layer_norm(x + y, f'{p}.output.LayerNorm')
    i += 1
  return x


def _tljax_sentence_embeddings(sentences):
  import jax
  from tokenizers import Tokenizer

  import tljax
  tokenizer = Tokenizer.from_file(zoo.locate(zoo.TOKENIZERS['minilm_l6/all-v2']))
  tokenizer.enable_padding(pad_id=0)
  encodings = tokenizer.encode_batch(sentences)
  ids = np.array([e.ids for e in encodings], np.int32)
  mask = np.array([e.attention_mask for e in encodings], np.int32)
  model, variables = tljax.create('minilm_l6', pretrained='minilm_l6/all-v2')
  states = jax.jit(lambda v, i, m: model.apply(v, i, m, method=bert.Bert.encode))(
      variables, ids, mask)
  return ids, mask, np.asarray(states), np.asarray(bert.mean_pool(states, mask))


def test_minilm_sentence_embeddings_rank_pairs_and_match_numpy():
  from safetensors.numpy import load_file
  sentences = ['A man is playing a guitar.', 'Someone plays an acoustic guitar on stage.',
               'The stock market fell sharply today.', 'Shares dropped after the report.',
               'A cat sleeps on the sofa.', 'The kitten is napping on the couch.']
  ids, mask, states, embeddings = _tljax_sentence_embeddings(sentences)

  weights = load_file(zoo.fetch('minilm_l6/all-v2'))
  ref_states = _numpy_bert(weights, ids, mask)
  real = mask.astype(bool)
  np.testing.assert_allclose(states[real], ref_states[real], rtol=1e-4, atol=1e-4)

  unit = embeddings / np.linalg.norm(embeddings, axis=-1, keepdims=True)
  similarity = unit @ unit.T
  for a in range(0, len(sentences), 2):  # each sentence's partner beats every other sentence
    others = [similarity[a, j] for j in range(len(sentences)) if j not in (a, a + 1)]
    assert similarity[a, a + 1] > max(others), (sentences[a], similarity[a])
