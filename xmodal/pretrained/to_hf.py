"""XModal's towers as Hugging Face directories: the text tower as a BertModel, the image tower as a ViTModel.

The same `Rule`s as the loader run backwards, so loading what this writes gives back the same parameters and writing
what was loaded gives back the same tensors. What has no place in a BertModel or ViTModel is not written: the fusion
layers' cross-attention, the projections, the ITM head and the temperature (the whole model goes into an inference
bundle: xmodal.bundle.export). HF's poolers are not written either; `from_pretrained` initialises them afresh and says
so.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any

import ml_collections
import numpy as np
import safetensors.numpy

from xmodal.models.model import ModelSpec
from xmodal.pretrained import bert, vit
from xmodal.pretrained.params import ParamTree
from xmodal.pretrained.rules import Rule

PyTree = Any


def text_to_hf(params: PyTree, model_config: ml_collections.ConfigDict | ModelSpec, out_dir: str | pathlib.Path,
                *, include_fusion: bool = True, tokenizer: str | pathlib.Path | None = None) -> pathlib.Path:
  """Writes the text tower as a BertModel directory (config.json, model.safetensors[, tokenizer file]).

  Args:
    params: XModal variables or parameters (scanned or not, boxed or not).
    model_config: the config's `model` section (or its ModelSpec).
    out_dir: the directory to write (created if needed).
    include_fusion: also write the fusion layers' self-attention and MLP as BERT layers T .. T+F-1 (ALBEF's
      layout), giving a (T + F)-layer BERT; without, a T-layer BERT of the text tower alone.
    tokenizer: a tokenizer file (vocab.txt, tokenizer.json) to copy beside the weights.

  Returns:
    `out_dir`.
  """
  spec = _spec(model_config)
  num_layers = spec.text.depth + (spec.fusion_depth if include_fusion else 0)
  out = _write(ParamTree(params), bert.rules(spec, num_layers), bert.hf_config(spec, num_layers), out_dir)
  if tokenizer:
    shutil.copy(tokenizer, out / pathlib.Path(tokenizer).name)
  return out


def image_to_hf(params: PyTree, model_config: ml_collections.ConfigDict | ModelSpec,
                 out_dir: str | pathlib.Path) -> pathlib.Path:
  """Writes the image tower as a ViTModel directory (config.json, model.safetensors) at the model's image size."""
  spec = _spec(model_config)
  rules, _ = vit.rules(spec)
  return _write(ParamTree(params), rules, vit.hf_config(spec), out_dir)


def _spec(model_config) -> ModelSpec:
  return model_config if isinstance(model_config, ModelSpec) else ModelSpec.from_config(model_config)


def _write(tree: ParamTree, rules: list[Rule], config: dict, out_dir: str | pathlib.Path) -> pathlib.Path:
  tensors: dict[str, np.ndarray] = {}
  for rule in rules:
    for key, value in zip(rule.keys, rule.save(tree.get(rule.param, rule.layer)), strict=True):
      tensors[key] = np.ascontiguousarray(value, dtype=np.float32)
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / 'config.json').write_text(json.dumps(config, indent=2) + '\n')
  # transformers reads a safetensors file only when its metadata names the framework the tensors are laid out for.
  safetensors.numpy.save_file(tensors, str(out / 'model.safetensors'), metadata={'format': 'pt'})
  return out
