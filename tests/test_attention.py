"""Attention against an independent numpy reference; padding changes nothing it should not."""

import jax.numpy as jnp
import numpy as np
import pytest

from xmodal.models import attention


def numpy_attention(q, k, v, mask):
  """Loop-free but independent reference: float64 numpy, per (batch, head), masked keys excluded."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  batch, lq, heads, dh = q.shape
  out = np.zeros_like(q)
  for b in range(batch):
    keep = np.ones(k.shape[1], bool) if mask is None else np.asarray(mask[b], bool)
    for h in range(heads):
      scores = q[b, :, h] @ k[b, keep, h].T / np.sqrt(dh)
      scores -= scores.max(axis=-1, keepdims=True)
      weights = np.exp(scores)
      weights /= weights.sum(axis=-1, keepdims=True)
      out[b, :, h] = weights @ v[b, keep, h]
  return out


def _qkv(seed, batch=3, lq=5, lk=7, heads=2, dh=8):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(batch, lq, heads, dh)).astype(np.float32),
          rng.normal(size=(batch, lk, heads, dh)).astype(np.float32),
          rng.normal(size=(batch, lk, heads, dh)).astype(np.float32))


@pytest.mark.parametrize('padded', [False, True])
def test_xla_attention_matches_numpy_reference(padded):
  q, k, v = _qkv(0)
  mask = None
  if padded:
    lengths = np.array([7, 4, 1])
    mask = np.arange(7)[None] < lengths[:, None]
  out = attention.dot_product_attention(q, k, v, None if mask is None else jnp.asarray(mask), impl='xla')
  np.testing.assert_allclose(np.asarray(out), numpy_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_library_path_reads_masks_like_the_xla_path():
  """The cudnn path hands jax.nn.dot_product_attention key lengths; its XLA form on CPU must agree with ours."""
  q, k, v = _qkv(1)
  mask = jnp.asarray(np.arange(7)[None] < np.array([[2], [7], [5]]))
  ours = attention.dot_product_attention(q, k, v, mask, impl='xla')
  library = attention._library_attention(q, k, v, mask, implementation='xla')
  np.testing.assert_allclose(np.asarray(ours), np.asarray(library), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('lq, lk, lengths', [(5, 7, None), (9, 13, [13, 4, 1]), (8, 16, [16, 9, 3])])
def test_library_path_padding_to_even_lengths_is_exact(lq, lk, lengths):
  """The cudnn path pads odd lengths (ViT's 257 tokens) to a multiple of 8; the numpy reference sees no padding."""
  q, k, v = _qkv(3, lq=lq, lk=lk)
  mask = None if lengths is None else np.arange(lk)[None] < np.array(lengths)[:, None]
  library = attention._library_attention(q, k, v, None if mask is None else jnp.asarray(mask), implementation='xla')
  assert library.shape == q.shape
  np.testing.assert_allclose(np.asarray(library), numpy_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_unknown_attention_impl_is_an_error():
  q, k, v = _qkv(2)
  with pytest.raises(ValueError, match='flash'):
    attention.dot_product_attention(q, k, v, None, impl='flash')


@pytest.mark.slow  # initialises the tiny model (session fixture) and compiles its towers
def test_padded_text_tokens_change_no_real_token(tiny_model):
  model, variables = tiny_model
  rng = np.random.default_rng(0)
  length = model.spec.max_text_len
  ids = rng.integers(5, 100, size=(2, length)).astype(np.int32)
  mask = (np.arange(length)[None] < np.array([[6], [11]])).astype(np.int32)
  other = np.where(mask == 1, ids, rng.integers(5, 100, size=ids.shape)).astype(np.int32)
  tokens_a, emb_a = model.apply(variables, ids, mask, method=type(model).encode_text)
  tokens_b, emb_b = model.apply(variables, other, mask, method=type(model).encode_text)
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(tokens_a)[real], np.asarray(tokens_b)[real], atol=1e-5)
  np.testing.assert_allclose(np.asarray(emb_a), np.asarray(emb_b), atol=1e-5)


@pytest.mark.slow  # initialises the tiny model (session fixture) and compiles its towers
def test_padded_image_tokens_change_no_match_logit(tiny_model):
  model, variables = tiny_model
  rng = np.random.default_rng(1)
  s = model.spec
  text = rng.normal(size=(2, s.max_text_len, s.text.width)).astype(np.float32)
  text_mask = np.ones((2, s.max_text_len), np.int32)
  image = rng.normal(size=(2, 9, s.vision.width)).astype(np.float32)
  image_mask = np.arange(9)[None] < np.array([[9], [4]])
  noisy = np.where(image_mask[..., None], image, rng.normal(size=image.shape)).astype(np.float32)
  logits_a = model.apply(variables, text, text_mask, image, image_mask, method=type(model).match)
  logits_b = model.apply(variables, text, text_mask, noisy, image_mask, method=type(model).match)
  np.testing.assert_allclose(np.asarray(logits_a), np.asarray(logits_b), atol=1e-5)
  # And the mask matters: without it the noise does change the logits.
  logits_c = model.apply(variables, text, text_mask, noisy, None, method=type(model).match)
  assert np.abs(np.asarray(logits_c) - np.asarray(logits_a)).max() > 1e-4
