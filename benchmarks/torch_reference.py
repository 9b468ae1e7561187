"""Eager PyTorch reference of xmodal's model and train step: what the performance issue (#16) compares xmodal with.

  .venv/bin/python benchmarks/compare.py --config configs/bench_cpu.py   # alternates this step with xmodal's

Plain PyTorch, as a user of it would write the model (`nn.Linear`, `F.scaled_dot_product_attention`, exact `nn.GELU`,
`nn.LayerNorm`, `torch.optim.AdamW`), built from the same config file as xmodal, so that both sides read one source
of shapes:
  - ViT, pre-LN: a p x p stride-p convolution for the patches, [CLS], learned position embeddings, final LayerNorm;
  - text encoder, BERT-style post-LN: word + position + type embeddings and a LayerNorm, then the layers;
  - fusion encoder, post-LN: self-attention over the text, cross-attention to the image tokens, MLP;
  - projections to the embedding, the contrastive temperature, the ITM head (and SigLIP's two scalars, which count
    as parameters in xmodal too but which no loss of the compared configs reads).
The step does the work of xmodal/train/objective.py for the settings this file accepts (`check_supported`): ITC
(symmetric cross-entropy, positives by image id), ITM on 3B fusion pairs with hard negatives drawn from
softmax(similarity) (xmodal/losses/matching.py), then global-norm clipping and AdamW with xmodal's schedule and
weight-decay mask. Modules are named as xmodal's parameters are, so `load_xmodal_params` copies an xmodal
initialisation over.

Uses torch only (the `test` extra). xmodal never imports this file (tests/test_import_graph.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import ml_collections
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

TEMPERATURE_RANGE = (0.001, 0.5)  # as xmodal/models/model.py


def check_supported(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first config key whose setting this reference does not implement."""
  m, loss, optim = config.model, config.loss, config.optim
  unsupported = {
      'model.vision.stem': (m.vision.stem, 'patch'),
      'model.vision.layer_scale_init': (m.vision.layer_scale_init, 0.0),
      'model.dtype': (m.dtype, 'float32'),
      'model.mlm_head': (m.mlm_head, False),
      'loss.mlm_weight': (loss.mlm_weight, 0.0),
      'loss.sigmoid_weight': (loss.sigmoid_weight, 0.0),
      'loss.itm_hard_warmup_steps': (loss.itm_hard_warmup_steps, 0),
      'loss.itm_written_negatives': (loss.itm_written_negatives, 'off'),
      'loss.itc_written_negatives': (loss.itc_written_negatives, False),
      'optim.lr_multipliers': (tuple(optim.lr_multipliers), ()),
      'optim.freeze': (tuple(optim.freeze), ()),
      'train.grad_accum': (config.train.grad_accum, 1),
  }
  for key, (value, supported) in unsupported.items():
    if value != supported:
      raise ValueError(f'the PyTorch reference implements {key}={supported!r} only, not {value!r}')


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------

def _normal_(tensor: torch.Tensor) -> torch.Tensor:
  """xmodal's (BERT's, ViT's) initialiser: normal of std 0.02 truncated at two standard deviations."""
  return nn.init.trunc_normal_(tensor, std=0.02, a=-0.04, b=0.04)


def _dense(d_in: int, d_out: int) -> nn.Linear:
  layer = nn.Linear(d_in, d_out)
  _normal_(layer.weight)
  nn.init.zeros_(layer.bias)
  return layer


