"""Why a pair matched: for each text token, a heatmap over the image's patches from the fusion encoder's
cross-attention.

Two maps per cross-attention layer (the Locator's first, then the fusion layers'):

- 'attention': the layer's attention weights from each text token to each patch, averaged over heads;
- 'gradcam': ALBEF's Grad-CAM (its visualisation notebook, and what its issues point users to): the weights times
  their positive gradients of the ITM "match" logit, averaged over heads. It keeps what the match relied on.

The gradient with respect to the weights is taken through flax's `perturb`: the explaining cross-attention adds a
zero 'perturbations' variable to its weights, and the gradient of the logit with respect to that variable is the
gradient with respect to the weights. The Locator's weights reach the logit only through a stop-gradient (its places
are trained by the locate loss alone), so its Grad-CAM map is zero; its attention map is what the locate loss taught
it to look at.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xmodal.models import fusion
from xmodal.models.layers import EXPLAIN_NAME
from xmodal.models.model import XModal

METHODS = ('attention', 'gradcam')  # the order of `explain`'s maps on its method axis


def explain(model: XModal, params, text_tokens: jax.Array, text_mask: jax.Array,
            image_tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Heatmaps of B (text, image) pairs.

  Args:
    model: the XModal module.
    params: its parameters (unboxed or boxed).
    text_tokens: (B, L, Dt) from `encode_text`.
    text_mask: (B, L).
    image_tokens: (B, 1+N, Dv) from `encode_image` ([CLS] first, then the N patches row by row).

  Returns:
    maps (B, len(METHODS), K, L, N) float32 over the N patches (the image's [CLS] token left out), K the number of
    cross-attention layers (the Locator's first); the ITM logit of "match" (B,) float32.
  """
  inputs = (text_tokens, text_mask, image_tokens)

  def run(variables, mutable):
    return model.apply(variables, *inputs, method=XModal.match_explained, mutable=mutable)

  shapes = jax.eval_shape(lambda: run({'params': params}, ['perturbations', 'intermediates'])[1]['perturbations'])
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def match_logit(perturbations):
    logits, state = run({'params': params, 'perturbations': perturbations}, ['intermediates'])
    return jnp.sum(logits[:, 1]), (logits[:, 1], state['intermediates'])

  gradients, (logit, intermediates) = jax.grad(match_logit, has_aux=True)(zeros)
  # `sow` keeps a tuple of the values of each call (one here).
  weights = [b['cross_attn'][EXPLAIN_NAME][0] for b in fusion.cross_attention_blocks(intermediates['fusion'])]
  grads = [b['cross_attn'][EXPLAIN_NAME] for b in fusion.cross_attention_blocks(gradients['fusion'])]
  attention = jnp.stack([w.mean(axis=1) for w in weights], axis=1)  # (B, K, L, 1+N)
  gradcam = jnp.stack([(w * jax.nn.relu(g)).mean(axis=1) for w, g in zip(weights, grads)], axis=1)
  return jnp.stack([attention, gradcam], axis=1)[..., 1:], logit
