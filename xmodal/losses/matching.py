"""Image-text matching (ITM): ALBEF's hard negatives sampled from the ITC similarity, and the matching loss.

Pure functions of global arrays, like `contrastive.py`: under `jax.jit` with a sharded batch every example still draws
its negatives from the whole global batch.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from xmodal.losses.contrastive import positives


class HardNegatives(NamedTuple):
  """Indices of one hard negative per text and per image, and whether one existed."""
  image_for_text: jax.Array  # (B,) int: for text j, the index of a non-matching image
  text_for_image: jax.Array  # (B,) int: for image i, the index of a non-matching text
  image_for_text_valid: jax.Array  # (B,) bool: False when every image in the batch matches text j
  text_for_image_valid: jax.Array  # (B,) bool


def sample_hard_negatives(rng: jax.Array, sim: jax.Array, ids: jax.Array | None = None,
                          hardness: jax.Array | float = 1.0) -> HardNegatives:
  """Draws ALBEF's hard negatives: probability ∝ softmax(similarity) over the non-positives, never a positive.

  With `hardness` h < 1 the probability is h · softmax + (1 - h) · uniform over the non-positives: a fraction 1 - h
  of the negatives are easy ones, whatever the scale of the similarities.

  Args:
    rng: a PRNG key.
    sim: (B, B) image-text similarity logits (image rows, text columns), e.g. cosine / temperature.
      Gradients do not flow through the sampling.
    ids: (B,) image ids or None (then only the diagonal is positive).
    hardness: scalar in [0, 1]; 1 = ALBEF.

  Returns:
    HardNegatives. A row whose every candidate is a positive has no negative; its index is then arbitrary and its
    `valid` flag False, so that the matching loss can leave it out.
  """
  sim = jax.lax.stop_gradient(sim.astype(jnp.float32))
  positive = positives(ids, sim.shape[0])
  masked = jnp.where(positive, -jnp.inf, sim)
  negative = (~positive).astype(jnp.float32)

  def logits(axis: int) -> jax.Array:
    # log(h · softmax + (1 - h) · uniform) along `axis`; log 0 = -inf, so a positive is never drawn.
    hard = jax.nn.softmax(masked, axis=axis)
    easy = negative / jnp.maximum(jnp.sum(negative, axis=axis, keepdims=True), 1.0)
    return jnp.log(hardness * hard + (1.0 - hardness) * easy)

  rng_images, rng_texts = jax.random.split(rng)
  image_for_text = jax.random.categorical(rng_images, logits(0).T, axis=-1)  # per text (column), over images
  text_for_image = jax.random.categorical(rng_texts, logits(1), axis=-1)  # per image (row), over texts
  has_negative = ~jnp.all(positive, axis=-1)
  return HardNegatives(image_for_text, text_for_image, has_negative, has_negative)


def matching_loss(positive_logits: jax.Array, negative_logits: jax.Array,
                  negative_valid: jax.Array | None = None, positive_valid: jax.Array | None = None
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """ITM cross-entropy over B positive and 2B negative pairs.

  Args:
    positive_logits: (B, 2) match logits of the true pairs (class 1 = match).
    negative_logits: (2B, 2) match logits of the hard-negative pairs (class 0).
    negative_valid: (2B,) bool, False for negatives that do not exist (left out of the mean); None = all valid.
    positive_valid: (B,) bool, the same for the positives; None = all valid.

  Returns:
    (loss, metrics) with 'itm_loss' and 'itm_acc' (accuracy over the counted pairs).
  """
  if negative_valid is None:
    negative_valid = jnp.ones(negative_logits.shape[:1], bool)
  logits = jnp.concatenate([positive_logits, negative_logits]).astype(jnp.float32)
  labels = jnp.concatenate([jnp.ones(positive_logits.shape[:1], jnp.int32),
                            jnp.zeros(negative_logits.shape[:1], jnp.int32)])
  if positive_valid is None:
    positive_valid = jnp.ones(positive_logits.shape[:1], bool)
  weights = jnp.concatenate([positive_valid, negative_valid]).astype(jnp.float32)
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[:, None], axis=-1)[:, 0]
  count = jnp.maximum(jnp.sum(weights), 1.0)
  loss = jnp.sum(nll * weights) / count
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  return loss, {'itm_loss': loss, 'itm_acc': jnp.sum(correct * weights) / count}