class Attention(nn.Module):
  """Multi-head attention; with `kv_width`, cross-attention whose keys and values come from tokens of that width.
  Self-attention projects Q, K and V with one fused Linear, as xmodal does."""

  def __init__(self, width: int, heads: int, kv_width: int | None = None):
    super().__init__()
    self.heads = heads
    if kv_width is None:
      self.qkv = _dense(width, 3 * width)
    else:
      self.query = _dense(width, width)
      self.kv = _dense(kv_width, 2 * width)
    self.out = _dense(width, width)

  def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, kv: torch.Tensor | None = None,
              kv_index: torch.Tensor | None = None, queries: int = 0) -> torch.Tensor:
    """x (B, Lq, D), mask (B, Lk) bool (True = a real key) or None, kv (B, Lk, Dkv) or None -> (B, Lq, D); with
    `kv_index` (B,), kv holds (M, Lk, Dkv) distinct inputs, projected once each and gathered per query row; with
    `queries` (self-attention), only the first that many tokens ask (-> (B, queries, D)), as xmodal's."""
    batch, length, width = x.shape
    head_dim = width // self.heads
    if kv is None:
      q, k, v = self.qkv(x).view(batch, length, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4)
      if queries:
        q, length = q[:, :, :queries], queries
    else:
      q = self.query(x).view(batch, length, self.heads, head_dim).transpose(1, 2)
      projected = self.kv(kv)
      if kv_index is not None:
        projected = projected.index_select(0, kv_index)
      k, v = projected.view(batch, kv.shape[1], 2, self.heads, head_dim).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :])
    return self.out(out.transpose(1, 2).reshape(batch, length, width))


class Mlp(nn.Module):
  def __init__(self, width: int, mlp_dim: int):
    super().__init__()
    self.fc1, self.act, self.fc2 = _dense(width, mlp_dim), nn.GELU(), _dense(mlp_dim, width)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fc2(self.act(self.fc1(x)))


