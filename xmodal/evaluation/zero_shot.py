"""Zero-shot classification: one text embedding per class from prompt templates, then nearest class by ITC."""

from __future__ import annotations

import jax
import numpy as np

from xmodal.models.model import XModal


def embed_prompts(model: XModal, variables, ids: np.ndarray, mask: np.ndarray, batch_size: int = 256
                  ) -> np.ndarray:
  """Text embeddings of every (class, template) prompt.

  Args:
    model, variables: the XModal module and its variables.
    ids: (K, M, L) int token ids of template m filled with class k's name.
    mask: (K, M, L).
    batch_size: prompts per text-tower call; the last call is padded so that every call has one shape.

  Returns:
    (K, M, E) float32 unit-norm embeddings.
  """
  ids, mask = np.asarray(ids), np.asarray(mask)
  num_classes, num_templates, length = ids.shape
  flat_ids, flat_mask = ids.reshape(-1, length), mask.reshape(-1, length)
  n = flat_ids.shape[0]
  pad = -n % batch_size
  flat_ids = np.pad(flat_ids, ((0, pad), (0, 0)))
  flat_mask = np.pad(flat_mask, ((0, pad), (0, 0)), constant_values=1)  # an all-masked row would be degenerate
  encode = jax.jit(lambda v, i, m: model.apply(v, i, m, method=XModal.encode_text)[1])
  emb = np.concatenate([np.asarray(encode(variables, flat_ids[s:s + batch_size], flat_mask[s:s + batch_size]))
                        for s in range(0, n + pad, batch_size)])[:n]
  return emb.reshape(num_classes, num_templates, -1).astype(np.float32)


def class_embeddings(template_emb: np.ndarray) -> np.ndarray:
  """(K, M, E) template embeddings -> (K, E): each L2-normalised, averaged over templates, renormalised (CLIP)."""
  template_emb = _normalize(np.asarray(template_emb, np.float32))
  return _normalize(template_emb.mean(axis=1))


def zero_shot_accuracy(image_emb: np.ndarray, labels: np.ndarray, class_emb: np.ndarray) -> float:
  """Top-1 accuracy in percent: image_emb (B, E), labels (B,) int, class_emb (K, E) -> float.

  The predicted class is the argmax of cosine similarity; a tie goes to the lower class index (np.argmax).
  """
  logits = _normalize(np.asarray(image_emb, np.float32)) @ np.asarray(class_emb, np.float32).T
  return 100.0 * float(np.mean(np.argmax(logits, axis=1) == np.asarray(labels)))


def _normalize(x: np.ndarray) -> np.ndarray:
  return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + 1e-12)
