"""xmodal: image-text retrieval with cross-modal attention (ALBEF/BLIP family) in JAX/Flax."""

__version__ = '0.1.0'
