"""Transformer building blocks shared by the towers, with logical axis names on every parameter.

Logical axes: 'embed' (model width), 'heads', 'kv' (per-head width), 'mlp', 'vocab', 'layers' (the scanned depth).
Activations carry ('batch', 'length', 'embed'). The config's rules map them onto the mesh.
"""

from __future__ import annotations

import functools

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from xmodal.models import activations
from xmodal.models import gather
from xmodal.models import regions
from xmodal.models.attention import (attend, attended_positions, attention_weights, dot_product_attention,
                                     weighted_positions)

Dtype = Any

# BERT and ViT both initialise weights with a truncated normal of std 0.02.
default_kernel_init = nn.initializers.truncated_normal(0.02)
# The values of `model.fusion_init`: 'bert' (std 0.02, what a pretrained checkpoint replaces) or 'lecun' (std
# 1/sqrt(fan_in), a truncated normal). From scratch at width 128, 0.02 is 4.4x below LeCun in every matrix, and the
# cross-modal signal of ITM passes through five or six of them (docs/shapes_recipe.md, runs T1 and T2).
KERNEL_INITS = ('bert', 'lecun')


def kernel_init(kind: str, in_axis: int | tuple[int, ...] = -2, out_axis: int | tuple[int, ...] = -1) -> Callable:
  """The kernel initialiser `kind` (KERNEL_INITS); `in_axis` are the kernel's fan-in axes (for 'lecun')."""
  if kind == 'bert':
    return default_kernel_init
  if kind == 'lecun':
    return nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal', in_axis=in_axis, out_axis=out_axis)
  raise ValueError(f'unknown kernel init {kind!r}; valid: {KERNEL_INITS}')


def with_names(init: Callable, *names: str | None) -> Callable:
  return nn.with_logical_partitioning(init, names)


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
  return nn.with_logical_constraint(x, names)


class LayerNorm(nn.Module):
  """LayerNorm computed in float32 whatever the compute dtype, returned in the compute dtype."""
  eps: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, param_dtype=jnp.float32,
                        scale_init=with_names(nn.initializers.ones, 'embed'),
                        bias_init=with_names(nn.initializers.zeros, 'embed'), name='norm')(x)


class Projection(nn.Module):
  """x (..., Din) -> (..., *features): a dense layer with a multi-dimensional output (e.g. (3, heads, head_dim)).

  Parameters keep DenseGeneral's layout (kernel (Din, *features), bias (*features)) so checkpoints map one to one;
  the kernel is created at its full shape, so its logical names always match its rank.
  """
  features: tuple[int, ...]
  names: tuple[str | None, ...]  # logical names of the output axes
  in_name: str | None = 'embed'
  dtype: Dtype = jnp.float32
  init: str = 'bert'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = kernel_init(self.init, in_axis=0, out_axis=tuple(range(1, 1 + len(self.features))))
    kernel = self.param('kernel', with_names(init, self.in_name, *self.names),
                        (x.shape[-1], *self.features), jnp.float32)
    bias = self.param('bias', with_names(nn.initializers.zeros, *self.names), self.features, jnp.float32)
    y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=((x.ndim - 1,), (0,)))
    return y + bias.astype(self.dtype)


# The name under which an explaining cross-attention sows (and perturbs) its weights.
EXPLAIN_NAME = 'cross_attention_weights'