class PreLNBlock(nn.Module):
  """ViT layer: x + attn(LN(x)), then x + mlp(LN(x))."""

  def __init__(self, width: int, heads: int, mlp_dim: int, eps: float):
    super().__init__()
    self.ln1, self.attn = nn.LayerNorm(width, eps=eps), Attention(width, heads)
    self.ln2, self.mlp = nn.LayerNorm(width, eps=eps), Mlp(width, mlp_dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = x + self.attn(self.ln1(x))
    return x + self.mlp(self.ln2(x))


class PostLNBlock(nn.Module):
  """BERT layer: LN(x + attn(x)), then LN(x + mlp(x))."""

  def __init__(self, width: int, heads: int, mlp_dim: int, eps: float):
    super().__init__()
    self.attn, self.ln1 = Attention(width, heads), nn.LayerNorm(width, eps=eps)
    self.mlp, self.ln2 = Mlp(width, mlp_dim), nn.LayerNorm(width, eps=eps)

  def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    x = self.ln1(x + self.attn(x, mask))
    return self.ln2(x + self.mlp(x))


class FusionBlock(nn.Module):
  """ALBEF fusion layer, post-LN: self-attention over the text, cross-attention to the image tokens, MLP."""

  def __init__(self, width: int, heads: int, mlp_dim: int, eps: float, image_width: int):
    super().__init__()
    self.attn, self.ln1 = Attention(width, heads), nn.LayerNorm(width, eps=eps)
    self.cross_attn, self.ln_cross = Attention(width, heads, kv_width=image_width), nn.LayerNorm(width, eps=eps)
    self.mlp, self.ln2 = Mlp(width, mlp_dim), nn.LayerNorm(width, eps=eps)

  def forward(self, x: torch.Tensor, mask: torch.Tensor, image_tokens: torch.Tensor,
              image_index: torch.Tensor | None = None, queries: int = 0) -> torch.Tensor:
    """With `queries`, only the first that many tokens come out (xmodal's FusionBlock.queries)."""
    x = self.ln1((x[:, :queries] if queries else x) + self.attn(x, mask, queries=queries))
    x = self.ln_cross(x + self.cross_attn(x, None, kv=image_tokens, kv_index=image_index))
    return self.ln2(x + self.mlp(x))


class VisionEncoder(nn.Module):
  """images (B, 3, H, W) -> (tokens (B, 1 + N, D) after the final LayerNorm, pooled (B, D) with `fc_norm` else
  None: the LayerNorm of the patch tokens' mean before the final LayerNorm, xmodal's pool 'mean_fc_norm')."""

  def __init__(self, model: ml_collections.ConfigDict):
    super().__init__()
    v = model.vision
    self.patch_embed = nn.Conv2d(3, v.width, v.patch_size, stride=v.patch_size)
    _normal_(self.patch_embed.weight)
    nn.init.zeros_(self.patch_embed.bias)
    self.num_patches = (model.image_size // v.patch_size) ** 2
    self.cls = nn.Parameter(torch.zeros(1, 1, v.width))
    self.pos_embedding = nn.Parameter(_normal_(torch.empty(1, 1 + self.num_patches, v.width)))
    self.layers = nn.ModuleList(PreLNBlock(v.width, v.heads, v.mlp_dim, v.layer_norm_eps) for _ in range(v.depth))
    self.ln_final = nn.LayerNorm(v.width, eps=v.layer_norm_eps)
    self.fc_norm = nn.LayerNorm(v.width, eps=v.layer_norm_eps) if model.pool == 'mean_fc_norm' else None

  def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N, D), patches in row-major order
    x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
    for layer in self.layers:
      x = layer(x)
    pooled = None if self.fc_norm is None else self.fc_norm(x[:, 1:].mean(dim=1))
    return self.ln_final(x), pooled


class TextEmbeddings(nn.Module):
  """ids (B, L) -> (B, L, D): BERT's word + position + token type (all type 0) embeddings, then a LayerNorm."""

  def __init__(self, model: ml_collections.ConfigDict):
    super().__init__()
    t = model.text
    self.word = nn.Embedding(t.vocab_size, t.width)
    self.position = nn.Embedding(t.max_positions, t.width)
    self.token_type = nn.Embedding(t.type_vocab_size, t.width)  # xmodal's 'type' (a name torch reserves)
    for table in (self.word, self.position, self.token_type):
      _normal_(table.weight)
    self.ln = nn.LayerNorm(t.width, eps=t.layer_norm_eps)

  def forward(self, ids: torch.Tensor) -> torch.Tensor:
    return self.ln(self.word(ids) + self.position.weight[:ids.shape[1]] + self.token_type.weight[0])


class TextEncoder(nn.Module):
  """(ids (B, L) int64, mask (B, L) bool) -> tokens (B, L, D)."""

  def __init__(self, model: ml_collections.ConfigDict):
    super().__init__()
    t = model.text
    self.embeddings = TextEmbeddings(model)
    self.layers = nn.ModuleList(PostLNBlock(t.width, t.heads, t.mlp_dim, t.layer_norm_eps) for _ in range(t.depth))

  def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    x = self.embeddings(ids)
    for layer in self.layers:
      x = layer(x, mask)
    return x


class FusionEncoder(nn.Module):
  """(text tokens (P, L, Dt), mask (P, L) bool, image tokens (P, N, Dv)) -> the fused [CLS] (P, 1, Dt), the last
  layer computing it alone as xmodal's match does; with an image index (P,), image tokens (M, N, Dv) and pair i reads
  image index[i]."""

  def __init__(self, model: ml_collections.ConfigDict):
    super().__init__()
    t = model.text
    self.layers = nn.ModuleList(FusionBlock(t.width, t.heads, t.mlp_dim, t.layer_norm_eps, model.vision.width)
                                for _ in range(model.fusion_depth))

  def forward(self, x: torch.Tensor, mask: torch.Tensor, image_tokens: torch.Tensor,
              image_index: torch.Tensor | None = None) -> torch.Tensor:
    for i, layer in enumerate(self.layers):
      x = layer(x, mask, image_tokens, image_index, queries=1 if i == len(self.layers) - 1 else 0)
    return x


class Reference(nn.Module):
  """The whole model of a config's `model` section: towers, fusion encoder, projections, temperature, ITM head."""

  def __init__(self, model: ml_collections.ConfigDict):
    super().__init__()
    self.pool = model.pool
    self.vision = VisionEncoder(model)
    self.text = TextEncoder(model)
    t = model.text
    self.fusion = FusionEncoder(model)
    self.image_proj = _dense(model.vision.width, model.embed_dim)
    self.text_proj = _dense(t.width, model.embed_dim)
    self.itm_head = _dense(t.width, 2)
    self.temperature = nn.Parameter(torch.tensor(float(model.temperature_init)))
    # SigLIP's scale and bias: parameters of xmodal's model whatever the loss, read by no loss accepted here.
    self.sigmoid_log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
    self.sigmoid_bias = nn.Parameter(torch.tensor(-10.0))

  def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """images (B, 3, H, W) -> (tokens (B, 1 + N, Dv), unit-norm embedding (B, E))."""
    tokens, pooled = self.vision(images)
    if self.pool == 'max':
      pooled = tokens[:, 1:].amax(dim=1)
    elif pooled is None:
      pooled = tokens[:, 0] if self.pool == 'cls' else tokens.mean(dim=1)
    return tokens, _normalize(self.image_proj(pooled))

  def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, L), mask (B, L) bool) -> (tokens (B, L, Dt), unit-norm embedding (B, E))."""
    tokens = self.text(ids, mask)
    if self.pool == 'cls':
      pooled = tokens[:, 0]
    else:
      weights = mask.to(tokens.dtype)[..., None]
      pooled = (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
    return tokens, _normalize(self.text_proj(pooled))

  def match(self, text_tokens: torch.Tensor, text_mask: torch.Tensor, image_tokens: torch.Tensor,
            image_index: torch.Tensor | None = None) -> torch.Tensor:
    """(text tokens (P, L, Dt), mask (P, L) bool, image tokens (P, N, Dv)[, image index (P,) into (M, N, Dv)
    image tokens]) -> match logits (P, 2), 1 = match."""
    return self.itm_head(self.fusion(text_tokens, text_mask, image_tokens, image_index)[:, 0])

  def clamped_temperature(self) -> torch.Tensor:
    return self.temperature.clamp(*TEMPERATURE_RANGE)


def _normalize(x: torch.Tensor) -> torch.Tensor:
  return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + 1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------

def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
  return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def _sample_negatives(logits: torch.Tensor, positive: torch.Tensor, generator: torch.Generator
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
  """ALBEF's hard negatives from the (B, B) image-text logits: for each text an image and for each image a text,
  drawn with probability softmax(similarity) over the non-positives. Returns (image_for_text, text_for_image, valid)
  where valid is False for a row whose every candidate is a positive (its index is then arbitrary)."""
  with torch.no_grad():
    masked = logits.detach().masked_fill(positive, float('-inf'))
    # A row of positives only is all -inf, whose softmax is NaN: draw from it uniformly; `valid` leaves it out.
    per_text = torch.nan_to_num(torch.softmax(masked, dim=0).T, nan=1.0)  # row j: text j's distribution over images
    per_image = torch.nan_to_num(torch.softmax(masked, dim=1), nan=1.0)
    image_for_text = torch.multinomial(per_text, 1, generator=generator)[:, 0]
    text_for_image = torch.multinomial(per_image, 1, generator=generator)[:, 0]
    return image_for_text, text_for_image, ~positive.all(dim=-1)


def compute_loss(model: Reference, batch: Mapping[str, torch.Tensor], generator: torch.Generator,
                 loss: ml_collections.ConfigDict) -> tuple[torch.Tensor, dict[str, float]]:
  """Weighted ITC + ITM of a batch from `to_torch_batch`; the hard negatives drawn with `generator`."""
  image_tokens, image_emb = model.encode_image(batch['images'])
  text_tokens, text_emb = model.encode_text(batch['text_ids'], batch['text_mask'])
  # One (B, B) product serves both losses: ITC's logits and, detached, ITM's sampling similarity.
  logits = image_emb @ text_emb.T / model.clamped_temperature()
  ids = batch['image_ids']
  positive = ids[:, None] == ids[None, :]
  targets = positive.to(logits.dtype) / positive.sum(dim=-1, keepdim=True)
  itc = 0.5 * (_soft_cross_entropy(logits, targets) + _soft_cross_entropy(logits.T, targets.T))
  total = loss.itc_weight * itc
  metrics = {'itc_loss': itc}
  if loss.itm_weight > 0:
    image_for_text, text_for_image, valid = _sample_negatives(logits, positive, generator)
    pick = slice(None, None, loss.itm_subsample)
    mask = batch['text_mask']
    # Rows: the positives, texts with a negative image, images with a negative text. As xmodal does, the fusion
    # encoder projects each image's keys and values once and gathers them for its pairs, where the pairs outnumber
    # the images (xmodal/models/flops.py: fusion_image_passes).
    pair_text = torch.cat([text_tokens[pick], text_tokens[pick], text_tokens[text_for_image[pick]]])
    pair_mask = torch.cat([mask[pick], mask[pick], mask[text_for_image[pick]]])
    own = torch.arange(image_tokens.shape[0])[pick]
    pair_index = torch.cat([own, image_for_text[pick], own])
    if pair_index.shape[0] > image_tokens.shape[0]:
      match_logits = model.match(pair_text, pair_mask, image_tokens, pair_index)
    else:
      match_logits = model.match(pair_text, pair_mask, image_tokens[pair_index])
    size = image_tokens[pick].shape[0]
    labels = torch.cat([torch.ones(size, dtype=torch.long), torch.zeros(2 * size, dtype=torch.long)])
    weights = torch.cat([torch.ones(size), valid[pick].float(), valid[pick].float()])
    nll = F.cross_entropy(match_logits, labels, reduction='none')
    itm = (nll * weights).sum() / weights.sum()
    total = total + loss.itm_weight * itm
    metrics['itm_loss'] = itm
  metrics['loss'] = total
  return total, {name: float(value.detach()) for name, value in metrics.items()}


# ---------------------------------------------------------------------------------------------------------------
# Optimizer and step
# ---------------------------------------------------------------------------------------------------------------

def learning_rate(optim: ml_collections.ConfigDict, total_steps: int, step: int) -> float:
  """xmodal's schedule (xmodal/train/optim.py, optax's warmup_cosine_decay_schedule): linear warmup from 0 to lr,
  then cosine to lr * final_lr_ratio at `total_steps`."""
  warmup = min(int(optim.warmup_steps), max(total_steps - 1, 0))
  decay_steps = max(total_steps, warmup + 1)
  if step < warmup:
    return optim.lr * step / warmup
  end = optim.lr * optim.final_lr_ratio
  progress = min(step - warmup, decay_steps - warmup) / (decay_steps - warmup)
  return end + (optim.lr - end) * 0.5 * (1 + math.cos(math.pi * progress))


def decays(module: nn.Module, name: str) -> bool:
  """Whether parameter `name` of `module` gets weight decay: the matrices of dense and convolution layers only (not
  biases, norms, embeddings, [CLS], position embeddings or the loss scalars), xmodal's mask."""
  return name == 'weight' and isinstance(module, (nn.Linear, nn.Conv2d))


