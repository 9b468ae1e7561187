"""The micro model as a config file, for tests that run `xmodal train` in a subprocess."""

import sys
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from helpers import micro_config  # noqa: E402


def get_config(arg=None):
  del arg
  config = micro_config(batch_size=8)
  config.model.text.vocab_size = 256  # the shipped shapes vocabulary has 168 entries
  config.optim.warmup_steps = 2
  return config