class Attention(nn.Module):
  """Multi-head attention; self-attention when `kv` is None, cross-attention otherwise.

  Cross-attention projects keys and values from the other modality's width (`kv.shape[-1]`) to this one's, which is
  how text tokens of width Dt read image tokens of width Dv. With `where` (cross-attention over image tokens), each
  head also reads where it looked, the attention-weighted mean of the tokens' (x, y) (`regions.token_positions`),
  projected into the output: a place as two numbers, not spread over the values' features.

  With `explain` (cross-attention only), the attention weights (B, H, Lq, Lk) are computed explicitly, passed
  through `perturb` (so a gradient with respect to them can be taken: Grad-CAM) and sown into 'intermediates' as
  `EXPLAIN_NAME`; the output is the same as without.
  """
  heads: int
  dtype: Dtype = jnp.float32
  impl: str = 'xla'
  init: str = 'bert'
  where: bool = False
  explain: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None, kv: jax.Array | None = None,
               kv_index: jax.Array | None = None, queries: int = 0, kv_projected: bool = False) -> jax.Array:
    """x (B, Lq, D), mask (B, Lk) bool, kv (B, Lk, Dkv) or None -> (B, Lq, D).

    With `kv_index` (B,) int, `kv` holds (M, Lk, Dkv) distinct inputs and query row i reads `kv[kv_index[i]]`: keys
    and values are projected once per distinct input and gathered, not once per query row. With `queries` > 0
    (self-attention), only the first `queries` tokens ask: -> (B, queries, D), every token still a key and value.
    With `kv_projected`, `kv` holds this layer's keys and values already projected, (2, B or M, H, Dh, Lk) as
    `fusion.image_keys_values` computes them (or a (keys, values) pair): a search index keeps them per image, so only
    the queries are projected.
    """
    width = x.shape[-1]
    head_dim = width // self.heads
    if kv is None:
      # One fused matmul for Q, K and V: three small matmuls waste the machine.
      qkv = Projection((3, self.heads, head_dim), (None, 'heads', 'kv'), dtype=self.dtype, init=self.init,
                       name='qkv')(x)
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
      if queries:
        q = q[:, :queries]
    else:
      q = Projection((self.heads, head_dim), ('heads', 'kv'), dtype=self.dtype, init=self.init, name='query')(x)
      if kv_projected:
        # Each (B or M, H, Dh, Lk), the layout XLA:CPU's attention dots read them in (`fusion.image_keys_values`).
        k, v = (jnp.moveaxis(kv[i], -1, 1).astype(self.dtype) for i in range(2))
        if kv_index is not None:
          k, v = gather.take_rows(k, kv_index), gather.take_rows(v, kv_index)
      else:
        kv_proj = Projection((2, self.heads, head_dim), (None, 'heads', 'kv'), dtype=self.dtype, init=self.init,
                             name='kv')(kv)
        if kv_index is not None:
          kv_proj = gather.take_rows(kv_proj, kv_index)
        k, v = kv_proj[:, :, 0], kv_proj[:, :, 1]
    weights = None
    if self.explain and kv is not None:
      weights = self.perturb(EXPLAIN_NAME, attention_weights(q, k, mask))
      self.sow('intermediates', EXPLAIN_NAME, weights)
      attended = attend(weights, v)
    else:
      attended = dot_product_attention(q, k, v, mask, impl=self.impl)
    out = HeadsOut(width, dtype=self.dtype, init=self.init, name='out')(attended)
    if self.where and kv is not None:
      positions = regions.token_positions(k.shape[1])
      where = (attended_positions(q, k, positions, mask) if weights is None
               else weighted_positions(weights, positions))
      out = out + HeadsOut(width, dtype=self.dtype, init=self.init, name='where')(where.astype(self.dtype))
    return out


class HeadsOut(nn.Module):
  """(B, L, H, Dh) -> (B, L, D): the attention output projection, contracting heads and head width at once."""
  width: int
  dtype: Dtype = jnp.float32
  init: str = 'bert'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = kernel_init(self.init, in_axis=(0, 1), out_axis=2)
    kernel = self.param('kernel', with_names(init, 'heads', 'kv', 'embed'), (*x.shape[-2:], self.width), jnp.float32)
    bias = self.param('bias', with_names(nn.initializers.zeros, 'embed'), (self.width,), jnp.float32)
    return jnp.einsum('blhd,hdo->blo', x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)


class Mlp(nn.Module):
  mlp_dim: int
  dtype: Dtype = jnp.float32
  init: str = 'bert'

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    h = nn.Dense(self.mlp_dim, dtype=self.dtype, param_dtype=jnp.float32, name='fc1',
                 kernel_init=with_names(kernel_init(self.init), 'embed', 'mlp'),
                 bias_init=with_names(nn.initializers.zeros, 'mlp'))(x)
    # BERT and ViT use the exact GELU; this one's backward pass keeps only its input (xmodal/models/activations.py).
    h = constrain(activations.gelu(h), 'batch', 'length', 'mlp')
    return nn.Dense(width, dtype=self.dtype, param_dtype=jnp.float32, name='fc2',
                    kernel_init=with_names(kernel_init(self.init), 'mlp', 'embed'),
                    bias_init=with_names(nn.initializers.zeros, 'embed'))(h)


