"""The embedded default: a `tiny` model on the procedurally rendered `xmodal_shapes` dataset, on a 2-core CPU.

  xmodal train --config configs/shapes.py --workdir workdir/shapes

Renders xmodal_shapes into tfds' data_dir on first use (no download; `--config.data.tfds_data_dir` moves it), trains
for `train.steps` at batch 64, then prints ITC and ITC + ITM re-ranking recalls on the 1,000-image test split and
the attribute-binding accuracy on test_hard, and draws WORKDIR/curves.png.

Expected (2-core AMD EPYC with AVX-512, 6 min 2 s: 400 steps of 0.27 s without ITM, 400 of 0.42 s with it): ITC R@1
t2i 43.2, i2t 40.1 (oracle 69.6 / 67.2); ITC+ITM 47.1 / 44.9; binding ITC 48.9, ITM 86.8 (a colour on the wrong object
88.2, only the relation wrong 85.9). An older EPYC rounds differently: 12 min 18 s, ITC+ITM t2i 46.7, binding 95.8.
docs/shapes_recipe.md has how the recipe was chosen.

Arguments (`configs/shapes.py:size=tiny,steps=800`): size — the model preset; steps — training steps.
"""

from xmodal import config as config_lib
from xmodal.config.defaults import base_config

STEPS = 800  # with the evaluation: 6 to 12 minutes on a 2-core CPU (README, "Shapes run"); ITM starts at STEPS // 2


def get_config(arg=None):
  args = config_lib.parse_arg(arg, {'size': 'tiny', 'steps': STEPS})
  config = base_config(args.size)
  # Captions are 22 tokens at most (10.2 on average): 24 keeps every word and pads a quarter of what 32 did. The
  # image embedding is the channel-wise max of the patch tokens: a mean drowns a small object's few patches in ~60
  # of background, a max keeps what its patches say of its shape (shapes_recipe.md, "Regions").
  config.model.update(image_size=64, max_text_len=24, pool='max')
  # A conv stem (3x3 stride-2 convolutions to the 8x8 token grid) with LayerScale learns shapes from scratch; the
  # linear patchify ViT stays at chance on them for hundreds of steps (docs/shapes_recipe.md, the shape probe).
  config.model.vision.update(patch_size=8, posemb_init='sincos2d', stem='conv', layer_scale_init=1e-3)
  config.model.text.vocab_size = 1024  # the shipped shapes vocabulary (168 entries) fits
  # The fusion encoder: each text token enters mixed with the two before it, so "circle" brings "red" into
  # cross-attention (from LeCun-scaled kernels: at BERT's 0.02 from scratch ITM does not leave its prior). Without the
  # window, ITM sat at chance on binding; with it, the colours-swapped half of the binding split goes to 73 %
  # (docs/shapes_recipe.md, "A word window at the fusion encoder's input").
  # The Locator reads each phrase against the image and says where it is; that place enters the fusion encoder with
  # the phrase's words, so "left of" has positions to compare (docs/shapes_recipe.md, "Where each phrase is").
  config.model.update(fusion_word_window=2, fusion_init='lecun', fusion_locator=True)
  # No crop: a crop cuts off objects and relations the caption names. Minimal pairs (training images 2k, 2k+1 one
  # fact apart) share a batch, so colours alone no longer tell the batch's images apart; each caption brings one
  # written negative (a shape, colour, binding or relation broken) for ITC's columns and ITM's negatives.
  # Each object is also a region: its box and the phrase naming it ("a small red circle"), for the region loss.
  config.data.update(tfds_name='xmodal_shapes', eval_split='test', batch_size=64, eval_batch_size=100,
                     tokenizer='shapes', crop_scale=(1.0, 1.0), pairs=True, negatives_key='negative_captions',
                     region_boxes_key='regions/bbox', region_phrases_key='regions/phrase', max_regions=3,
                     max_phrase_len=8, caption_grounding='shapes', relation_swaps='shapes')
  config.optim.update(lr=1e-3, warmup_steps=min(100, args.steps // 10), weight_decay=0.02)
  # ITM on every example: its positive, an ITC-hard negative each way and its caption's written negative, and each
  # caption against its relation swap (the relation term). ITM starts halfway, on towers that already retrieve: the
  # fusion encoder and ITM head start fresh then, with hard negatives from their first step. From step 0, or on
  # negatives ramped from uniform to hard, it learnt colours but never relations (shapes_recipe.md, "Relations in
  # one run"); before the start the step skips the fusion encoder.
  # Region-phrase alignment: each object's patch tokens against its phrase, in-batch, tells the towers what each
  # object is where it is; without it shapes stay at chance in the tokens (validation t2i R@1 +21, shapes_recipe.md).
  # Captions are half padding (12 of 24 tokens on average): the step computes the shortest 5/16 of its texts at 12
  # tokens and the next 6/16 at 16, and the rest at 24 (the shapes step 1.2x; docs/performance.md). Every batch of
  # the default run fits; one that did not would run a full-length step.
  config.loss.update(itm_hard_warmup_steps=0, itm_start_step=args.steps // 2, itc_written_negatives=True,
                     itm_written_negatives='add', itm_subsample=1, region_weight=1.0, locate_weight=1.0,
                     relation_weight=1.0, length_buckets=((0.3125, 12), (0.375, 16)))
  config.train.update(steps=args.steps, log_every=20, checkpoint_every=200, eval_every=100)
  # Recipes are chosen on validation (curves every train.eval_every steps); test and test_hard are read once, at the
  # end of a run.
  # Re-ranking adds ITM's logit to ITC's (cosine / temperature): ITM knows colour binding, ITC knows relations and
  # sizes better, and each counts by its own confidence (validation t2i R@1 +3.6 over ITC, where BLIP's ITM logit +
  # cosine loses 5.7: docs/shapes_recipe.md, "Re-ranking by both logits").
  config.eval.update(k=16, chunk_size=256, score='itm+itc_logit', binding_split='test_hard',
                     validation_split='validation',
                     validation_images=500, validation_binding_split='validation_hard')
  return config
