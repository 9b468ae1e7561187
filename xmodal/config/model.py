"""Model sizes in one table, and the model config they fill.

`base` is ALBEF's: ViT-B/16 + BERT-base whose 12 layers are split into 6 text and 6 fusion layers, embedding 256.
The tower layouts follow the public checkpoints (ViT/DeiT, BERT) so that their weights load without surgery.
"""

from __future__ import annotations

import dataclasses

import ml_collections


@dataclasses.dataclass(frozen=True)
class Tower:
  width: int
  depth: int
  heads: int
  mlp_dim: int


@dataclasses.dataclass(frozen=True)
class Preset:
  vision: Tower
  patch_size: int
  image_size: int
  text: Tower  # depth = text layers only; the fusion layers come on top
  fusion_depth: int
  embed_dim: int
  vocab_size: int = 30522  # bert-base-uncased
  max_positions: int = 512
  max_text_len: int = 30  # ALBEF's caption length
  # What the backward pass may keep of each layer (see `remat` in model_config). Keeping only matmul outputs and
  # recomputing the elementwise ops was faster than keeping everything on both machines measured
  # (docs/performance.md): 'dots' for bench_cpu on the 2-core CPU (0.85x the step time of 'none'), 'dots_no_batch' for
  # `base` on an H100 (0.89x, and 2.7x less memory).
  remat: str = 'dots_no_batch'


PRESETS: dict[str, Preset] = {
    # A few M parameters: CPU tests and the embedded shapes run.
    'tiny': Preset(vision=Tower(128, 4, 4, 512), patch_size=8, image_size=64,
                   text=Tower(128, 2, 4, 512), fusion_depth=2, embed_dim=128, vocab_size=1024,
                   max_positions=64, max_text_len=32, remat='dots'),
    # ViT-S/16 + a 4+4-layer BERT of width 512.
    'small': Preset(vision=Tower(384, 12, 6, 1536), patch_size=16, image_size=224,
                    text=Tower(512, 4, 8, 2048), fusion_depth=4, embed_dim=256),
    # ALBEF: ViT-B/16 + BERT-base (6 text + 6 fusion layers).
    'base': Preset(vision=Tower(768, 12, 12, 3072), patch_size=16, image_size=256,
                   text=Tower(768, 6, 12, 3072), fusion_depth=6, embed_dim=256),
    # ViT-L/16 + BERT-large (12 text + 12 fusion layers).
    'large': Preset(vision=Tower(1024, 24, 16, 4096), patch_size=16, image_size=256,
                    text=Tower(1024, 12, 16, 4096), fusion_depth=12, embed_dim=256),
}


def model_config(size: str = 'tiny') -> ml_collections.ConfigDict:
  """The full model config of a preset; every field can then be overridden on its own.

  The preset's name is not a field: it is chosen where the config is made (`configs/shapes.py:size=small`), and a
  `model.size` override that changed nothing would only mislead.
  """
  if size not in PRESETS:
    raise ValueError(f'unknown model size {size!r}; valid: {sorted(PRESETS)}')
  p = PRESETS[size]
  return ml_collections.ConfigDict({
      'image_size': p.image_size,
      'vision': {'width': p.vision.width, 'depth': p.vision.depth, 'heads': p.vision.heads,
                 'mlp_dim': p.vision.mlp_dim, 'patch_size': p.patch_size, 'layer_norm_eps': 1e-6,
                 # Initial position embeddings: 'normal' (std 0.02, ViT) or 'sincos2d' (the patch grid's 2D
                 # sine-cosine code; still learned). A pretrained checkpoint overwrites either.
                 'posemb_init': 'normal',
                 # 'patch' (ViT's linear patchify, what pretrained checkpoints hold) or 'conv' (3x3 stride-2
                 # convolutions to the same token grid, the hybrid ViT: learns shapes from scratch far sooner).
                 'stem': 'patch',
                 # LayerScale (CaiT) of the blocks' branches, initial value; 0 = none (ViT/DeiT checkpoints).
                 'layer_scale_init': 0.0},
      'text': {'width': p.text.width, 'depth': p.text.depth, 'heads': p.text.heads, 'mlp_dim': p.text.mlp_dim,
               'vocab_size': p.vocab_size, 'max_positions': p.max_positions, 'type_vocab_size': 2,
               'layer_norm_eps': 1e-12},
      'fusion_depth': p.fusion_depth,
      'embed_dim': p.embed_dim,
      'max_text_len': p.max_text_len,
      'temperature_init': 0.07,
      # What ITC embeds: 'cls' (the [CLS] token, ALBEF) or 'mean' (the mean of the tokens; of the real ones for
      # text). From scratch, the mean carries every word and patch from step 0, while [CLS] starts the same for all
      # inputs and learns the easiest attribute first (docs/shapes_recipe.md). 'mean_fc_norm': for images the
      # patch tokens' mean before the final LayerNorm, then a LayerNorm of its own (timm's avg pool + fc_norm), so
      # that a few object patches are not drowned by many normalised background ones; for text the mean. 'max': for
      # images the channel-wise max of the patch tokens, which keeps what the patches under a small object say
      # whatever the background (a mean dilutes it 60-fold); for text the mean.
      'pool': 'cls',
      # Compute dtype of matmuls; parameters and optimizer state stay float32.
      'dtype': 'float32',
      # 'xla' runs everywhere; 'cudnn' is the fused flash kernel on NVIDIA GPUs.
      'attention': 'xla',
      # Rematerialisation of each layer: 'none', 'full', 'dots' or 'dots_no_batch' (what the backward may keep).
      'remat': p.remat,
      # nn.scan over layers: compile time flat in depth.
      'scan_layers': True,
      # BERT's masked-token prediction head on the fusion encoder (needed by loss.mlm_weight > 0).
      'mlm_head': False,
      # The fusion encoder's initial kernels: 'bert' (std 0.02, as a pretrained checkpoint has them) or 'lecun'
      # (std 1/sqrt(fan_in)). From scratch, ITM's loss leaves its prior sooner with 'lecun' (step 120 against 300 on
      # the shapes data), but binding did not follow (docs/shapes_recipe.md, runs T1 and T2).
      'fusion_init': 'bert',
      # How many preceding text tokens a dense layer mixes into each token at the fusion encoder's input (0: none,
      # as ALBEF). A noun then carries its adjectives into cross-attention, and ITM learns which colour goes with
      # which shape hundreds of steps sooner (docs/shapes_recipe.md, "A word window").
      'fusion_word_window': 0,
      # A Locator before the fusion layers: each text token enters with the place of the object it names, as two
      # numbers, and cross-attention reads where it looked. Trained by loss.locate_weight. In a probe, relations
      # ("left of") needed it; the shapes default does not use it (docs/shapes_recipe.md, "Relations need places").
      'fusion_locator': False,
  })
