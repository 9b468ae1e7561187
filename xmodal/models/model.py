"""XModal: two towers for contrastive search (ITC) and a fusion encoder for image-text matching (ITM).

  images ─ViT─► image tokens ─[CLS]→proj→L2─► image_emb
  ids    ─BERT─► text tokens ─[CLS]→proj→L2─► text_emb
  (text tokens, text mask, image tokens) ─fusion─► fused [CLS] ─ITM head─► match logits (B, 2)
                                                  └► fused tokens ─MLM head (tied to the word embeddings)─► (B, L, V)

All methods are pure and reachable through `model.apply(variables, ..., method=XModal.encode_image)`.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from xmodal.models import activations, layers, regions
from xmodal.models import fusion as fusion_lib
from xmodal.models.fusion import FusionEncoder
from xmodal.models.text import TextEncoder
from xmodal.models.vit import VisionEncoder

POOLS = ('cls', 'mean', 'mean_fc_norm', 'max')  # the values of `model.pool`
TEMPERATURE_RANGE = (0.001, 0.5)  # ALBEF clamps its learnable temperature to this range.


@dataclasses.dataclass(frozen=True)
class VisionSpec:
  width: int
  depth: int
  heads: int
  mlp_dim: int
  patch_size: int
  layer_norm_eps: float
  posemb_init: str = 'normal'
  stem: str = 'patch'
  layer_scale_init: float = 0.0


@dataclasses.dataclass(frozen=True)
class TextSpec:
  width: int
  depth: int
  heads: int
  mlp_dim: int
  vocab_size: int
  max_positions: int
  type_vocab_size: int
  layer_norm_eps: float


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """The hashable, typed form of the `model` config section."""
  vision: VisionSpec
  text: TextSpec
  image_size: int
  fusion_depth: int
  embed_dim: int
  max_text_len: int
  temperature_init: float = 0.07
  pool: str = 'cls'
  dtype: str = 'float32'
  attention: str = 'xla'
  remat: str = 'none'
  scan_layers: bool = True
  mlm_head: bool = False
  fusion_init: str = 'bert'
  fusion_word_window: int = 0
  fusion_locator: bool = False

  @classmethod
  def from_config(cls, model: ml_collections.ConfigDict) -> ModelSpec:
    fields = {f.name for f in dataclasses.fields(cls)} - {'vision', 'text'}
    return cls(vision=VisionSpec(**model.vision.to_dict()), text=TextSpec(**model.text.to_dict()),
               **{k: model[k] for k in fields})


class XModal(nn.Module):
  spec: ModelSpec

  def setup(self):
    s = self.spec
    dtype = jnp.dtype(s.dtype)
    common = dict(dtype=dtype, attention=s.attention, scan_layers=s.scan_layers, remat=s.remat)
    self.vision = VisionEncoder(s.vision.width, s.vision.depth, s.vision.heads, s.vision.mlp_dim, s.vision.patch_size,
                                s.image_size, s.vision.layer_norm_eps, posemb_init=s.vision.posemb_init,
                                stem=s.vision.stem, layer_scale_init=s.vision.layer_scale_init,
                                fc_norm=s.pool == 'mean_fc_norm', **common)
    self.text = TextEncoder(s.text.vocab_size, s.text.width, s.text.depth, s.text.heads, s.text.mlp_dim,
                            s.text.max_positions, s.text.type_vocab_size, s.text.layer_norm_eps, **common)
    self.fusion = FusionEncoder(s.fusion_depth, s.text.heads, s.text.mlp_dim, s.text.layer_norm_eps,
                                 init=s.fusion_init, word_window=s.fusion_word_window, locator=s.fusion_locator,
                                 **common)
    dense = lambda features, name: nn.Dense(
        features, dtype=jnp.float32, param_dtype=jnp.float32, name=name,
        kernel_init=layers.with_names(layers.default_kernel_init, 'embed', None),
        bias_init=layers.with_names(nn.initializers.zeros, None))
    self.image_proj = dense(s.embed_dim, 'image_proj')
    self.text_proj = dense(s.embed_dim, 'text_proj')
    self.itm_head = dense(2, 'itm_head')
    if s.mlm_head:
      # BERT's prediction head: dense, GELU, LayerNorm, then the word embeddings transposed plus a bias.
      self.mlm_transform = nn.Dense(
          s.text.width, dtype=jnp.float32, param_dtype=jnp.float32, name='mlm_transform',
          kernel_init=layers.with_names(layers.default_kernel_init, 'embed', None),
          bias_init=layers.with_names(nn.initializers.zeros, None))
      self.mlm_norm = layers.LayerNorm(s.text.layer_norm_eps, jnp.float32, name='mlm_norm')
      self.mlm_bias = self.param('mlm_bias', layers.with_names(nn.initializers.zeros, 'vocab'), (s.text.vocab_size,))
    self.raw_temperature = self.param('temperature', layers.with_names(nn.initializers.constant(s.temperature_init)),
                                      ())
    # SigLIP's learnable log-scale and bias (init log 10 and -10), used only by the sigmoid loss.
    self.sigmoid_log_scale = self.param('sigmoid_log_scale',
                                        layers.with_names(nn.initializers.constant(jnp.log(10.0))), ())
    self.sigmoid_bias = self.param('sigmoid_bias', layers.with_names(nn.initializers.constant(-10.0)), ())

  def encode_image(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """images (B, H, W, 3) normalised floats -> (tokens (B, 1+N, Dv), emb (B, E) float32, unit norm).

    The embedding projects the [CLS] token (ALBEF), with spec.pool='mean' the mean of all tokens, with 'mean_fc_norm'
    the LayerNorm of the patch tokens' mean taken before the tower's final LayerNorm (VisionEncoder.fc_norm), with
    'max' the channel-wise max of the patch tokens.
    """
    tokens, pooled = self.vision(images)
    if pooled is None:
      pooled = self._pool(tokens, None)
    return tokens, _normalize(self.image_proj(pooled))

  def encode_text(self, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """ids (B, L) int, mask (B, L) -> (tokens (B, L, Dt), emb (B, E) float32, unit norm)."""
    tokens = self.text(ids, mask)
    return tokens, _normalize(self.text_proj(self._pool(tokens, mask)))

  def _pool(self, tokens: jax.Array, mask: jax.Array | None) -> jax.Array:
    """(B, L, D) tokens -> (B, D) float32: the [CLS] token; for images (`mask` None) with spec.pool 'max' the
    channel-wise max of the patch tokens; else the mean of the real tokens (spec.pool: 'mean', and for text
    'mean_fc_norm' and 'max': BERT is post-LN, its tokens come out of a LayerNorm at every layer)."""
    tokens = tokens.astype(jnp.float32)
    if self.spec.pool == 'cls':
      return tokens[:, 0]
    if self.spec.pool == 'max' and mask is None:
      return jnp.max(tokens[:, 1:], axis=1)
    weights = jnp.ones(tokens.shape[:2], jnp.float32) if mask is None else mask.astype(jnp.float32)
    return jnp.einsum('bl,bld->bd', weights, tokens) / jnp.maximum(jnp.sum(weights, axis=1, keepdims=True), 1.0)

  def embed_regions(self, image_tokens: jax.Array, boxes: jax.Array) -> jax.Array:
    """Image tokens (B, 1+N, Dv) from `encode_image` and boxes (B, R, 4) (ymin, xmin, ymax, xmax in [0, 1]) ->
    (B, R, E) float32 unit-norm region embeddings: the max over the patch tokens under each box, through the image
    projection (the space ITC scores in)."""
    patches = image_tokens[:, 1:]
    grid = math.isqrt(patches.shape[1])
    pooled = regions.pool_regions(patches, regions.region_cells(boxes, grid))
    return _normalize(self.image_proj(pooled))

  def match(self, text_tokens: jax.Array, text_mask: jax.Array, image_tokens: jax.Array | None,
            image_mask: jax.Array | None = None, image_index: jax.Array | None = None, *,
            keys_values: jax.Array | None = None, text_index: jax.Array | None = None) -> jax.Array:
    """(text tokens (B, L, Dt), text mask (B, L), image tokens (B, N, Dv)[, image mask (B, N)]) -> logits (B, 2).

    Logit 1 is "matches", logit 0 "does not match" (ALBEF's order). With `image_index` (B,) int, image tokens (and
    mask) hold M images and text i is paired with image `image_index[i]` (`FusionEncoder`). With `keys_values`
    (C, 2, B or M, H, Dh, N) from `image_keys_values` (or its C (keys, values) pairs, separate arrays) in place of
    the image tokens (None), the same logits without projecting the images again. With `text_index` (B,) int, text
    tokens and mask hold T texts and pair i reads text `text_index[i]` (`FusionEncoder`).
    """
    fused = self.fusion(text_tokens, text_mask, image_tokens, image_mask, image_index, cls_only=True,
                        keys_values=keys_values, text_index=text_index)
    return self.itm_head(fused[:, 0].astype(jnp.float32))

  def match_explained(self, text_tokens: jax.Array, text_mask: jax.Array, image_tokens: jax.Array) -> jax.Array:
    """`match` (logits (B, 2)) with every token computed in every layer and each cross-attention's weights sown into
    'intermediates' and open to 'perturbations': what `models.explain` reads and differentiates."""
    fused = self.fusion(text_tokens, text_mask, image_tokens, explain=True)
    return self.itm_head(fused[:, 0].astype(jnp.float32))

  def image_keys_values(self, image_tokens: jax.Array) -> jax.Array:
    """Image tokens (B, N, Dv) -> (C, 2, B, H, Dh, N) in the compute dtype: the keys and values each of the fusion
    encoder's C cross-attentions (the Locator's, then fusion_depth) projects from the image, what a search index
    keeps for `match(..., keys_values=)`; C x 2 x N x Dt numbers an image (layout: `fusion.image_keys_values`)."""
    return fusion_lib.image_keys_values(nn.unbox(self.fusion.variables['params']), image_tokens,
                                        jnp.dtype(self.spec.dtype))

  def locate(self, text_tokens: jax.Array, text_mask: jax.Array, image_tokens: jax.Array,
             image_index: jax.Array | None = None) -> jax.Array:
    """(text tokens (B, L, Dt), text mask (B, L), image tokens (B or M, N, Dv)[, image index (B,)]) -> (B, L, 2)
    float32: where the fusion encoder's Locator puts each token's object ((x, y) from the image centre, in fractions
    of its side; needs spec.fusion_locator)."""
    return self.fusion(text_tokens, text_mask, image_tokens, None, image_index, locate_only=True)

  def predict_masked(self, text_tokens: jax.Array, text_mask: jax.Array, image_tokens: jax.Array) -> jax.Array:
    """(text tokens (B, L, Dt) of a corrupted caption, its mask (B, L), image tokens (B, N, Dv)) -> float32 logits
    (B, L, V) of each position's original token (MLM; needs spec.mlm_head)."""
    return self.mlm_logits(self.fusion(text_tokens, text_mask, image_tokens))

  def mlm_logits(self, hidden: jax.Array) -> jax.Array:
    """BERT's prediction head: hidden states (B, L, Dt) -> float32 logits (B, L, V) (needs spec.mlm_head)."""
    hidden = self.mlm_norm(activations.gelu(self.mlm_transform(hidden.astype(jnp.float32))))
    # Tied to the input word embeddings, as BERT's decoder is.
    table = nn.unbox(self.text.variables['params']['embeddings']['word']['embedding'])
    return jnp.einsum('bld,vd->blv', hidden, table.astype(jnp.float32)) + self.mlm_bias

  def temperature(self) -> jax.Array:
    """The contrastive temperature, kept in [0.001, 0.5]."""
    return jnp.clip(self.raw_temperature, *TEMPERATURE_RANGE)

  def sigmoid_params(self) -> tuple[jax.Array, jax.Array]:
    """(scale, bias) of the sigmoid loss."""
    return jnp.exp(self.sigmoid_log_scale), self.sigmoid_bias

  def __call__(self, images, ids, mask):
    """Runs every path once (what `init` needs): returns (image_emb, text_emb, match logits)."""
    image_tokens, image_emb = self.encode_image(images)
    text_tokens, text_emb = self.encode_text(ids, mask)
    self.temperature()
    self.sigmoid_params()
    if self.spec.mlm_head:
      self.predict_masked(text_tokens, mask, image_tokens)
    return image_emb, text_emb, self.match(text_tokens, mask, image_tokens)


def _normalize(x: jax.Array) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


def build(model_config: ml_collections.ConfigDict) -> XModal:
  """The model for a config's `model` section."""
  return XModal(ModelSpec.from_config(model_config))


def dummy_inputs(spec: ModelSpec, batch: int = 2) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Zero inputs of the model's shapes, for `init` and `eval_shape`."""
  images = jnp.zeros((batch, spec.image_size, spec.image_size, 3), jnp.float32)
  ids = jnp.zeros((batch, spec.max_text_len), jnp.int32)
  return images, ids, jnp.ones((batch, spec.max_text_len), jnp.int32)
