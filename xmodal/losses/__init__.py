"""Losses as pure functions of arrays; they take embeddings and logits, never a model.

  contrastive.py  ITC: softmax (InfoNCE, shared-id positives, optional written-negative columns), ALBEF's momentum
                  form (momentum keys, a queue of past ones, distilled targets) and sigmoid (SigLIP)
  matching.py     ITM: hard negatives sampled from the ITC similarity, and the matching cross-entropy
  masked_lm.py    MLM: BERT's corruption of the captions, and the cross-entropy at the corrupted positions (optionally
                  distilled from the momentum model's predictions)
  region.py       region-phrase alignment (X-VLM): each annotated region's embedding against the phrase naming it;
                  and where each phrase is, against its box's centre
  ring.py         the ring (`shard_map`) form of both contrastive losses (`loss.chunked`): same values, memory per
                  device linear in the local batch

The package names the single-device functions, e.g. `losses.contrastive_loss`; the ring ones are `losses.ring.*`.
"""

from xmodal.losses.contrastive import (QueuedKeys, contrastive_loss, momentum_contrastive_loss, positives,
                                      sigmoid_loss)
from xmodal.losses.masked_lm import MaskedTokens, mask_tokens, masked_lm_loss, word_positions
from xmodal.losses.matching import HardNegatives, matching_loss, sample_hard_negatives
from xmodal.losses.region import locate_loss, region_phrase_loss
