"""The training objective: ITC (+ optional sigmoid ITC), ITM on hard negatives, MLM and region-phrase alignment, as
one pure function.

ITM reuses the tower outputs of the ITC pass: the hard negatives are gathered from the tokens already computed, and
only the fusion encoder runs again, on 3B pairs (B positives, B texts with a negative image, B images with a negative
text).

With ALBEF's momentum model (loss.momentum > 0), `momentum_outputs` runs it on the batch first, outside the gradient
(the `Teacher`); `compute_loss` then scores ITC against its embeddings and the queue of past ones
(`losses.momentum_contrastive_loss`), and distils ITC and MLM from it (loss.distill_alpha). ITM and the sigmoid loss
stay on the online embeddings.

For 'exact' gradient accumulation (gradient caching, train/step.py), `embed` and `contrastive_loss_of_embeddings`
take ITC (+ sigmoid) over the whole batch's embeddings, and `compute_loss(..., embedding_grads=...)` runs a
micro-batch's ITM and MLM with those embeddings' cached gradients in place of its own ITC.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from xmodal import losses
from xmodal.losses import ring as losses_chunked
from xmodal.models import buckets, flops, regions
from xmodal.models.model import ModelSpec, XModal


WRITTEN_NEGATIVES = ('off', 'replace', 'add')  # the values of `loss.itm_written_negatives`


@dataclasses.dataclass(frozen=True)
class LossWeights:
  itc: float = 1.0
  itm: float = 1.0
  sigmoid: float = 0.0
  chunked: bool = False  # ring form of the contrastive losses (xmodal/losses/ring.py)
  # Steps over which ITM's negatives go from uniform (over the non-positives) to ALBEF's softmax(similarity); 0 =
  # hard from the start. Hard negatives chosen by a still-random ITC are the hardest pairs there are, and a fusion
  # encoder trained from scratch on them alone stays at the prior (docs/shapes_recipe.md).
  itm_hard_warmup: int = 0
  # ITM and the relation term count from this step on (0 = from the start), and the parameters only they train start
  # then, freshly (matching_only_parameters, optim.LateStart). Why: on the shapes data a fusion encoder trained from
  # step 0 never learnt relations; one that starts on towers already trained, with hard negatives from its first
  # step and an optimizer of its own, does (docs/shapes_recipe.md, "Relations in one run"). Before the start the
  # loop runs a step without them (`before_matching`); `compute_loss` multiplies them by 0 there.
  itm_start: int = 0
  # What ITM does with the negatives the data writes (batch 'negative_ids', data.negatives_key): 'off' ignores them;
  # 'replace' makes each image's negative text its written one where it has one, for a fraction `negative_hardness`
  # of the images (3B pairs, as ALBEF); 'add' scores them as B more pairs (4B).
  itm_written_negatives: str = 'off'
  # ITM's pairs come from every k-th example of the batch (1 = all, ALBEF): the fusion encoder's cost falls k-fold
  # while ITC keeps the whole batch, and negatives are still drawn from all of it.
  itm_subsample: int = 1
  # ITC's image-to-text softmax also sees the batch's written negatives as columns (NegCLIP); not with `chunked`.
  itc_written_negatives: bool = False
  # MLM through the fusion encoder: its weight, the share of word tokens chosen, and the vocabulary's [MASK] id and
  # size (random replacements are drawn below it), which come from the tokenizer.
  mlm: float = 0.0
  mlm_probability: float = 0.15
  mlm_mask_id: int = -1
  mlm_vocab_size: int = 0
  # ALBEF's momentum model (xmodal/train/momentum.py): the moving average's rate (0 = off; ITC's keys come from it
  # when on), the queue of its past embeddings (0 = none), and the distillation weight, reached linearly over
  # `distill_warmup` steps.
  momentum: float = 0.0
  queue_size: int = 0
  distill_alpha: float = 0.0
  distill_warmup: int = 0
  # Region-phrase alignment (losses/region.py; the batch's 'region_*' fields, data.region_boxes_key): its weight, and
  # the regions per example and their phrases' length, which the FLOPs count needs (data.max_regions,
  # data.max_phrase_len).
  region: float = 0.0
  regions_per_example: int = 0
  phrase_len: int = 0
  # Where each region's phrase is (losses.locate_loss, through the fusion encoder's Locator): its weight; the regions'
  # count and phrase length come as above. `grounded_captions`: the data grounds each caption's words in its regions
  # (data.caption_grounding), and the Locator learns from them too.
  locate: float = 0.0
  grounded_captions: bool = False
  # ITM on relation swaps (batch 'relation_*', data.relation_swaps): its weight. Each image whose caption states a
  # relation adds one pair, its image with the swap, scored against its own positive pair (balanced, apart from
  # ITM's own mean): on the shapes data ITM's other negatives outnumber the relation swaps ~20 to 1.
  relation: float = 0.0
  # The text tower's and the fusion encoder's rows computed at about their real length (models/buckets.py;
  # loss.length_buckets): ((share, length), ...), () = all at full length. A batch the plan does not fit must run
  # `without_buckets()` (`buckets_fit` tells on the host).
  length_buckets: tuple[tuple[float, int], ...] = ()

  def __post_init__(self):
    # A config holds lists where a tuple was set; the weights are hashable (a static argument of the jitted step).
    object.__setattr__(self, 'length_buckets', tuple((float(s), int(n)) for s, n in self.length_buckets))
    if self.momentum > 0 and (self.chunked or self.itc_written_negatives):
      raise ValueError('the momentum form of ITC has neither a ring form (chunked) nor written-negative columns')
    if (self.queue_size or self.distill_alpha) and not self.momentum:
      raise ValueError('the queue and distillation need the momentum model: momentum > 0')

  @classmethod
  def from_config(cls, loss: ml_collections.ConfigDict, data: ml_collections.ConfigDict | None = None
                  ) -> LossWeights:
    """The `loss` section's weights; the `data` section is read when MLM is on (its tokenizer's [MASK]) and when
    the region loss is (its regions' count and phrase length)."""
    mlm, region = float(loss.mlm_weight), float(loss.get('region_weight', 0.0))
    locate, relation = float(loss.get('locate_weight', 0.0)), float(loss.get('relation_weight', 0.0))
    if (mlm > 0 or region > 0 or locate > 0) and data is None:
      raise ValueError('loss.mlm_weight, loss.region_weight and loss.locate_weight need the data section '
                       '(LossWeights.from_config(loss, data))')
    mask_id, vocab_size = -1, 0
    if mlm > 0:
      from xmodal.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top
      tok = load_tokenizer(data.tokenizer)
      if tok.mask_id < 0:
        raise ValueError(f'loss.mlm_weight={mlm} needs a [MASK] token; tokenizer {data.tokenizer!r} '
                         f'({tok.files[0]}) has none')
      mask_id, vocab_size = tok.mask_id, tok.vocab_size
    phrase_shape = (int(data.max_regions), int(data.max_phrase_len)) if region > 0 or locate > 0 else (0, 0)
    return cls(itc=float(loss.itc_weight), itm=float(loss.itm_weight), sigmoid=float(loss.sigmoid_weight),
               chunked=bool(loss.chunked), itm_hard_warmup=int(loss.itm_hard_warmup_steps),
               itm_start=int(loss.get('itm_start_step', 0)),
               itm_written_negatives=str(loss.itm_written_negatives), itm_subsample=int(loss.itm_subsample),
               itc_written_negatives=bool(loss.itc_written_negatives), mlm=mlm,
               mlm_probability=float(loss.mlm_probability), mlm_mask_id=mask_id,
               mlm_vocab_size=vocab_size, momentum=float(loss.momentum), queue_size=int(loss.queue_size),
               distill_alpha=float(loss.distill_alpha), distill_warmup=int(loss.distill_warmup_steps),
               region=region, regions_per_example=phrase_shape[0], phrase_len=phrase_shape[1], locate=locate,
               grounded_captions=locate > 0 and bool(data.get('caption_grounding', '')), relation=relation,
               length_buckets=loss.get('length_buckets', ()))

  @property
  def itm_pairs(self) -> float:
    """(text, image) pairs per example through the fusion encoder: 3 (ALBEF), 4 with 'add', one more with relation
    swaps, 0 without ITM; divided by `itm_subsample`."""
    if self.itm <= 0:
      return 0
    return ((4 if self.itm_written_negatives == 'add' else 3) + (self.relation > 0)) / self.itm_subsample

  @property
  def extra_texts(self) -> float:
    """Captions per example through the text tower beyond the batch's own: the written negatives and the relation
    swaps, when used."""
    return (int(self.itc_written_negatives or (self.itm > 0 and self.itm_written_negatives != 'off'))
            + int(self.itm > 0 and self.relation > 0))

  def train_flops(self, spec: ModelSpec, batch: int, grad_cache: bool = False) -> int:
    """Model FLOPs of a training step on a global batch of `batch` with these losses (flops.train_flops);
    `grad_cache`: the step accumulates by gradient caching (step.caches_gradients), running the towers twice."""
    return flops.train_flops(spec, batch, self.itm_pairs, self.extra_texts, self.mlm > 0, self.momentum > 0,
                             self.queue_size, self.distill_alpha > 0, grad_cache, self.regions_per_example,
                             self.phrase_len, self.region > 0, self.locate > 0, self.grounded_captions,
                             self.length_buckets, 1 / self.itm_subsample if self.itm > 0 else 0)

  def without_buckets(self) -> LossWeights:
    """These weights with every text at full length: the step for a batch that `buckets_fit` says does not fit."""
    return dataclasses.replace(self, length_buckets=())

  def buckets_fit(self, batch: Mapping[str, np.ndarray]) -> bool:
    """Whether the step's length buckets fit this host batch: the texts through the text tower (`_encode_texts`) and
    ITM's pairs through the fusion encoder (`_matching`) but those whose texts the step draws itself (ITM's hard
    negative texts, and with 'replace' the written ones mixed in), each sorted by length. True without buckets."""
    if not self.length_buckets:
      return True
    lengths = {name: np.sum(np.asarray(batch[f'{name}_mask']) > 0, axis=1) for name in _texts(self, batch)}
    full_length = np.asarray(batch['text_mask']).shape[1]
    fit = lambda rows: bool(buckets.fits(np.concatenate(rows), self.length_buckets, full_length))
    if not fit(list(lengths.values())):
      return False
    if self.itm <= 0:
      return True
    pick = slice(None, None, self.itm_subsample)
    captions = lengths['text'][pick]
    pairs = [captions, captions]  # not the negative texts the step draws: they run at full length (_match_groups)
    if self.itm_written_negatives == 'add' and 'negative' in lengths:
      pairs.append(lengths['negative'][pick])
    if 'relation' in lengths:
      pairs.append(lengths['relation'][pick])
    return fit(pairs)

  def negative_hardness(self, step: jax.Array | None) -> jax.Array:
    """1 = ALBEF's hard negatives, 0 = uniform ones; rises linearly over `itm_hard_warmup` steps."""
    if self.itm_hard_warmup <= 0 or step is None:
      return jnp.ones((), jnp.float32)
    return jnp.clip(jnp.asarray(step, jnp.float32) / self.itm_hard_warmup, 0.0, 1.0)

  def before_matching(self) -> LossWeights | None:
    """The loss before `itm_start` as weights: these without ITM and the relation term, which the loop compiles as
    a step of its own so that those steps skip the fusion encoder's passes; None when ITM starts at step 0."""
    return dataclasses.replace(self, itm=0.0, relation=0.0, itm_start=0) if self.itm_start > 0 else None

  def matching_on(self, step: jax.Array | None) -> jax.Array:
    """1.0 from step `itm_start` on (and when the step is not known), 0.0 before: ITM's factor."""
    if self.itm_start <= 0 or step is None:
      return jnp.ones((), jnp.float32)
    return (jnp.asarray(step) >= self.itm_start).astype(jnp.float32)

  def distillation(self, step: jax.Array | None) -> jax.Array | None:
    """The weight of the momentum model's targets: `distill_alpha` * min(1, step / `distill_warmup`) (ALBEF ramps
    it over the first epoch); None when distillation is off."""
    if self.distill_alpha <= 0:
      return None
    alpha = jnp.asarray(self.distill_alpha, jnp.float32)
    if self.distill_warmup <= 0 or step is None:
      return alpha
    return alpha * jnp.clip(jnp.asarray(step, jnp.float32) / self.distill_warmup, 0.0, 1.0)


def matching_only_parameters(weights: LossWeights) -> tuple[str, ...]:
  """Path regexes of the parameters that only ITM and the relation term train: the fusion layers, the place input
  and the ITM head, and the word window and Locator as well unless the Locator's own loss trains them. With
  `itm_start` they start at that step (optim.LateStart). Not with MLM, which trains the fusion layers too."""
  if weights.mlm > 0:
    raise ValueError('MLM trains the fusion encoder as well: no parameter is trained by ITM alone')
  shared_with_locate = () if weights.locate > 0 else ('^fusion/word_window/', '^fusion/locator/')
  return ('^itm_head/', '^fusion/layers/', '^fusion/place/', *shared_with_locate)


class Teacher(NamedTuple):
  """The momentum model's outputs on a batch: image_emb, text_emb (B, E) unit norm, and with MLM distillation the
  logits (B, L, V) of the corrupted captions' tokens (else None)."""
  image_emb: jax.Array
  text_emb: jax.Array
  mlm_logits: jax.Array | None


def _teacher(module: XModal, batch: dict[str, jax.Array], rng: jax.Array, weights: LossWeights) -> Teacher:
  """Runs inside `model.apply` with the momentum parameters: ALBEF's momentum towers, and its MLM on the captions
  corrupted exactly as `_masked_lm` corrupts them (same key)."""
  image_tokens, image_emb = module.encode_image(batch['images'])
  _, text_emb = module.encode_text(batch['text_ids'], batch['text_mask'])
  mlm_logits = None
  if weights.mlm > 0 and weights.distill_alpha > 0:
    masked = _corrupt(batch, rng, weights)
    tokens = module.text(masked.ids, batch['text_mask'])
    mlm_logits = module.predict_masked(tokens, batch['text_mask'], image_tokens)
  return Teacher(image_emb, text_emb, mlm_logits)


def momentum_outputs(model: XModal, momentum_params, batch: dict[str, jax.Array], rng: jax.Array,
                     weights: LossWeights) -> Teacher:
  """The momentum model on `batch` (the `compute_loss` batch and rng), without gradients: what `compute_loss` takes
  as `teacher`, and what the step enqueues."""
  return jax.lax.stop_gradient(model.apply({'params': momentum_params}, batch, rng, weights, method=_teacher))


def _contrastive(module: XModal, image_emb: jax.Array, text_emb: jax.Array, ids: jax.Array | None,
                 weights: LossWeights, step: jax.Array | None = None, teacher: Teacher | None = None,
                 queue: losses.QueuedKeys | None = None, written: WrittenNegatives | None = None
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Runs inside `model.apply`: the weighted ITC (+ sigmoid) loss of embeddings (B, E) and its metrics."""
  temperature = module.temperature()
  if teacher is not None:
    itc, metrics = losses.momentum_contrastive_loss(image_emb, text_emb, temperature, teacher.image_emb,
                                                    teacher.text_emb, ids, queue, weights.distillation(step))
  elif weights.itc_written_negatives and written is not None:
    itc, metrics = losses.contrastive_loss(image_emb, text_emb, temperature, ids, written.emb, written.valid)
  else:
    contrastive = losses_chunked.contrastive_loss if weights.chunked else losses.contrastive_loss
    itc, metrics = contrastive(image_emb, text_emb, temperature, ids)
  total = weights.itc * itc

  if weights.sigmoid > 0:
    scale, bias = module.sigmoid_params()
    sigmoid = losses_chunked.sigmoid_loss if weights.chunked else losses.sigmoid_loss
    sig, sig_metrics = sigmoid(image_emb, text_emb, scale, bias, ids)
    metrics = dict(metrics, **sig_metrics)
    total += weights.sigmoid * sig
  return total, metrics


class EmbeddingGrads(NamedTuple):
  """Gradient caching's cached cotangents: d(whole-batch ITC + sigmoid loss) / d(embeddings) for one micro-batch's
  rows, image and text (b, E), already scaled as the step wants them."""
  image: jax.Array
  text: jax.Array


def _losses(module: XModal, batch: dict[str, jax.Array], rng: jax.Array, weights: LossWeights,
            step: jax.Array | None, teacher: Teacher | None, queue: losses.QueuedKeys | None,
            embedding_grads: EmbeddingGrads | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Runs inside `model.apply`: `module` is the bound XModal."""
  ids = batch.get('image_ids')
  image_tokens, image_emb = module.encode_image(batch['images'])
  temperature = module.temperature()
  metrics = {'temperature': temperature}
  total = jnp.zeros((), jnp.float32)

  # The captions, and the written negatives and relation swaps where a loss uses them, through the text tower in one
  # call (bucketed by length as a whole, with weights.length_buckets).
  texts = _texts(weights, batch)
  encoded, fits = _encode_texts(module, [(batch[f'{name}_ids'], batch[f'{name}_mask']) for name in texts],
                                weights.length_buckets)
  (text_tokens, text_emb), encoded = encoded[0], dict(zip(texts[1:], encoded[1:]))
  written = None  # the data's written negatives through the text tower, when a loss uses them
  if 'negative' in encoded:
    tokens, emb = encoded['negative']
    written = WrittenNegatives(tokens, batch['negative_mask'], emb, batch['negative_valid'].astype(bool))
  swaps = None  # the captions' relation swaps through the text tower, for ITM
  if 'relation' in encoded:
    tokens, emb = encoded['relation']
    swaps = WrittenNegatives(tokens, batch['relation_mask'], emb, batch['relation_valid'].astype(bool))

  if embedding_grads is None:
    contrastive, contrastive_metrics = _contrastive(module, image_emb, text_emb, ids, weights, step, teacher, queue,
                                                    written)
    metrics.update(contrastive_metrics)
    total += contrastive

  phrases = _phrases(module, batch) if weights.region > 0 or weights.locate > 0 else None
  if weights.region > 0:
    region, region_metrics = _region_phrase(module, batch, image_tokens, phrases, temperature)
    metrics.update(region_metrics)
    total += weights.region * region

  if weights.locate > 0:
    locate, locate_metrics = _locate(module, batch, image_tokens, text_tokens, phrases)
    metrics.update(locate_metrics)
    total += weights.locate * locate

  if weights.itm > 0:
    sim = jnp.einsum('ie,te->it', image_emb, text_emb) / temperature
    itm, relation, itm_metrics = _matching(batch, image_tokens, text_tokens, written, sim, rng, weights, step,
                                           module, swaps)
    fits &= itm_metrics.pop('length_buckets_fit')
    metrics.update(itm_metrics)
    total += weights.matching_on(step) * (weights.itm * itm + weights.relation * relation)

  if weights.mlm > 0:
    teacher_logits = None if teacher is None else teacher.mlm_logits
    mlm, mlm_metrics = _masked_lm(batch, image_tokens, rng, weights, module, teacher_logits,
                                  weights.distillation(step))
    metrics.update(mlm_metrics)
    total += weights.mlm * mlm

  if weights.length_buckets:
    metrics['length_buckets_fit'] = fits.astype(jnp.float32)  # 1 where every bucketed call of the step fit
  metrics['loss'] = total
  if embedding_grads is not None:
    # Gradient caching: ITC and the sigmoid loss were taken over the whole batch (train/step.py). This term's value
    # means nothing; its gradient is theirs pushed through this micro-batch's embeddings (a vector-Jacobian product).
    g = jax.lax.stop_gradient(embedding_grads)
    total += jnp.sum(g.image * image_emb) + jnp.sum(g.text * text_emb)
  return total, metrics


def _texts(weights: LossWeights, batch: Mapping[str, Any]) -> list[str]:
  """The batch's texts the step runs through the text tower: 'text' (the captions), 'negative' (the written
  negatives) and 'relation' (the relation swaps) where a loss uses them."""
  texts = ['text']
  if 'negative_ids' in batch and (weights.itc_written_negatives or
                                  (weights.itm > 0 and weights.itm_written_negatives != 'off')):
    texts.append('negative')
  if weights.itm > 0 and weights.relation > 0:
    texts.append('relation')
  return texts


def _encode_texts(module: XModal, texts: list[tuple[jax.Array, jax.Array]], plan: Sequence[buckets.Bucket]
                  ) -> tuple[list[tuple[jax.Array, jax.Array]], jax.Array]:
  """[(ids, mask) (B, L)] -> ([(tokens (B, L, Dt), emb (B, E))], whether the length buckets fit): the texts through
  the text tower as one batch, bucketed by length by `plan` (tokens are zero past a row's bucket)."""
  ids, mask = (jnp.concatenate(parts) for parts in zip(*texts))
  encode = lambda mdl, mask, per_token, per_row, shared: tuple([x] for x in mdl.encode_text(per_token[0], mask))
  ((tokens,), (emb,)), fits = buckets.apply_by_length(module, encode, mask, [ids], [], [], plan)
  bounds = [0] + list(itertools.accumulate(part[0].shape[0] for part in texts))
  return [(tokens[a:b], emb[a:b]) for a, b in zip(bounds, bounds[1:])], fits


class Phrases(NamedTuple):
  """The batch's region phrases through the text tower, flattened to M = B R rows: ids and mask (M, Lp), tokens
  (M, Lp, Dt), emb (M, E), valid (M,) bool."""
  ids: jax.Array
  mask: jax.Array
  tokens: jax.Array
  emb: jax.Array
  valid: jax.Array


def _phrases(module: XModal, batch: dict[str, jax.Array]) -> Phrases:
  b, r, length = batch['region_ids'].shape
  ids, mask = batch['region_ids'].reshape(b * r, length), batch['region_mask'].reshape(b * r, length)
  tokens, emb = module.encode_text(ids, mask)
  return Phrases(ids, mask, tokens, emb, batch['region_valid'].reshape(b * r).astype(bool))


def _region_phrase(module: XModal, batch: dict[str, jax.Array], image_tokens: jax.Array, phrases: Phrases,
                   temperature: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The region-phrase loss of the batch's regions: their embeddings from the ITC pass's image tokens, their
  phrases through the text tower (B * R short texts), scored at ITC's temperature."""
  region_emb = module.embed_regions(image_tokens, batch['region_boxes'])
  return losses.region_phrase_loss(region_emb.reshape(phrases.emb.shape[0], -1), phrases.emb, phrases.ids,
                                   phrases.valid, temperature)


def _locate(module: XModal, batch: dict[str, jax.Array], image_tokens: jax.Array, text_tokens: jax.Array,
            phrases: Phrases) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Where the Locator puts each region's phrase and, when the data grounds its captions (`text_regions`), each
  caption word that names a region, read against its own image (the ITC pass's tokens, projected once per image),
  against the centre of the region's box. The two terms add, each a mean over its own tokens."""
  b, r = batch['region_ids'].shape[:2]
  centres = regions.box_centres(batch['region_boxes'])  # (B, R, 2)
  positions = module.locate(phrases.tokens, phrases.mask, image_tokens, jnp.repeat(jnp.arange(b), r))
  loss, metrics = losses.locate_loss(positions, jnp.broadcast_to(centres.reshape(b * r, 1, 2), positions.shape),
                                     phrases.mask * phrases.valid[:, None])
  if 'text_regions' in batch:
    # A caption's words through the Locator, as the fusion encoder reads them before its first layer; the extra
    # pass costs one fusion layer on B captions (the match runs it on every pair, without its positions out).
    named = batch['text_regions']
    positions = module.locate(text_tokens, batch['text_mask'], image_tokens, jnp.arange(b))
    token_centres = jnp.take_along_axis(centres, jnp.maximum(named, 0)[..., None], axis=1)  # (B, L, 2)
    caption_loss, caption_metrics = losses.locate_loss(positions, token_centres, (named >= 0) * batch['text_mask'])
    loss += caption_loss
    metrics |= {f'caption_{name}': value for name, value in caption_metrics.items()}
  return loss, metrics


def _corrupt(batch: dict[str, jax.Array], rng: jax.Array, weights: LossWeights) -> losses.MaskedTokens:
  """MLM's corruption of the batch's captions from the step's key."""
  # Its own key, so that turning MLM on leaves ITM's negatives as they were.
  return losses.mask_tokens(jax.random.fold_in(rng, 1), batch['text_ids'], batch['text_mask'],
                            mask_id=weights.mlm_mask_id, vocab_size=weights.mlm_vocab_size,
                            probability=weights.mlm_probability)


def _masked_lm(batch: dict[str, jax.Array], image_tokens: jax.Array, rng: jax.Array, weights: LossWeights,
               module: XModal, teacher_logits: jax.Array | None = None, alpha: jax.Array | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """MLM on every caption of the batch with its own image: the corrupted caption goes through the text tower
  again (ALBEF), the fusion encoder attends to the image tokens of the ITC pass, and the head predicts the originals
  (distilled from the momentum model's `teacher_logits` with weight `alpha` when given).
  """
  masked = _corrupt(batch, rng, weights)
  tokens = module.text(masked.ids, batch['text_mask'])
  logits = module.predict_masked(tokens, batch['text_mask'], image_tokens)
  return losses.masked_lm_loss(logits, batch['text_ids'], masked.chosen, teacher_logits, alpha)


class WrittenNegatives(NamedTuple):
  """The data's written negative captions (or relation swaps) through the text tower: tokens (B, L, Dt), mask
  (B, L), emb (B, E), valid (B,) bool (False where a caption had none)."""
  tokens: jax.Array
  mask: jax.Array
  emb: jax.Array
  valid: jax.Array


def _matching(batch: dict[str, jax.Array], image_tokens: jax.Array, text_tokens: jax.Array,
              written: WrittenNegatives | None, sim: jax.Array, rng: jax.Array, weights: LossWeights,
              step: jax.Array | None, module: XModal, swaps: WrittenNegatives | None = None
              ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """ITM over the pairs of every `itm_subsample`-th example: its positive, its text with a negative image, its image
  with a negative text (the data's written one instead, or in addition, per `itm_written_negatives`); and with
  `swaps`, its image with its caption's relation swap, a second loss over these pairs and their positives.

  Returns (ITM loss, relation-swap loss (0 without `swaps`), metrics).

  Negatives are drawn over the whole batch's similarity `sim` (B, B), so subsampling thins the pairs, not the
  candidates. Tower outputs are reused; only the fusion encoder runs again.
  """
  hardness = weights.negative_hardness(step)
  rng, written_rng = jax.random.split(rng)
  negatives = losses.sample_hard_negatives(rng, sim, batch.get('image_ids'), hardness)
  pick = slice(None, None, weights.itm_subsample)  # strided: every shard of a sharded batch keeps its share
  # Rows: n positives, then n texts with their negative image, then n images with their negative text. Rows name
  # their image by its index in the batch; the fusion encoder projects each image's keys and values once and
  # gathers them, where the pairs outnumber the batch's images (flops.fusion_image_passes).
  own_image = jnp.arange(image_tokens.shape[0])[pick]
  negative_image = negatives.image_for_text[pick]
  negative_text = text_tokens[negatives.text_for_image[pick]]
  negative_mask = batch['text_mask'][negatives.text_for_image[pick]]
  text_tokens, text_mask = text_tokens[pick], batch['text_mask'][pick]
  negative_text_valid = negatives.text_for_image_valid[pick]
  written = written if weights.itm_written_negatives != 'off' else None
  if written is not None:
    written_tokens = written.tokens[pick].astype(text_tokens.dtype)
    written_mask, written_valid = written.mask[pick], written.valid[pick]
  if written is not None and weights.itm_written_negatives == 'replace':
    # Like the in-batch negatives, written ones come in with the hardness schedule: a fraction h of the images get
    # theirs (all of them from itm_hard_warmup on). From scratch, ITM learns on easy pairs first.
    use = (written_valid & (jax.random.uniform(written_rng, written_valid.shape) < hardness))[:, None, None]
    negative_text = jnp.where(use, written_tokens, negative_text)
    negative_mask = jnp.where(use[..., 0], written_mask, negative_mask)
    negative_text_valid = use[:, 0, 0] | negative_text_valid
  pair_text = [text_tokens, text_tokens, negative_text]
  pair_mask = [text_mask, text_mask, negative_mask]
  pair_image = [own_image, negative_image, own_image]
  negative_valid = [negatives.image_for_text_valid[pick], negative_text_valid]
  if written is not None and weights.itm_written_negatives == 'add':
    pair_text.append(written_tokens)
    pair_mask.append(written_mask)
    pair_image.append(own_image)
    negative_valid.append(written_valid)
  groups = len(pair_text)
  if swaps is not None:
    pair_text.append(swaps.tokens[pick].astype(text_tokens.dtype))
    pair_mask.append(swaps.mask[pick])
    pair_image.append(own_image)
  # The third group's texts are drawn in this step: the loop cannot check them against the length buckets.
  logits, fits = _match_groups(module, weights, pair_text, pair_mask, pair_image, image_tokens, drawn=2)
  size = own_image.shape[0]
  itm, metrics = losses.matching_loss(logits[:size], logits[size:groups * size], jnp.concatenate(negative_valid))
  relation = jnp.zeros((), jnp.float32)
  if swaps is not None:
    swap_valid = swaps.valid[pick]
    relation, _ = losses.matching_loss(logits[:size], logits[groups * size:], swap_valid, swap_valid)
    metrics['relation_loss'] = relation
    # How often the swap's match margin falls below its caption's: the binding split's criterion on relations.
    margin = lambda rows: (rows[:, 1] - rows[:, 0]).astype(jnp.float32)
    ahead = (margin(logits[:size]) > margin(logits[groups * size:])) & swap_valid
    metrics['relation_pair_acc'] = jnp.sum(ahead) / jnp.maximum(jnp.sum(swap_valid), 1)
  metrics['itm_hardness'] = hardness
  metrics['length_buckets_fit'] = fits
  if written is not None:
    # How often the written negatives (the binding the test measures) are told apart: rows 2n..3n or 3n..4n.
    rows = logits[(2 if weights.itm_written_negatives == 'replace' else 3) * size:][:size]
    shown = use[:, 0, 0] if weights.itm_written_negatives == 'replace' else written_valid
    correct = (jnp.argmax(rows, axis=-1) == 0) & shown
    metrics['itm_written_acc'] = jnp.sum(correct) / jnp.maximum(jnp.sum(shown), 1)
  return itm, relation, metrics


def _match_groups(module: XModal, weights: LossWeights, texts: list[jax.Array], masks: list[jax.Array],
                  images: list[jax.Array], image_tokens: jax.Array, drawn: int) -> tuple[jax.Array, jax.Array]:
  """ITM logits (G n, 2) of G groups of n pairs: texts[g] (n, L, Dt) with masks[g] (n, L) against the images of
  `image_tokens` (B, N, Dv) that images[g] (n,) name. With weights.length_buckets, group `drawn` (texts the step drew
  itself) runs at full length in a call of its own and the others bucketed by length; returns (logits, whether the
  buckets fit)."""
  calls = [list(range(len(texts)))]
  if weights.length_buckets:
    calls = [[g for g in calls[0] if g != drawn], [drawn]]
  logits, fits = [None] * len(texts), jnp.bool_(True)
  for groups, plan in zip(calls, (weights.length_buckets, ())):
    text, mask = jnp.concatenate([texts[g] for g in groups]), jnp.concatenate([masks[g] for g in groups])
    rows = jnp.concatenate([images[g] for g in groups])
    if text.shape[0] > image_tokens.shape[0]:
      # More pairs than images: the fusion encoder projects each image's keys and values once and gathers them for
      # the pairs (flops.fusion_image_passes).
      match = lambda mdl, m, tok, row, shared: ([], [mdl.match(tok[0], m, shared[0], image_index=row[0])])
      ((), (out,)), fit = buckets.apply_by_length(module, match, mask, [text], [rows], [image_tokens], plan)
    else:  # no more pairs than images: projecting the pairs' own copies is less work
      match = lambda mdl, m, tok, row, shared: ([], [mdl.match(tok[0], m, row[0])])
      ((), (out,)), fit = buckets.apply_by_length(module, match, mask, [text], [image_tokens[rows]], [], plan)
    fits &= fit
    for g, part in zip(groups, jnp.split(out, len(groups))):
      logits[g] = part
  return jnp.concatenate(logits), fits


def compute_loss(model: XModal, params, batch: dict[str, jax.Array], rng: jax.Array, weights: LossWeights,
                 step: jax.Array | None = None, teacher: Teacher | None = None,
                 queue: losses.QueuedKeys | None = None, embedding_grads: EmbeddingGrads | None = None
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted ITC + ITM (+ sigmoid, MLM) loss of a batch.

  Args:
    model: the XModal module.
    params: its parameters (boxed or plain).
    batch: {'images' (B, H, W, 3) float, 'text_ids' (B, L) int, 'text_mask' (B, L), 'image_ids' (B,) optional,
      and optionally the data's written negatives 'negative_ids' (B, L), 'negative_mask' (B, L),
      'negative_valid' (B,) bool, and regions 'region_boxes' (B, R, 4), 'region_ids' / 'region_mask' (B, R, Lp),
      'region_valid' (B, R) bool (needed when weights.region > 0)}.
    rng: PRNG key for the hard-negative sampling.
    weights: loss weights.
    step: the training step, for the ITM negatives' hardness schedule (None = fully hard) and the distillation ramp
      (None = full alpha).
    teacher: the momentum model's `momentum_outputs` on this batch and rng, when weights.momentum > 0: ITC is then
      ALBEF's, against its embeddings (and `queue`'s), and distils from it with weights.distillation(step).
    queue: the momentum model's embeddings of past batches (`FeatureQueue.keys()`), or None.
    embedding_grads: gradient caching's cotangents of this batch's embeddings (train/step.py, 'exact'
      accumulation): ITC and the sigmoid loss are then not computed here; the returned value is ITM + MLM plus
      sum(g * embedding), whose gradient carries the whole batch's contrastive gradient into the parameters, and
      metrics['loss'] is ITM + MLM alone.

  Returns:
    (scalar loss, metrics dict of scalars).
  """
  if (teacher is None) != (weights.momentum <= 0) or (queue is not None and teacher is None):
    raise ValueError(f'weights.momentum={weights.momentum} needs the teacher exactly when > 0 (and the queue only '
                     f'with it); got teacher={teacher is not None}, queue={queue is not None}')
  return model.apply({'params': params}, batch, rng, weights, step, teacher, queue, embedding_grads, method=_losses)


def _embed(module: XModal, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  return module.encode_image(batch['images'])[1], module.encode_text(batch['text_ids'], batch['text_mask'])[1]


def embed(model: XModal, params, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """The towers' embeddings of a batch, image and text (B, E) float32 unit norm: exactly what `compute_loss` scores
  with ITC (the model has no dropout, so a second forward pass gives the same values)."""
  return model.apply({'params': params}, batch, method=_embed)


def contrastive_loss_of_embeddings(model: XModal, params, image_emb: jax.Array, text_emb: jax.Array,
                                   ids: jax.Array | None, weights: LossWeights
                                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`compute_loss`'s weighted ITC (+ sigmoid) part, of given embeddings (B, E): what gradient caching takes over
  the whole batch. `params` supplies the temperature (and the sigmoid's scale and bias); differentiate with respect
  to them and to the embeddings. Neither the momentum form nor written-negative columns: the step refuses those."""
  if weights.momentum > 0 or weights.itc_written_negatives:
    raise ValueError('the contrastive loss of cached embeddings has neither the momentum form nor written-negative '
                     'columns')
  return model.apply({'params': params}, image_emb, text_emb, ids, weights, method=_contrastive)
