"""Paired unit embeddings for the loss tests: texts are noisy copies of their images."""

import numpy as np


def unit(x: np.ndarray) -> np.ndarray:
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def embedding_batch(seed: int, size: int = 8, dim: int = 16, ids: bool = True, id_groups: int = 2):
  """(image (size, dim), text (size, dim)) float32 unit rows, and image ids drawn from size // id_groups values."""
  rng = np.random.default_rng(seed)
  image = unit(rng.normal(size=(size, dim))).astype(np.float32)
  text = unit(image + 0.7 * rng.normal(size=(size, dim))).astype(np.float32)
  image_ids = rng.integers(0, size // id_groups, size=size) if ids else None
  return image, text, image_ids
