"""Public checkpoints in and out: BERT into the text tower and fusion layers, ViT/DeiT/timm into the image tower.

  params, report = load_pretrained(params, config.model, config.init.text, config.init.image,
                                   config.init.expected_unused)
  logging.info(report.summary())

Imports neither torch nor transformers: safetensors is read with its numpy API; a pytorch_model.bin pickle needs
torch, imported only when such a file is read.
"""

from xmodal.pretrained.common import CheckpointError, find_tokenizer, read_checkpoint
from xmodal.pretrained.export_hf import export_image, export_text
from xmodal.pretrained.load import LoadReport, config_overrides, load_pretrained
