"""The training objective: ITC (+ optional sigmoid ITC) and ITM on hard negatives, as one pure function.

ITM reuses the tower outputs of the ITC pass: the hard negatives are gathered from the tokens already computed, and
only the fusion encoder runs again, on 3B pairs (B positives, B texts with a negative image, B images with a negative
text).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from xmodal import losses, losses_chunked
from xmodal.models.model import XModal


@dataclasses.dataclass(frozen=True)
class LossWeights:
  itc: float = 1.0
  itm: float = 1.0
  sigmoid: float = 0.0
  chunked: bool = False  # ring form of the contrastive losses (xmodal/losses_chunked.py)
  # Steps over which ITM's negatives go from uniform (over the non-positives) to ALBEF's softmax(similarity); 0 =
  # hard from the start. Hard negatives chosen by a still-random ITC are the hardest pairs there are, and a fusion
  # encoder trained from scratch on them alone stays at the prior (see README "Shapes run").
  itm_hard_warmup: int = 0

  @classmethod
  def from_config(cls, loss: ml_collections.ConfigDict) -> LossWeights:
    return cls(itc=float(loss.itc_weight), itm=float(loss.itm_weight), sigmoid=float(loss.sigmoid_weight),
               chunked=bool(loss.chunked), itm_hard_warmup=int(loss.itm_hard_warmup_steps))

  def negative_hardness(self, step: jax.Array | None) -> jax.Array:
    """1 = ALBEF's hard negatives, 0 = uniform ones; rises linearly over `itm_hard_warmup` steps."""
    if self.itm_hard_warmup <= 0 or step is None:
      return jnp.ones((), jnp.float32)
    return jnp.clip(jnp.asarray(step, jnp.float32) / self.itm_hard_warmup, 0.0, 1.0)


def _losses(module: XModal, batch: dict[str, jax.Array], rng: jax.Array, weights: LossWeights,
            step: jax.Array | None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Runs inside `model.apply`: `module` is the bound XModal."""
  ids = batch.get('image_ids')
  image_tokens, image_emb = module.encode_image(batch['images'])
  text_tokens, text_emb = module.encode_text(batch['text_ids'], batch['text_mask'])
  temperature = module.temperature()
  metrics = {'temperature': temperature}
  total = jnp.zeros((), jnp.float32)

  contrastive = losses_chunked.contrastive_loss if weights.chunked else losses.contrastive_loss
  itc, itc_metrics = contrastive(image_emb, text_emb, temperature, ids)
  metrics.update(itc_metrics)
  total += weights.itc * itc

  if weights.sigmoid > 0:
    scale, bias = module.sigmoid_params()
    sigmoid = losses_chunked.sigmoid_loss if weights.chunked else losses.sigmoid_loss
    sig, sig_metrics = sigmoid(image_emb, text_emb, scale, bias, ids)
    metrics.update(sig_metrics)
    total += weights.sigmoid * sig

  if weights.itm > 0:
    hardness = weights.negative_hardness(step)
    sim = jnp.einsum('ie,te->it', image_emb, text_emb) / temperature
    negatives = losses.sample_hard_negatives(rng, sim, ids, hardness)
    metrics['itm_hardness'] = hardness
    text_mask = batch['text_mask']
    # Rows: B positives, then B texts with their negative image, then B images with their negative text.
    pair_text = jnp.concatenate([text_tokens, text_tokens, text_tokens[negatives.text_for_image]])
    pair_mask = jnp.concatenate([text_mask, text_mask, text_mask[negatives.text_for_image]])
    pair_image = jnp.concatenate([image_tokens, image_tokens[negatives.image_for_text], image_tokens])
    logits = module.match(pair_text, pair_mask, pair_image)
    size = image_emb.shape[0]
    negative_valid = jnp.concatenate([negatives.image_for_text_valid, negatives.text_for_image_valid])
    itm, itm_metrics = losses.matching_loss(logits[:size], logits[size:], negative_valid)
    metrics.update(itm_metrics)
    total += weights.itm * itm

  metrics['loss'] = total
  return total, metrics


def compute_loss(model: XModal, params, batch: dict[str, jax.Array], rng: jax.Array, weights: LossWeights,
                 step: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted ITC + ITM (+ sigmoid) loss of a batch.

  Args:
    model: the XModal module.
    params: its parameters (boxed or plain).
    batch: {'images' (B, H, W, 3) float, 'text_ids' (B, L) int, 'text_mask' (B, L), 'image_ids' (B,) optional}.
    rng: PRNG key for the hard-negative sampling.
    weights: loss weights.
    step: the training step, for the ITM negatives' hardness schedule (None = fully hard).

  Returns:
    (scalar loss, metrics dict of scalars).
  """
  return model.apply({'params': params}, batch, rng, weights, step, method=_losses)
