"""Public checkpoints in and out: BERT into the text tower and fusion layers, ViT/DeiT/timm into the image tower.

  params, report = load_pretrained(params, config.model, config.init.text, config.init.image,
                                   config.init.expected_unused)
  logging.info(report.summary())
  text_to_hf(params, config.model, 'out/bert')          # and back out, as a BertModel (image_to_hf: a ViTModel)

Imports neither torch nor transformers: safetensors is read with its numpy API; a pytorch_model.bin pickle needs
torch, imported only when such a file is read.
"""

from xmodal.pretrained.common import CheckpointError, find_tokenizer, read_checkpoint
from xmodal.pretrained.load import LoadReport, config_overrides, load_pretrained
from xmodal.pretrained.to_hf import image_to_hf, text_to_hf
