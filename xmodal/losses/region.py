"""Region-phrase alignment (X-VLM's box-text contrast): each annotated region of an image, pooled from the patch
tokens under its box (`XModal.embed_regions`), against the phrase that names it, InfoNCE over every region of the
batch. And where each phrase is (X-VLM's box prediction, per token): the fusion encoder's Locator against the centre
of the phrase's box.

ITC pools a whole image into one vector, and with it a small object's shape is a few patches among sixty; a region
term tells the image tower what each object is where it is, and the text tower what each phrase names, which is
what the fusion encoder needs to bind "red" to the circle (docs/shapes_recipe.md, "Regions").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xmodal.losses.contrastive import ABSENT, accuracy, soft_cross_entropy


def region_phrase_loss(region_emb: jax.Array, phrase_emb: jax.Array, phrase_ids: jax.Array, valid: jax.Array,
                       temperature: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Symmetric InfoNCE between M regions and their phrases, over the valid ones.

  Args:
    region_emb: (M, E) unit-norm region embeddings.
    phrase_emb: (M, E) unit-norm phrase embeddings; row m names region m.
    phrase_ids: (M, L) the phrases' token ids: regions whose phrases are the same tokens are positives of each other
      (two red circles in a batch), and the targets are spread evenly over them, as ITC's over shared image ids.
    valid: (M,) bool; False rows (padding) are neither rows nor columns.
    temperature: scalar; logits are cosine similarities divided by it.

  Returns:
    (loss, metrics) with 'region_loss' and 'region_acc' (share of valid regions whose best phrase is a positive).
  """
  logits = jnp.einsum('me,ne->mn', region_emb.astype(jnp.float32), phrase_emb.astype(jnp.float32)) / temperature
  pair = valid[:, None] & valid[None, :]
  positive = jnp.all(phrase_ids[:, None, :] == phrase_ids[None, :, :], axis=-1) & pair
  positive = positive | jnp.diag(~valid)  # an invalid row targets itself; it is weighted out below
  targets = positive / jnp.sum(positive, axis=-1, keepdims=True)
  logits = jnp.where(pair | jnp.eye(logits.shape[0], dtype=bool), logits, ABSENT)
  weight = valid.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(weight), 1.0)
  per_row = lambda x, t: soft_cross_entropy(x, t, reduce=False)
  loss = 0.5 * jnp.sum((per_row(logits, targets) + per_row(logits.T, targets.T)) * weight) / count
  acc = jnp.sum(accuracy(logits, positive, reduce=False) * weight) / count
  return loss, {'region_loss': loss, 'region_acc': acc}


def locate_loss(positions: jax.Array, centres: jax.Array, weight: jax.Array
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Squared distance between each token's predicted place and its region's centre, averaged over the weighted
  tokens.

  Args:
    positions: (M, L, 2) predicted (x, y) per token (`XModal.locate`).
    centres: (M, L, 2) the centre of the region each token names, in the same frame (`regions.box_centres`).
    weight: (M, L) 1 on the tokens that name a region (a region phrase's real tokens, [CLS] and [SEP] included: a
      phrase alone names one object; a caption's grounded words), 0 elsewhere (padding, ungrounded words).

  Returns:
    (loss, metrics) with 'locate_loss' and 'locate_error' (the root of the mean squared distance, in image sides).
  """
  weight = weight.astype(jnp.float32)
  squared = jnp.sum((positions.astype(jnp.float32) - centres.astype(jnp.float32)) ** 2, axis=-1)
  loss = jnp.sum(squared * weight) / jnp.maximum(jnp.sum(weight), 1.0)
  return loss, {'locate_loss': loss, 'locate_error': jnp.sqrt(loss)}
