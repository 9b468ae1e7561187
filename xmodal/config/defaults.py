"""The full default config: every section and field that an experiment config may change.

Config files under `configs/` start from `base_config(size)` and set what their experiment needs; the command line
then changes single fields (`--config.optim.lr=3e-4`). Unknown fields are errors, so every knob must exist here.
"""

from __future__ import annotations

import ml_collections

from xmodal.config.data import data_config
from xmodal.config.model import model_config
from xmodal.sharding import DEFAULT_RULES


def base_config(size: str = 'tiny') -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = model_config(size)
  config.loss = ml_collections.ConfigDict({
      'itc_weight': 1.0,
      'itm_weight': 1.0,
      # SigLIP's sigmoid form of ITC, added with this weight (0 = off).
      'sigmoid_weight': 0.0,
      # ITM negatives: uniform at step 0, ALBEF's hard (∝ softmax of ITC similarity) from this step on; 0 = hard
      # throughout (ALBEF, which starts from pretrained towers).
      'itm_hard_warmup_steps': 0,
      # ITM (and the relation term) count from this step on; the parameters only they train (the fusion layers, ITM
      # head, ...) start then, fresh, on an AdamW of their own on towers (and a Locator) that have learned for this
      # many steps, and the steps before it skip the fusion encoder. 0 = from the start. Not with MLM.
      'itm_start_step': 0,
      # ITM's use of the negatives the data writes (data.negatives_key): 'off', 'replace' (each image's negative
      # text is its written one where it has one; 3B pairs) or 'add' (B more pairs; 4B).
      'itm_written_negatives': 'off',
      # ITM pairs from every k-th example (1 = all, ALBEF): fusion cost / k; ITC and the negatives' candidates keep
      # the whole batch.
      'itm_subsample': 1,
      # ITC's image-to-text softmax also sees the written negatives as columns (NegCLIP; needs data.negatives_key,
      # not with `chunked`).
      'itc_written_negatives': False,
      # MLM (ALBEF, BERT): the fusion encoder predicts the caption's masked words from the rest and the image; needs
      # model.mlm_head. `mlm_probability` of the word tokens are chosen (80 % [MASK], 10 % random, 10 % kept).
      'mlm_weight': 0.0,
      'mlm_probability': 0.15,
      # ITC / sigmoid ITC as a ring over the batch axes (xmodal/losses/ring.py): same values, memory per device
      # linear in the local batch. (ITM's hard-negative sampling still forms the (B, B) similarity.)
      'chunked': False,
      # ALBEF's momentum model (xmodal/train/momentum.py): a moving average of the parameters, m <- mu m + (1 - mu) p
      # after each update, with mu this (ALBEF 0.995; 0 = off). When on, ITC scores each embedding against the
      # momentum model's embeddings of the other modality (not with `chunked` or `itc_written_negatives`).
      'momentum': 0.0,
      # Queues of the momentum model's image and text embeddings and image ids: the last queue_size / B global
      # batches become ITC's extra negatives (a queued copy of the same image is a positive). A multiple of
      # data.batch_size; ALBEF 65536; 0 = none. Needs `momentum`.
      'queue_size': 0,
      # ITC's targets become alpha softmax(momentum similarities) + (1 - alpha) ground truth, and with MLM on its
      # loss (1 - alpha) cross-entropy + alpha cross-entropy against the momentum model's predictions. ALBEF 0.4;
      # 0 = off. Needs `momentum`.
      'distill_alpha': 0.0,
      # alpha rises linearly from 0 over these steps (ALBEF: the first epoch); 0 = full alpha from the start.
      'distill_warmup_steps': 0,
      # Region-phrase alignment (X-VLM's box-text contrast, xmodal/losses/region.py), added with this weight: each
      # region the data annotates (data.region_boxes_key), max-pooled from the patch tokens under its box, against
      # the phrase naming it (data.region_phrases_key). 0 = off.
      'region_weight': 0.0,
      # Where each region's phrase is: the fusion encoder's Locator (model.fusion_locator) reads the phrase against
      # its image and is trained, with this weight, towards the centre of the region's box (X-VLM's box prediction,
      # per token; xmodal/losses/region.py); with data.caption_grounding, each caption word that names a region
      # too. 0 = off.
      'locate_weight': 0.0,
      # ITM on relation swaps (data.relation_swaps), added with this weight: each image whose caption states a
      # relation, scored with its caption (match) and the caption's related phrases exchanged (no match), a
      # balanced pair whose only difference is which object stands where. 0 = off.
      'relation_weight': 0.0,
      # The step computes each text at about its real length (models/buckets.py): ((share, length), ...) says that
      # the shortest `share` of a step's texts (sorted by length; the text tower's and ITM's fusion pairs' each) run
      # at `length` tokens, the next share at the next length, the rest at model.max_text_len. A batch the plan does
      # not fit runs a full-length step instead (compiled when first needed). The same numbers up to float
      # rounding; () = every text at max_text_len. Single-process runs only (others run at full length).
      'length_buckets': (),
  })
  config.mesh = ml_collections.ConfigDict({
      # Sizes of the ('data', 'fsdp', 'tensor') axes; -1 takes the devices that are left.
      'shape': (-1, 1, 1),
      'rules': DEFAULT_RULES,
  })
  config.optim = ml_collections.ConfigDict({
      'lr': 1e-4,
      'warmup_steps': 1000,
      'final_lr_ratio': 0.01,  # cosine decays to lr * this at train.steps
      'weight_decay': 0.02,  # ALBEF; not applied to biases, norms, embeddings
      'b1': 0.9,
      'b2': 0.999,
      'eps': 1e-8,
      'clip_norm': 1.0,  # global-norm clipping; 0 = off
      # Ordered (regex over 'a/b/c' parameter paths, multiplier); the first match decides. E.g.
      # (('^vision/', 0.1),) trains the image tower at a tenth of the rate.
      'lr_multipliers': (),
      # Regexes of parameters that do not train, e.g. ('^text/embeddings/',).
      'freeze': (),
  })
  config.train = ml_collections.ConfigDict({
      'steps': 10_000,
      'seed': 0,
      'log_every': 50,
      'checkpoint_every': 1000,
      'keep_checkpoints': 3,
      # Every this many steps, evaluate on eval.validation_split (ITC R@1 both ways, binding, the oracle where the
      # dataset has one) into metrics.jsonl / TensorBoard under 'val/'; 0 = never. The test split (data.eval_split)
      # is read once, at the end.
      'eval_every': 0,
      'grad_accum': 1,  # micro-batches per step (memory falls with it; what ITC sees: grad_accum_mode)
      # 'micro': each micro-batch's ITC sees only its B/grad_accum negatives (cheapest); 'exact': gradient caching,
      # ITC over the whole batch, equal to one large batch's, for a second forward pass of the towers (not with
      # loss.momentum, loss.chunked or loss.itc_written_negatives). ITM and MLM stay per micro-batch in both
      # (xmodal/train/step.py, docs/training.md).
      'grad_accum_mode': 'micro',
      'nan_policy': 'stop',  # 'stop': a non-finite loss ends the run naming the step; 'skip': drop that update
      'compilation_cache_dir': '',  # persistent XLA compilation cache ('' = off)
      'peak_flops_per_device': 0.0,  # for MFU; 0 = from the device table (xmodal/models/flops.py)
      'progress': True,  # tqdm progress bar on process 0
      # XLA options for `xmodal bench`'s compile of the step, (name, value) pairs, e.g. (('xla_cpu_use_onednn', True),)
      'compiler_options': (),
  })
  config.eval = ml_collections.ConfigDict({
      'k': 128,  # ITC candidates re-ranked by ITM per query (ALBEF: 128 Flickr30K, 256 COCO)
      'score': 'itm',  # 'itm' (ALBEF), 'itm+itc' (BLIP) or 'itm+itc_logit' (evaluation/rerank.py)
      'chunk_size': 256,  # (query, candidate) pairs per fusion-encoder call
      'binding_split': '',  # a split of (true, hard negative) caption pairs, e.g. 'test_hard' ('' = none)
      # What train.eval_every evaluates: a split to choose recipes on ('' = none), its first `validation_images`
      # images (0 = all), a binding split beside it ('' = none), and ITC top-`validation_k` re-ranked by ITM
      # (0 = ITC only: re-ranking costs a fusion pass per candidate).
      'validation_split': '',
      'validation_images': 0,
      'validation_binding_split': '',
      'validation_k': 0,
  })
  config.init = ml_collections.ConfigDict({
      'text': '',  # Hugging Face BERT directory for the text tower (and the fusion layers' self-attention/MLP)
      'image': '',  # Hugging Face ViT/DeiT directory or timm state dict for the image tower
      'expected_unused': (),  # regexes of checkpoint tensors that may stay unused beyond the defaults
  })
  config.data = data_config()
  # One value under two names: the input pipeline's image side and text length are the model's (ml_collections
  # references), so an override of either name changes both.
  config.data.image_size = config.model.get_ref('image_size')
  config.data.max_text_len = config.model.get_ref('max_text_len')
  return config