class PreLNBlock(nn.Module):
  """ViT layer: x + attn(LN(x)), then x + mlp(LN(x)); with `layer_scale_init` > 0 each branch is scaled by a
  learned per-channel vector starting there (CaiT's LayerScale: blocks start near the identity)."""
  heads: int
  mlp_dim: int
  eps: float
  dtype: Dtype = jnp.float32
  impl: str = 'xla'
  layer_scale_init: float = 0.0

  @nn.compact
  def __call__(self, x, mask):
    attn = Attention(self.heads, self.dtype, self.impl, name='attn')
    x = x + self._scale(attn(LayerNorm(self.eps, self.dtype, name='ln1')(x), mask), 'ls1')
    mlp = Mlp(self.mlp_dim, self.dtype, name='mlp')
    x = x + self._scale(mlp(LayerNorm(self.eps, self.dtype, name='ln2')(x)), 'ls2')
    return constrain(x, 'batch', 'length', 'embed'), None

  def _scale(self, branch: jax.Array, name: str) -> jax.Array:
    if self.layer_scale_init <= 0:
      return branch
    gamma = self.param(name, with_names(nn.initializers.constant(self.layer_scale_init), 'embed'), (branch.shape[-1],),
                       jnp.float32)
    return branch * gamma.astype(branch.dtype)


class PostLNBlock(nn.Module):
  """BERT layer: LN(x + attn(x)), then LN(x + mlp(x))."""
  heads: int
  mlp_dim: int
  eps: float
  dtype: Dtype = jnp.float32
  impl: str = 'xla'

  @nn.compact
  def __call__(self, x, mask):
    x = LayerNorm(self.eps, self.dtype, name='ln1')(x + Attention(self.heads, self.dtype, self.impl, name='attn')(x, mask))
    x = LayerNorm(self.eps, self.dtype, name='ln2')(x + Mlp(self.mlp_dim, self.dtype, name='mlp')(x))
    return constrain(x, 'batch', 'length', 'embed'), None


class FusionBlock(nn.Module):
  """ALBEF fusion layer, post-LN: self-attention over text, cross-attention to image tokens (with `where`, also
  where it looked: `Attention`), MLP."""
  heads: int
  mlp_dim: int
  eps: float
  dtype: Dtype = jnp.float32
  impl: str = 'xla'
  init: str = 'bert'  # KERNEL_INITS
  where: bool = False
  # > 0: only the first `queries` tokens come out (-> (B, queries, D)), every token still read by self-attention.
  # The last layer of a match needs only [CLS]: its other tokens' queries, cross-attention and MLP are not computed.
  queries: int = 0
  kv_projected: bool = False  # image_tokens are this layer's keys and values (`Attention`'s kv_projected)
  explain: bool = False  # the cross-attention sows its weights (Attention.explain)

  @nn.compact
  def __call__(self, x, mask, image_tokens, image_mask, image_index=None, text_index=None):
    """`image_index` None: row i reads image_tokens[i]; else image_tokens[image_index[i]] (image_mask is per row).
    `text_index` (B,) int: x and mask hold T texts and row i is text `text_index[i]`: the self-attention, which reads
    the text alone, runs once per text, the rest of the layer per row."""
    attn = Attention(self.heads, self.dtype, self.impl, self.init, name='attn')
    kept = x[:, :self.queries] if self.queries else x
    x = LayerNorm(self.eps, self.dtype, name='ln1')(kept + attn(x, mask, queries=self.queries))
    if text_index is not None:
      x = jnp.take(x, text_index, axis=0)
    cross = Attention(self.heads, self.dtype, self.impl, self.init, self.where, self.explain, name='cross_attn')(
        x, image_mask, kv=image_tokens, kv_index=image_index, kv_projected=self.kv_projected)
    x = LayerNorm(self.eps, self.dtype, name='ln_cross')(x + cross)
    x = LayerNorm(self.eps, self.dtype, name='ln2')(x + Mlp(self.mlp_dim, self.dtype, self.init, name='mlp')(x))
    return constrain(x, 'batch', 'length', 'embed'), None


