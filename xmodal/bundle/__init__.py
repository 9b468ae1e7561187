"""Inference bundles: a trained model as files that run without the model code (StableHLO, safetensors, manifest).

  format.py  the layout on disk, safetensors I/O, manifest and checksums: what writer and reader share; no model code,
             so `xmodal.inference` reads bundles with it alone
  export.py  the writer: a config and parameters (or a workdir's checkpoint) → a bundle; needs the model code

This __init__ imports neither, so that importing `xmodal.bundle.format` never loads the model.
"""
