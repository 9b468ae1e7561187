"""Model FLOPs, counted analytically, and the peak FLOP/s of each device kind (for MFU).

Counts matmul FLOPs (2 per multiply-add) including attention scores and the weighted sum; elementwise work (norms,
softmax, GELU) is left out, as MFU conventions do. Training = 3 x forward (backward = 2 x forward); rematerialised
recomputation is not model FLOPs and is not counted.
"""

from __future__ import annotations

from collections.abc import Sequence

from xmodal.models import buckets
from xmodal.models.model import ModelSpec
from xmodal.models.vit import conv_stem_channels

# Dense peak FLOP/s per chip by `jax.Device.device_kind` prefix, for bfloat16 matmuls (no sparsity).
PEAK_FLOPS = {
    'NVIDIA H100': 989e12,
    'NVIDIA H200': 989e12,
    'NVIDIA B200': 2250e12,
    'NVIDIA A100': 312e12,
    'NVIDIA L4': 121e12,
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,
    'TPU v5e': 197e12,
    'TPU v5p': 459e12,
    'TPU v6 lite': 918e12,
}


def peak_flops_per_device(device_kind: str, override: float = 0.0) -> float | None:
  """Peak FLOP/s of one device: the override if set, else the table; None when unknown (e.g. CPU)."""
  if override > 0:
    return override
  for prefix, flops in PEAK_FLOPS.items():
    if device_kind.startswith(prefix):
      return flops
  return None


def _layer(tokens: int, width: int, mlp: int, queries: int | None = None) -> int:
  """One self-attention transformer layer over `tokens`: QKV, scores, weighted sum, output, MLP; with `queries`, only
  the first that many tokens come out (QKV of every token, the rest for the queries alone)."""
  queries = tokens if queries is None else queries
  projections = 2 * tokens * width * (3 * width) + 2 * queries * width * width
  attention = 2 * (2 * queries * tokens * width)
  return projections + attention + 2 * (2 * queries * width * mlp)


