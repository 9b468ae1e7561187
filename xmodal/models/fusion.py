"""Fusion encoder: text tokens attend to themselves, then to image tokens (cross-attention), then an MLP."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from xmodal.models import layers


class WordWindow(nn.Module):
  """x (B, L, D), mask (B, L) -> LN(x + b + sum_{k=0..window} W_k x_{i-k}): each text token mixed with the `window`
  tokens before it by one dense layer (a causal convolution over positions; residual, post-LN, as the fusion layers
  are). Padding is zeroed first, so it never leaks into a real token.

  Why: to tell "a red circle left of a blue square" from its colour-swapped twin, the noun must carry its own
  adjective when it looks for its object. Self-attention can learn to fetch it, but on the shapes data ITM sat at
  chance for ~1,000 steps before it did; a window hands it over from step 0 (docs/shapes_recipe.md, "A word window
  at the fusion encoder's input"). Causal, because English puts adjectives before their noun; a window either side
  (±5, which also hands each noun its relation words) learned more slowly there.
  """
  window: int
  eps: float
  dtype: jnp.dtype = jnp.float32
  kernel_init: str = 'bert'  # layers.KERNEL_INITS ('init' would hide Module.init)

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    x = x * mask[..., None].astype(x.dtype)
    length = x.shape[1]
    padded = jnp.pad(x, ((0, 0), (self.window, 0), (0, 0)))
    before = jnp.stack([padded[:, self.window - k:self.window - k + length] for k in range(self.window + 1)])
    kernel = self.param('kernel', layers.with_names(layers.kernel_init(self.kernel_init, in_axis=(0, 1), out_axis=2),
                                                   None, None, 'embed'),
                        (self.window + 1, x.shape[-1], x.shape[-1]), jnp.float32)
    bias = self.param('bias', layers.with_names(nn.initializers.zeros, 'embed'), (x.shape[-1],), jnp.float32)
    mixed = jnp.einsum('kbld,kde->ble', before, kernel.astype(self.dtype)) + bias.astype(self.dtype)
    return layers.LayerNorm(self.eps, self.dtype, name='ln')(x + mixed)


class Locator(nn.Module):
  """Where each text token's object is: one fusion layer (self-attention, cross-attention that also reads where it
  looked, MLP) and a dense head -> (B, L, 2) float32 positions (x, y) from the image centre in fractions of its side,
  trained by `losses.locate_loss` on the regions' phrases (and grounded captions' words) against their boxes'
  centres.

  Why: on the shapes data the fusion encoder learns a relation ("a red circle left of a blue box" against the same
  words with the phrases swapped) within 300 steps once each phrase's tokens carry its object's place as two
  numbers, and not in 1,200 without them, nor when its layers are only trained to hold the place somewhere in their
  width (docs/shapes_recipe.md, "Relations need places").
  """
  heads: int
  mlp_dim: int
  eps: float
  dtype: jnp.dtype = jnp.float32
  impl: str = 'xla'
  init: str = 'bert'
  explain: bool = False  # its cross-attention sows its weights (layers.Attention.explain)
  kv_projected: bool = False  # image_tokens are the layer's keys and values (`image_keys_values`)

  @nn.compact
  def __call__(self, x, mask, image_tokens, image_mask, image_index=None, text_index=None) -> jax.Array:
    x, _ = layers.FusionBlock(self.heads, self.mlp_dim, self.eps, self.dtype, self.impl, self.init, where=True,
                              explain=self.explain, kv_projected=self.kv_projected, name='layer')(
                                  x, mask, image_tokens, image_mask, image_index, text_index)
    return nn.Dense(2, dtype=jnp.float32, param_dtype=jnp.float32, name='head',
                    kernel_init=layers.with_names(layers.kernel_init(self.init), 'embed', None),
                    bias_init=layers.with_names(nn.initializers.zeros, None))(x.astype(jnp.float32))


class FusionEncoder(nn.Module):
  """(text tokens (B, L, Dt), text mask (B, L), image tokens (B, N, Dv), image mask (B, N) or None[, image index
  (B,)]) -> (B, L, Dt)."""
  depth: int
  heads: int
  mlp_dim: int
  layer_norm_eps: float = 1e-12
  dtype: jnp.dtype = jnp.float32
  attention: str = 'xla'
  scan_layers: bool = True
  remat: str = 'none'
  init: str = 'bert'  # layers.KERNEL_INITS
  word_window: int = 0  # > 0: a WordWindow over this many preceding tokens before the first layer
  # A Locator before the layers: each token enters with its object's predicted place (two numbers, through a dense
  # layer; not trained by what the layers make of it), and every cross-attention also reads where it looked.
  locator: bool = False

  @nn.compact
  def __call__(self, text_tokens: jax.Array, text_mask: jax.Array, image_tokens: jax.Array | None,
               image_mask: jax.Array | None = None, image_index: jax.Array | None = None, *,
               locate_only: bool = False, cls_only: bool = False, explain: bool = False,
               keys_values: jax.Array | None = None, text_index: jax.Array | None = None) -> jax.Array:
    """`image_index` (B,) int: text row i reads image `image_index[i]` of `image_tokens` (M, N, Dv), whose keys and
    values each layer projects once per image rather than once per row (ITM's negatives reuse the batch's images).
    `locate_only`: return the Locator's positions (B, L, 2) instead of the fused tokens (needs `locator`).
    `cls_only`: return the fused [CLS] alone (B, 1, Dt): the last layer computes no other token.
    `explain`: every cross-attention sows its weights (the Locator's first, then the layers'; `models.explain`).
    `keys_values` (C, 2, B or M, H, Dh, N) from `image_keys_values`, or C (keys, values) pairs of (B or M, H, Dh, N),
    in place of `image_tokens` (None): every cross-attention reads its layer's as given instead of projecting the
    image's tokens. `text_index` (B,) int: text tokens and mask hold T texts and row i is text `text_index[i]`; what
    reads the text alone (the word window, the Locator's self-attention) runs once per text (a search re-ranks one
    query against many images: at 8 tokens, 64 pairs of one query matched in 0.75x the time)."""
    if self.word_window > 0:
      text_tokens = WordWindow(self.word_window, self.layer_norm_eps, self.dtype, self.init, name='word_window')(
          text_tokens.astype(self.dtype), text_mask)
    by_pair = lambda texts: texts if text_index is None else jnp.take(texts, text_index, axis=0)
    if not self.locator:
      text_tokens, text_mask = by_pair(text_tokens), by_pair(text_mask)
    projected = keys_values is not None
    image = keys_values if projected else image_tokens.astype(self.dtype)
    if image_mask is None:
      keys = image[0][0] if projected else image  # (B or M, H, Dh, N) or (B or M, N, Dv)
      image_mask = jnp.ones((keys.shape[0], keys.shape[-1]) if projected else keys.shape[:2], bool)
    broadcast = [text_mask.astype(bool), image, image_mask.astype(bool)]
    if image_index is not None:
      broadcast[2] = jnp.take(broadcast[2], image_index, axis=0)  # the mask is per text row
      broadcast.append(image_index)
    text_tokens = text_tokens.astype(self.dtype)
    if self.locator:
      # The Locator reads the words and the image behind a stop-gradient: the locate loss trains the Locator alone,
      # not the towers and word window that ITM's colour binding rests on (colours 74 -> 81 % on validation_hard;
      # shapes_recipe.md, "Grounded captions").
      # With keys and values given, the Locator's layer reads the first of them, the fusion layers the rest.
      locator_image = broadcast[1][0] if projected else broadcast[1]
      broadcast[1] = broadcast[1][1:] if projected else broadcast[1]
      reads = (jax.lax.stop_gradient(text_tokens), broadcast[0], jax.lax.stop_gradient(locator_image), broadcast[2],
               image_index, text_index)
      positions = Locator(self.heads, self.mlp_dim, self.layer_norm_eps, self.dtype, self.attention, self.init,
                          explain, kv_projected=projected, name='locator')(*reads)
      if locate_only:
        return positions
      text_tokens, text_mask = by_pair(text_tokens), by_pair(text_mask)
      broadcast[0] = text_mask.astype(bool)
      # The place enters as an input trained by the locate loss alone: with ITM's gradient in it too, the relation
      # probe learned relations later (92 against 97 % at step 1,000; shapes_recipe.md, "Relations need places").
      place = nn.Dense(text_tokens.shape[-1], use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                       name='place', kernel_init=layers.with_names(layers.kernel_init(self.init), None, 'embed'))
      text_tokens = text_tokens + place(jax.lax.stop_gradient(positions)) * text_mask[..., None].astype(self.dtype)
    elif locate_only:
      raise ValueError('locate_only needs a fusion encoder with a locator (model.fusion_locator)')
    apply = layers.stack(layers.FusionBlock, self.depth, scan=self.scan_layers, remat=self.remat,
                         num_broadcast=len(broadcast), heads=self.heads, mlp_dim=self.mlp_dim,
                         eps=self.layer_norm_eps, dtype=self.dtype, impl=self.attention, init=self.init,
                         where=self.locator, explain=explain, kv_projected=projected,
                         per_layer_args=(1,) if projected else (),
                         # Init creates the stacked parameters the [CLS]-only view splits.
                         last_queries=1 if cls_only and not self.is_initializing() else 0)
    return apply(text_tokens, *broadcast)


def image_keys_values(params, image_tokens: jax.Array, dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """A fusion encoder's parameters and image tokens (M, N, Dv) -> (C, 2, M, H, Dh, N): the keys and values every
  cross-attention projects from the image (the Locator's layer first, if any, then the `depth` layers), which
  `FusionEncoder(..., keys_values=)` reads instead of the tokens. They depend on the image alone: a search index can
  keep them, so that re-ranking a candidate projects only its text.

  Layer-major, each head's tokens minor: XLA:CPU's attention dots read each head's keys and values transposed, and
  a layer's (M, H, Dh, N) slice is then read as it lies. From (M, N, 2, H, Dh), the copies into that layout took 40 %
  of a match at 8 text tokens on a 2-core CPU; as separate arrays per layer (`FusionEncoder`'s pairs) none remain.

  Each layer's own `Projection` computes them, from its 'cross_attn/kv' parameters (`cross_attention_blocks`).
  """
  blocks = cross_attention_blocks(params)
  stacked = jax.tree.map(lambda *p: jnp.stack(p), *[block['cross_attn']['kv'] for block in blocks])
  # parent=None: a module of its own, applied to the given parameters, not a new child of a calling module.
  projection = layers.Projection(stacked['kernel'].shape[2:], (None,) * (stacked['kernel'].ndim - 2), dtype=dtype,
                                 parent=None)
  keys_values = jax.vmap(lambda p: projection.apply({'params': p}, image_tokens))(stacked)  # (C, M, N, 2, H, Dh)
  return jnp.transpose(keys_values, (0, 3, 1, 4, 5, 2))


def cross_attention_blocks(tree) -> list:
  """A FusionEncoder's variables of one collection (params, intermediates, perturbations) -> one subtree per block
  that has a cross-attention, in the order the text passes them: the Locator's layer ('locator/layer'), then the
  fusion layers ('layers', stacked on a leading axis when scanned, which is split here; else 'layers_0', ...)."""
  blocks = [tree['locator']['layer']] if 'locator' in tree else []
  if 'layers' in tree:
    depth = jax.tree.leaves(tree['layers'])[0].shape[0]
    return blocks + [jax.tree.map(lambda x, i=i: x[i], tree['layers']) for i in range(depth)]
  return blocks + [tree[f'layers_{i}'] for i in range(len(tree)) if f'layers_{i}' in tree]