class ReferenceStep:
  """The model and its optimizer; calling it on a batch runs one training step and returns the step's metrics.

  The optimizer is xmodal's: global-norm clipping (optim.clip_norm), then AdamW (b1, b2, eps, weight_decay on
  `decays` parameters) at `learning_rate`. torch's AdamW defaults otherwise (no `fused`, no `foreach` forced).
  """

  def __init__(self, config: ml_collections.ConfigDict, total_steps: int, seed: int = 0):
    check_supported(config)
    self.config = config
    torch.manual_seed(seed)
    self.model = Reference(config.model)
    optim = config.optim
    groups = {True: [], False: []}
    for module in self.model.modules():
      for name, param in module.named_parameters(recurse=False):
        groups[decays(module, name)].append(param)
    self.optimizer = torch.optim.AdamW(
        [{'params': groups[True], 'weight_decay': optim.weight_decay}, {'params': groups[False], 'weight_decay': 0.0}],
        lr=optim.lr, betas=(optim.b1, optim.b2), eps=optim.eps)
    self.scheduler = torch.optim.lr_scheduler.LambdaLR(
        self.optimizer, lambda step: learning_rate(optim, total_steps, step) / optim.lr)
    self.generator = torch.Generator().manual_seed(seed)

  def __call__(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
    self.model.train()
    loss, metrics = compute_loss(self.model, batch, self.generator, self.config.loss)
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if self.config.optim.clip_norm > 0:
      metrics['grad_norm'] = float(nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optim.clip_norm))
    self.optimizer.step()
    self.scheduler.step()
    return metrics