def _stem_flops(spec: ModelSpec) -> int:
  """Forward FLOPs of one image's patchify, or of its conv stem (3x3 stride-2 convolutions, then a 1x1)."""
  v = spec.vision
  patches = (spec.image_size // v.patch_size) ** 2
  if v.stem != 'conv':
    return 2 * patches * (v.patch_size ** 2 * 3) * v.width
  total, side, channels_in = 0, spec.image_size, 3
  for channels in conv_stem_channels(v.patch_size, v.width):
    side = -(-side // 2)
    total += 2 * side * side * 9 * channels_in * channels
    channels_in = channels
  return total + 2 * patches * channels_in * v.width


def fusion_image_passes(itm_pairs: float) -> float:
  """Per example, how many times ITM's fusion pass projects image tokens to cross-attention keys and values, for
  `itm_pairs` pairs per example: once per pair while there are no more pairs than images (each pair's own copy);
  beyond that once per image of the batch, gathered for the pairs that reuse it (the negatives)."""
  return min(itm_pairs, 1.0)


def forward_flops(spec: ModelSpec, batch: int, itm_pairs: float = 3, extra_texts: float = 0, mlm: bool = False,
                  momentum: bool = False, queue_size: int = 0, distill: bool = False, grad_cache: bool = False,
                  regions: int = 0, phrase_len: int = 0, region_contrast: bool = True, locate: bool = False,
                  grounded_captions: bool = False, length_buckets: Sequence[buckets.Bucket] = (),
                  drawn_pairs: float = 0) -> dict[str, int]:
  """Forward FLOPs of one training step's model work on a batch of B (image, caption) pairs, by part.

  The fusion encoder runs on `itm_pairs` x B pairs (ALBEF: 3 — B positives, 2B hard negatives; 0 without ITM; see
  `LossWeights.itm_pairs`); its cross-attention projects image tokens to keys and values `fusion_image_passes`
  times per example.
  `extra_texts` x B more captions go through the text tower (the data's written negatives). With `mlm`, each
  corrupted caption goes through the text tower and the fusion encoder once more, and the MLM head scores every
  position against the vocabulary.

  With `momentum` (ALBEF's momentum model, loss.momentum > 0), ITC scores every image and every text against the B +
  `queue_size` momentum keys of the other modality, and part 'momentum' is the momentum model's own forward pass
  (no backward): both towers and projections on the batch, and with `distill` its similarities over the batch and
  the queue and, with `mlm`, its MLM pass.

  With `grad_cache` (train.grad_accum_mode='exact' with grad_accum > 1), part 'grad_cache' is the towers' and
  projections' first forward pass, which embeds the batch without gradients before the one that trains.

  With `length_buckets` (loss.length_buckets), the captions, the `extra_texts` and the fusion encoder's pairs count
  each bucket's share of them at its length, but for the `drawn_pairs` per example (ITM's negative texts, which the
  step draws itself): those run at full length, in a fusion pass of their own.

  With `regions` per example (the region-phrase loss), part 'regions' is their phrases of `phrase_len` tokens
  through the text tower, both projections, and each region's row of the (B R, B R) similarity (without
  `region_contrast`, the text tower alone). With `locate` (loss.locate_weight), part 'locate' is the phrases through
  the fusion encoder's word window and Locator, against their image's keys and values, projected once per image;
  with `grounded_captions` (data.caption_grounding) also each caption, against its image's keys and values again.

  The Locator (spec.fusion_locator) is one more fusion layer per pair, and every cross-attention then also reads
  where it looked: its scores once more, their weighted sum of the keys' (x, y), and that sum's projection.
  """
  v, t = spec.vision, spec.text
  n = 1 + (spec.image_size // v.patch_size) ** 2
  length = spec.max_text_len
  vision = _stem_flops(spec) + v.depth * _layer(n, v.width, v.mlp_dim)
  text_one = t.depth * _layer(length, t.width, t.mlp_dim)
  # The step's captions, written negatives and ITM pairs run bucketed by length (`length_buckets`): each bucket's
  # share at its length; the momentum model, gradient caching's first pass and MLM at max_text_len.
  bucketed = lambda cost: buckets.mean_length(length_buckets, length, cost)
  text = (1 + extra_texts) * bucketed(lambda tokens: t.depth * _layer(tokens, t.width, t.mlp_dim))
  fusion_layers = spec.fusion_depth + spec.fusion_locator

  def cross(queries: int) -> int:
    """One cross-attention of `queries` text tokens over an image, K and V of the image excluded."""
    flops = (2 * queries * t.width * t.width  # Q
             + 2 * (2 * queries * n * t.width) + 2 * queries * t.width * t.width)  # scores, weighted sum, output
    if spec.fusion_locator:  # where it looked: scores again, the weighted (x, y), their projection
      flops += 2 * queries * n * t.width + 2 * queries * n * 2 * t.heads + 2 * queries * 2 * t.heads * t.width
    return flops

  def fusion_text(tokens: int, through_locator_only: bool = False, cls_only: bool = True) -> int:
    """One text of `tokens` through the fusion encoder (or its word window and Locator alone), K and V of its image
    excluded. `cls_only` (a match): its last layer computes [CLS] alone (FusionEncoder's `cls_only`)."""
    window = 2 * tokens * (spec.fusion_word_window + 1) * t.width * t.width if spec.fusion_word_window else 0
    layer = _layer(tokens, t.width, t.mlp_dim) + cross(tokens)
    if through_locator_only:
      return window + layer + 2 * tokens * t.width * 2  # its layer and head
    locator = layer + 2 * tokens * t.width * 2 + 2 * tokens * 2 * t.width if spec.fusion_locator else 0  # + place
    last = _layer(tokens, t.width, t.mlp_dim, queries=1) + cross(1) if cls_only else layer
    return window + locator + (spec.fusion_depth - 1) * layer + last

  image_keys = 2 * n * v.width * (2 * t.width)  # K and V from one image's tokens, per cross-attention layer
  mlm_fusion = fusion_text(length, cls_only=False) + fusion_layers * image_keys  # MLM reads every token

  def fusion_call(pairs: float, per_text: float) -> float:
    # K and V are projected once per image where a call's pairs outnumber the images (train/objective.py's ITM).
    return pairs * per_text + fusion_image_passes(pairs) * fusion_layers * image_keys
  if length_buckets and itm_pairs:  # the drawn pairs at full length in a call of their own, the rest bucketed
    fusion = fusion_call(itm_pairs - drawn_pairs, bucketed(fusion_text)) + fusion_call(drawn_pairs,
                                                                                       fusion_text(length))
  else:
    fusion = fusion_call(itm_pairs, fusion_text(length))
  projections = 2 * v.width * spec.embed_dim + 2 * t.width * spec.embed_dim
  heads = projections + itm_pairs * 2 * t.width * 2
  similarity = 2 * batch * spec.embed_dim  # one row of the (B, B) similarity matrix per example
  keys = 2 * 2 * (batch + queue_size) * spec.embed_dim  # one row of i2t and of t2i against the momentum keys
  parts = {'vision': vision, 'text': text, 'fusion': fusion, 'heads': heads + similarity + (keys if momentum else 0)}
  mlm_pass = text_one + mlm_fusion + 2 * length * t.width * t.width + 2 * length * t.width * t.vocab_size
  if mlm:
    parts['mlm'] = mlm_pass
  if momentum:
    parts['momentum'] = vision + text_one + projections + (keys + (mlm_pass if mlm else 0) if distill else 0)
  if grad_cache:
    parts['grad_cache'] = vision + text_one + projections
  if regions:
    phrase = t.depth * _layer(phrase_len, t.width, t.mlp_dim)
    contrast = projections + 2 * batch * regions * spec.embed_dim if region_contrast else 0
    parts['regions'] = regions * (phrase + contrast)
  if locate:
    # Each phrase through the word window and the Locator; its image's K and V once for all its phrases.
    parts['locate'] = regions * fusion_text(phrase_len, through_locator_only=True) + image_keys
    if grounded_captions:
      parts['locate'] += fusion_text(length, through_locator_only=True) + image_keys
  return {part: int(round(batch * value)) for part, value in parts.items()}


def train_flops(spec: ModelSpec, batch: int, itm_pairs: float = 3, extra_texts: float = 0, mlm: bool = False,
                momentum: bool = False, queue_size: int = 0, distill: bool = False, grad_cache: bool = False,
                regions: int = 0, phrase_len: int = 0, region_contrast: bool = True, locate: bool = False,
                grounded_captions: bool = False, length_buckets: Sequence[buckets.Bucket] = (),
                drawn_pairs: float = 0) -> int:
  """Model FLOPs of one training step: forward + backward = 3 x forward for what trains, forward alone for the
  momentum model and for gradient caching's first pass of the towers (which therefore cost 4 x forward);
  arguments as `forward_flops`."""
  parts = forward_flops(spec, batch, itm_pairs, extra_texts, mlm, momentum, queue_size, distill, grad_cache,
                        regions, phrase_len, region_contrast, locate, grounded_captions, length_buckets,
                        drawn_pairs)
  return 3 * sum(parts.values()) - 2 * (parts.get('momentum', 0) + parts.get('grad_cache', 0))
