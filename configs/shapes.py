"""The embedded default: a `tiny` model on the procedurally rendered `xmodal_shapes` dataset, on a 2-core CPU.

  xmodal train --config configs/shapes.py --workdir /tmp/shapes

Arguments (`configs/shapes.py:size=tiny`): size — the model preset.
"""

from xmodal import config as config_lib
from xmodal.defaults import base_config


def get_config(arg=None):
  args = config_lib.parse_arg(arg, {'size': 'tiny'})
  config = base_config(args.size)
  config.model.image_size = 64
  config.model.vision.patch_size = 8
  config.model.max_text_len = 32
  return config