def to_torch_batch(batch: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
  """A batch of xmodal's layout (xmodal.train.bench.synthetic_batch: images (B, H, W, 3)) in torch's: images
  (B, 3, H, W) contiguous, as a PyTorch input pipeline gives them; ids int64; the text mask bool."""
  return {'images': torch.from_numpy(np.ascontiguousarray(np.asarray(batch['images']).transpose(0, 3, 1, 2))),
          'text_ids': torch.from_numpy(np.asarray(batch['text_ids']).astype(np.int64)),
          'text_mask': torch.from_numpy(np.asarray(batch['text_mask']).astype(bool)),
          'image_ids': torch.from_numpy(np.asarray(batch['image_ids']).astype(np.int64))}


def num_params(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------
# FLOPs, from this file's own layers (independently of xmodal/models/flops.py)
# ---------------------------------------------------------------------------------------------------------------

def _linear(layer: nn.Linear, tokens: int) -> int:
  return 2 * tokens * layer.in_features * layer.out_features


def _attention_core(queries: int, keys: int, width: int) -> int:
  """Scores Q K^T and the weighted sum of V, over all heads."""
  return 2 * (2 * queries * keys * width)


def _self_attention(attn: Attention, tokens: int) -> int:
  return _linear(attn.qkv, tokens) + _attention_core(tokens, tokens, attn.out.in_features) + _linear(attn.out, tokens)


def _mlp(mlp: Mlp, tokens: int) -> int:
  return _linear(mlp.fc1, tokens) + _linear(mlp.fc2, tokens)


def _fusion_layer(block: FusionBlock, tokens: int, queries: int, image_tokens: int) -> int:
  """One fusion layer of a pair, its image's keys and values left out: Q, K, V of every token, the rest for
  `queries` of them."""
  width = block.attn.out.in_features
  return (_linear(block.attn.qkv, tokens) + _attention_core(queries, tokens, width) + _linear(block.attn.out, queries)
          + _linear(block.cross_attn.query, queries) + _attention_core(queries, image_tokens, width)
          + _linear(block.cross_attn.out, queries) + _mlp(block.mlp, queries))


def forward_flops(model: Reference, batch: int, text_len: int, itm_pairs: float = 3) -> dict[str, int]:
  """Matmul FLOPs (2 per multiply-add) of one step's forward pass on B (image, caption) pairs of `text_len` tokens,
  by part; elementwise work (norms, softmax, GELU) is left out. `itm_pairs` x B pairs go through the fusion encoder
  (3 / loss.itm_subsample)."""
  vision = model.vision
  conv, patches = vision.patch_embed, vision.num_patches
  n = 1 + patches  # image tokens
  stem = 2 * patches * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
  per_example = {
      'vision': stem + sum(_self_attention(b.attn, n) + _mlp(b.mlp, n) for b in vision.layers),
      'text': sum(_self_attention(b.attn, text_len) + _mlp(b.mlp, text_len) for b in model.text.layers),
      # Keys and values from an image's tokens once per pair, or once per image where the pairs outnumber them; the
      # last layer's queries, cross-attention and MLP for [CLS] alone.
      'fusion': sum(
          itm_pairs * _fusion_layer(b, text_len, 1 if i == len(model.fusion.layers) - 1 else text_len, n)
          + min(itm_pairs, 1) * _linear(b.cross_attn.kv, n) for i, b in enumerate(model.fusion.layers)),
      # One pooled token per image and per text, one per pair; one row of the (B, B) similarity per example.
      'heads': (_linear(model.image_proj, 1) + _linear(model.text_proj, 1) + itm_pairs * _linear(model.itm_head, 1)
                + 2 * batch * model.image_proj.out_features),
  }
  return {part: int(round(batch * value)) for part, value in per_example.items()}


def train_flops(model: Reference, batch: int, text_len: int, itm_pairs: float = 3) -> int:
  """Model FLOPs of one training step: 3 x the forward (the backward counted as twice the forward)."""
  return 3 * sum(forward_flops(model, batch, text_len, itm_pairs).values())


# ---------------------------------------------------------------------------------------------------------------
# xmodal's parameters, copied in
# ---------------------------------------------------------------------------------------------------------------

def load_xmodal_params(model: Reference, params: Mapping[str, np.ndarray]) -> None:
  """Copies xmodal parameters, given as {'a/b/kernel': array} (xmodal/train/optim.py's `param_paths` of an unboxed
  tree, layers scanned or not), into `model`. Every tensor of both sides must be matched: the missing and unexpected
  names are listed otherwise.

  Flax kernels are (in, *out) (the attention output's (heads, head_dim, out)) and torch weights (out, in); a
  convolution's (h, w, in, out) is torch's (out, in, h, w); LayerNorm scales and embedding tables are torch weights;
  stacked layers (scan) split over their leading axis.
  """
  converted = {}
  for path, value in params.items():
    parts = [p for p in path.split('/') if p != 'norm']  # xmodal's LayerNorm wraps flax's as 'norm'
    parts = ['token_type' if p == 'type' else p for p in parts]
    parts[-1] = {'scale': 'weight', 'embedding': 'weight', 'kernel': 'weight'}.get(parts[-1], parts[-1])
    kernel = path.endswith('/kernel')
    if 'layers' in parts:  # scanned: one stacked array for all layers
      at = parts.index('layers') + 1
      layers = [(parts[:at] + [str(i)] + parts[at:], layer) for i, layer in enumerate(np.asarray(value))]
    else:
      layers = [([p.replace('layers_', 'layers/') for p in parts], value)]
    for names, array in layers:
      array = np.asarray(array, np.float32)
      if kernel and names[-2] == 'patch_embed':  # the one convolution
        array = array.transpose(3, 2, 0, 1)
      elif kernel:
        array = (array.reshape(-1, array.shape[-1]) if names[-2] == 'out' else array.reshape(array.shape[0], -1)).T
      elif names[-1] == 'bias':
        array = array.reshape(-1)
      converted['.'.join('/'.join(names).split('/'))] = array
  own = dict(model.named_parameters())
  missing, unexpected = sorted(set(own) - set(converted)), sorted(set(converted) - set(own))
  if missing or unexpected:
    raise ValueError(f'xmodal parameters do not fit the reference: missing {missing}, unexpected {unexpected}')
  with torch.no_grad():
    for name, param in own.items():
      value = torch.from_numpy(np.array(converted[name]))  # a writable copy, its shape kept (0-d too)
      if value.shape != param.shape:
        raise ValueError(f'{name}: xmodal gives {tuple(value.shape)}, the reference has {tuple(param.shape)}')
      param.copy_(value)
