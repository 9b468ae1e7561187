"""The full default config: every section and field that an experiment config may change.

Config files under `configs/` start from `base_config(size)` and set what their experiment needs; the command line
then changes single fields (`--config.optim.lr=3e-4`). Unknown fields are errors, so every knob must exist here.
"""

from __future__ import annotations

import ml_collections

from xmodal.models.presets import model_config

# Logical axis → mesh axes. Batch over data and fsdp; parameters sharded over fsdp on their width ('embed') and over
# tensor on heads/mlp/vocab (Megatron-style). The stacked 'layers' axis of scanned parameters is never sharded.
DEFAULT_RULES = (
    ('batch', ('data', 'fsdp')),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('vocab', 'tensor'),
    ('kv', None),
    ('length', None),
    ('layers', None),
)


def base_config(size: str = 'tiny') -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = model_config(size)
  config.loss = ml_collections.ConfigDict({
      'itc_weight': 1.0,
      'itm_weight': 1.0,
      # SigLIP's sigmoid form of ITC, added with this weight (0 = off).
      'sigmoid_weight': 0.0,
  })
  config.mesh = ml_collections.ConfigDict({
      # Sizes of the ('data', 'fsdp', 'tensor') axes; -1 takes the devices that are left.
      'shape': (-1, 1, 1),
      'rules': DEFAULT_RULES,
  })
  return config
