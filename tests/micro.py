"""A model small enough that compiling its training step stays cheap on a 2-core CPU (shared by several tests)."""

from xmodal.defaults import base_config
from xmodal.models import model_config


def micro_model_config():
  """The tiny preset shrunk further: 32 px images, width 32, two layers per tower."""
  cfg = model_config('tiny')
  cfg.image_size, cfg.max_text_len, cfg.embed_dim, cfg.fusion_depth = 32, 12, 16, 2
  cfg.vision.update(width=32, depth=2, heads=2, mlp_dim=64)
  cfg.text.update(width=32, depth=2, heads=2, mlp_dim=64, vocab_size=64, max_positions=16)
  return cfg


def micro_config(batch_size: int = 16):
  """A full experiment config around the micro model."""
  config = base_config('tiny')
  config.model = micro_model_config()
  config.data.image_size, config.data.max_text_len, config.data.batch_size = 32, 12, batch_size
  config.optim.warmup_steps = 2
  config.train.steps = 4
  return config
