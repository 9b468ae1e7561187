"""ALBEF's recipe: ViT-B/16 + BERT-base (6 text + 6 fusion layers), ITC + ITM with hard negatives, and ALBEF's momentum
model: ITC against a queue of 65,536 momentum embeddings, distilled from the momentum model's similarities.

Fine-tuning for retrieval on COCO captions (tfds), starting from imported towers (DeiT-B/16 and BERT-base, local
directories in Hugging Face layout; see xmodal/pretrained):

  xmodal train --config configs/albef.py:size=base,text_init=/ckpt/bert-base-uncased,image_init=/ckpt/deit-base \\
      --workdir /runs/albef-coco --config.data.tfds_data_dir=/data/tfds

or on image-text shards (WebDataset .tar as img2dataset writes them), with ALBEF's pre-training MLM as well (`mlm=True`):

  xmodal train --config configs/albef.py:data=shards,shards=/data/cc3m/*.tar,mlm=True,text_init=...,image_init=... \\
      --workdir /runs/albef-cc3m

What it aims at: ALBEF (Li et al., 2021, Table 2) reports on the COCO 5k test split, fine-tuned from its 4M-image
pre-training, image→text R@1/5/10 = 73.1/91.4/96.0 and text→image R@1/5/10 = 56.8/81.5/89.2 (14M pre-training:
77.6/94.3/97.2 and 60.7/84.3/90.5). Starting from DeiT + BERT without ALBEF's pre-training expect clearly less; the
numbers are the bar a full pre-train + fine-tune with this recipe should reach. ALBEF trains 5 epochs at batch 256
(32 per GPU on 8 GPUs), AdamW lr 1e-5, weight decay 0.02, cosine, 384 px for fine-tuning; re-ranks k = 256 on COCO.
"""

from xmodal import config as config_lib
from xmodal.config.data import coco_captions_config, data_config
from xmodal.config.defaults import base_config


def get_config(arg=None):
  args = config_lib.parse_arg(arg, {'size': 'base', 'data': 'coco', 'shards': '', 'text_init': '',
                                    'image_init': '', 'res': 384, 'mlm': False})
  config = base_config(args.size)
  config.model.image_size = args.res
  config.model.dtype = 'bfloat16'
  common = dict(image_size=args.res, max_text_len=config.model.max_text_len, batch_size=256, eval_batch_size=256,
                tokenizer=args.text_init or 'bert-base-uncased/vocab.txt', crop_scale=(0.5, 1.0))
  if args.data == 'coco':
    config.data = coco_captions_config(**common)
  elif args.data == 'shards':
    config.data = data_config(source='wds', train_shards=args.shards, **common)
  else:
    raise config_lib.ConfigError(f"config argument data={args.data!r} is not one of ('coco', 'shards')")
  config.init.text, config.init.image = args.text_init, args.image_init
  config.optim.update(lr=1e-5, warmup_steps=1000, weight_decay=0.02)
  epoch = 113_287 // 256  # steps per epoch of COCO's Karpathy train split at batch 256
  config.train.update(steps=5 * epoch, checkpoint_every=2000, eval_every=0, log_every=50)
  config.loss.update(
      momentum=0.995,  # ALBEF's momentum model: m <- 0.995 m + 0.005 p after every step
      queue_size=65_536,  # ALBEF's queue of momentum embeddings: 256 global batches of 256 as ITC's extra negatives
      distill_alpha=0.4,  # ALBEF's targets: 0.4 the momentum model's softmax + 0.6 the ground truth
      distill_warmup_steps=epoch,  # ALBEF ramps alpha from 0 over the first epoch
  )
  if args.mlm:
    # ALBEF's pre-training objective adds MLM through the fusion encoder (15 % of the tokens, weight 1); its retrieval
    # fine-tuning, this config's default, has none. A BertForMaskedLM / BertForPreTraining text_init fills the head
    # from its cls.predictions.
    config.model.mlm_head = True
    config.loss.update(mlm_weight=1.0, mlm_probability=0.15)
  config.eval.update(k=256, score='itm')
  return config