_REMAT_CHECKPOINT_POLICIES = {
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
REMAT_POLICIES = ('none', *_REMAT_CHECKPOINT_POLICIES)  # the values of `model.remat`


def stack(block_cls: type[nn.Module], depth: int, *, scan: bool, remat: str, num_broadcast: int = 1,
          name: str = 'layers', last_queries: int = 0, per_layer_args: tuple[int, ...] = (),
          **block_kwargs) -> Callable:
  """Returns `f(x, *broadcast_args) -> x` applying `depth` copies of `block_cls`.

  With `scan`, one block is traced and its parameters are stacked on a leading 'layers' axis (compile time flat in
  depth); without, the blocks are `name_0 ... name_{depth-1}`. `remat` picks what the backward pass may keep.
  `last_queries` > 0: the last block is built with `queries=last_queries` (FusionBlock: only the first tokens come
  out), from the same parameters. `per_layer_args`: positions among the arguments that hold one item per layer
  (`arg[i]` for layer i: a sequence, or an array with a leading depth axis); the layers then run one by one, scanned
  parameters sliced per layer (apply only: nothing is initialised that way).
  """
  if remat != 'none':
    block_cls = nn.remat(block_cls, policy=_REMAT_CHECKPOINT_POLICIES[remat], prevent_cse=not scan)
  last = {'queries': last_queries} if last_queries else {}
  layer_args = lambda args, i: tuple(a[i] if n in per_layer_args else a for n, a in enumerate(args))
  if scan and per_layer_args:
    # Layer by layer, so that each reads its own arguments as they are given: a scan would stack them into one
    # array and slice each layer's back out, copies of what most of a match on kept keys and values reads.
    split = lambda variables: {collection: {f'layer_{i}': jax.tree.map(lambda p, i=i: p[i], tree)
                                            for i in range(depth)} for collection, tree in variables.items()}
    return nn.map_variables(_LayerByLayer, 'params', trans_in_fn=split, mutable=False)(
        tuple(functools.partial(block_cls, **block_kwargs, **(last if i == depth - 1 else {})) for i in range(depth)),
        layer_args, name=name)
  # Sown intermediates and perturbations (explanations) are per layer, as parameters are.
  per_layer = {'params': 0, 'intermediates': 0, 'perturbations': 0}
  scanned = functools.partial(nn.scan, block_cls, variable_axes=per_layer, split_rngs={'params': True},
                              in_axes=(nn.broadcast,) * num_broadcast, metadata_params={nn.PARTITION_NAME: 'layers'})
  if scan and last_queries:
    # The stacked parameters seen as the first depth - 1 layers, scanned, and the last one on its own.
    split = lambda variables: {
        collection: {'first': jax.tree.map(lambda p: p[:-1], tree), 'last': jax.tree.map(lambda p: p[-1], tree)}
        for collection, tree in variables.items()}
    return nn.map_variables(_FirstAndLast, 'params', trans_in_fn=split, mutable=False)(
        functools.partial(scanned(length=depth - 1), **block_kwargs) if depth > 1 else None,
        functools.partial(block_cls, queries=last_queries, **block_kwargs), name=name)
  if scan:
    blocks = scanned(length=depth)(name=name, **block_kwargs)
    return lambda x, *args: blocks(x, *args)[0]
  blocks = [block_cls(name=f'{name}_{i}', **block_kwargs, **(last if i == depth - 1 else {})) for i in range(depth)]

  def apply(x, *args):
    for i, block in enumerate(blocks):
      x, _ = block(x, *layer_args(args, i))
    return x
  return apply


class _FirstAndLast(nn.Module):
  """`first` (depth - 1 scanned layers), then `last` (one layer), each a block constructor taking only its name:
  `stack`'s view of stacked parameters split as {'first': layers[:-1], 'last': layers[-1]}."""
  first: Callable | None  # None for a stack of one
  last: Callable

  @nn.compact
  def __call__(self, x, *args):
    if self.first is not None:
      x, _ = self.first(name='first')(x, *args)
    return self.last(name='last')(x, *args)[0]


class _LayerByLayer(nn.Module):
  """`stack`'s view of stacked parameters split per layer, as {'layer_0': layers[0], ...}: each layer a block of its
  own (a constructor taking only its name), reading its own arguments (`select(args, i)`)."""
  blocks: tuple[Callable, ...]
  select: Callable

  @nn.compact
  def __call__(self, x, *args):
    for i, block in enumerate(self.blocks):
      x, _ = block(name=f'layer_{i}')(x, *self.select(args, i))
    return x
