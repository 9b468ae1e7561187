"""Flax (linen) models: ViT image tower, BERT-style text tower, fusion encoder, and XModal that joins them; flops.py
counts their FLOPs."""

from xmodal.models.model import ModelSpec, XModal, build, dummy_inputs
