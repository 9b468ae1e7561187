"""The embedded default: a `tiny` model on the procedurally rendered `xmodal_shapes` dataset, on a 2-core CPU.

  xmodal train --config configs/shapes.py --workdir workdir/shapes

Renders xmodal_shapes into tfds' data_dir on first use (no download; `--config.data.tfds_data_dir` moves it), trains
for `train.steps` at batch 64, then prints ITC and ITC + ITM re-ranking recalls on the 1,000-image test split and
the attribute-binding accuracy on test_hard. README's "Shapes run" section records what it reaches on this machine.

Arguments (`configs/shapes.py:size=tiny,steps=400`): size — the model preset; steps — training steps.
"""

from xmodal import config as config_lib
from xmodal.defaults import base_config


def get_config(arg=None):
  args = config_lib.parse_arg(arg, {'size': 'tiny', 'steps': 400})
  config = base_config(args.size)
  config.model.update(image_size=64, max_text_len=32)
  config.model.vision.patch_size = 8
  config.model.text.vocab_size = 1024  # the shipped shapes vocabulary (168 entries) fits
  config.data.update(tfds_name='xmodal_shapes', eval_split='test', image_size=64, max_text_len=32, batch_size=64,
                     eval_batch_size=100, tokenizer='shapes')
  # The fusion encoder and ITM head learn at twice the towers' rate, and ITM's negatives go from easy (uniform) to
  # ALBEF's hard ones over the whole run: from scratch and on hard negatives alone, ITM stays at its prior for
  # hundreds of steps (README "Shapes run" has the measurements).
  config.optim.update(lr=5e-4, warmup_steps=min(100, args.steps // 10), weight_decay=0.02,
                      lr_multipliers=(('^(fusion|itm_head)/', 2.0),))
  config.loss.itm_hard_warmup_steps = args.steps
  config.train.update(steps=args.steps, log_every=20, checkpoint_every=200, eval_every=100)
  # Recipes are chosen on validation (curves every train.eval_every steps); test and test_hard are read once, at the
  # end of a run.
  config.eval.update(k=16, chunk_size=256, score='itm', binding_split='test_hard', validation_split='validation',
                     validation_images=500, validation_binding_split='validation_hard')
  return config
