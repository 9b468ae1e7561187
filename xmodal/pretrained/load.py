"""`load_pretrained`: public BERT / ViT / DeiT / timm checkpoints into an XModal parameter tree, with a report.

Nothing is skipped in silence (ALBEF's `load_state_dict(strict=False)` is what this avoids): every checkpoint tensor
is either used or listed as unused, and an unused tensor that matches no expected pattern is an error; every model
parameter is either filled or listed as unfilled (cross-attention, projections, ITM head and temperature are always
unfilled by a BERT/ViT load: they have no counterpart in those checkpoints).
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from xmodal.models.model import ModelSpec
from xmodal.pretrained import bert, vit
from xmodal.pretrained.common import Checkpoint, CheckpointError, find_prefix, find_tokenizer, read_checkpoint
from xmodal.pretrained.params import ParamTree
from xmodal.pretrained.rules import Rule

PyTree = Any


@dataclasses.dataclass
class LoadReport:
  """What a load did.

  Attributes:
    filled: model parameter paths written from a checkpoint.
    unfilled: model parameter paths left as they were (a stacked leaf written for only some layers is listed as
      'path[layers i,j]' under both, with the layers of each).
    unused: per source ('text', 'image'), the checkpoint tensors not used; all matched an expected pattern.
    notes: what else was done (the BERT layer split, position embeddings resized, a DeiT token dropped...).
    tokenizer: the text checkpoint's tokenizer file (tokenizer.json, else vocab.txt), None without one.
  """
  filled: list[str] = dataclasses.field(default_factory=list)
  unfilled: list[str] = dataclasses.field(default_factory=list)
  unused: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  notes: list[str] = dataclasses.field(default_factory=list)
  tokenizer: str | None = None

  def unfilled_groups(self) -> dict[str, int]:
    """Unfilled parameters per module, layers merged: {'fusion/layers/cross_attn': 8, 'itm_head': 2, ...}."""
    return _group(self.unfilled)

  def summary(self) -> str:
    """A few lines for the log."""
    lines = [f'filled {len(self.filled)} parameter arrays; left {len(self.unfilled)} as initialised:']
    lines += [f'  {group} ({count})' for group, count in self.unfilled_groups().items()]
    for source, names in self.unused.items():
      lines.append(f'{source} checkpoint: {len(names)} tensors unused (expected): {_group(names, sep=".")}')
    lines += self.notes + ([f'tokenizer: {self.tokenizer}'] if self.tokenizer else [])
    return '\n'.join(lines)


def _group(names: Sequence[str], sep: str = '/') -> dict[str, int]:
  groups: dict[str, int] = {}
  for name in names:
    parts = re.sub(r'\[.*\]$', '', name).split(sep)
    parts = [re.sub(r'^(layers?)_?\d+$', r'\1', p) if sep == '/' else re.sub(r'^\d+$', '*', p) for p in parts]
    # Drop the leaf ('kernel', 'weight') and LayerNorm's inner 'norm' so that a module is one line.
    parts = parts[:-1] if len(parts) > 1 else parts
    parts = parts[:-1] if len(parts) > 1 and parts[-1] == 'norm' else parts
    key = sep.join(parts)
    groups[key] = groups.get(key, 0) + 1
  return groups


def load_pretrained(params: PyTree, model_config: ml_collections.ConfigDict | ModelSpec,
                    text_dir: str | pathlib.Path | None = None, image_dir: str | pathlib.Path | None = None,
                    expected_unused: Sequence[str] = ()) -> tuple[PyTree, LoadReport]:
  """Loads a BERT checkpoint into the text tower (and fusion layers) and a ViT/DeiT/timm one into the image tower.

  Sizes come from each checkpoint's config.json (timm: from its tensors) and must equal the model config's; a
  difference is a CheckpointError naming both values and the `model.*` key to set (`config_overrides` gives them).

  Args:
    params: XModal variables (`{'params': ...}`) or parameters, scanned or not, boxed (`nn.Partitioned`) or not,
      numpy or (sharded) jax arrays. Not modified.
    model_config: the config's `model` section (or its ModelSpec).
    text_dir: a Hugging Face BERT directory (config.json + model.safetensors or pytorch_model.bin); None or '' = none.
    image_dir: a Hugging Face ViT/DeiT directory, or a timm state-dict file; None or '' = none.
    expected_unused: regexes (re.search) for checkpoint tensors that may go unused, on top of the defaults
      (`bert.DEFAULT_EXPECTED_UNUSED`: pooler, MLM/NSP heads; `vit.DEFAULT_EXPECTED_UNUSED`: pooler, classifiers).

  Returns:
    (params of the same structure and boxing, with the same shardings; the LoadReport).
  """
  spec = model_config if isinstance(model_config, ModelSpec) else ModelSpec.from_config(model_config)
  tree, report = ParamTree(params), LoadReport()
  if text_dir:
    ckpt = read_checkpoint(text_dir)
    tensors = _unprefixed(ckpt, bert.ANCHOR, bert.canonical_name)
    num_layers = bert.check(ckpt, spec)
    used = _apply(tree, ckpt, tensors, bert.rules(spec, num_layers))
    if spec.mlm_head:
      used |= _load_mlm_head(tree, ckpt, report)
    report.unused['text'] = _check_unused(ckpt, used, (*bert.DEFAULT_EXPECTED_UNUSED, *expected_unused), 'BERT')
    report.notes.append(bert.describe(ckpt.path, num_layers, spec))
    report.tokenizer = find_tokenizer(text_dir)
  if image_dir:
    ckpt = read_checkpoint(image_dir)
    tensors = _unprefixed(ckpt, vit.HF_ANCHOR if vit.is_hf(ckpt.tensors) else vit.TIMM_ANCHOR)
    arrays = {k: ckpt.tensors[v] for k, v in tensors.items()}
    notes = vit.check(ckpt, arrays, spec)
    rules, more = vit.rules(spec, arrays)
    used = _apply(tree, ckpt, tensors, rules)
    report.unused['image'] = _check_unused(ckpt, used, (*vit.DEFAULT_EXPECTED_UNUSED, *expected_unused), 'image')
    report.notes += [f'image {str(ckpt.path)!r}: {n}' for n in notes + more]
  new_params, report.filled, report.unfilled = tree.result()
  return new_params, report


def _load_mlm_head(tree: ParamTree, ckpt: Checkpoint, report: LoadReport) -> set[str]:
  """Fills the MLM head from BertForMaskedLM's 'cls.predictions.*' where the checkpoint has them; notes either way."""
  names = {bert.canonical_name(n) for n in ckpt.tensors}
  if not any(n.endswith(bert.MLM_ANCHOR) for n in names):
    report.notes.append(f'BERT {str(ckpt.path)!r}: no MLM head (cls.predictions.*); the MLM head stays as initialised')
    return set()
  used = _apply(tree, ckpt, _unprefixed(ckpt, bert.MLM_ANCHOR, bert.canonical_name), bert.mlm_rules())
  report.notes.append(f'BERT {str(ckpt.path)!r}: cls.predictions -> the MLM head (its decoder is the word embeddings)')
  return used


def _unprefixed(ckpt: Checkpoint, anchor: str, canonical=lambda n: n) -> dict[str, str]:
  """{tensor name without the tower's prefix, in canonical spelling: name in the file} for the tower's tensors."""
  names = {canonical(n): n for n in ckpt.tensors}
  prefix = find_prefix(names, anchor)
  return {n[len(prefix):]: original for n, original in names.items() if n.startswith(prefix)}


def _apply(tree: ParamTree, ckpt: Checkpoint, tensors: dict[str, str], rules: Sequence[Rule]) -> set[str]:
  """Writes every rule's parameter; returns the checkpoint tensor names used. Missing tensors are one error."""
  missing = [k for rule in rules for k in rule.keys if k not in tensors]
  if missing:
    raise CheckpointError(f'checkpoint {str(ckpt.path)!r} lacks {len(missing)} tensors the model needs: '
                          f'{missing[:10]}{" ..." if len(missing) > 10 else ""}')
  used = set()
  for rule in rules:
    originals = [tensors[k] for k in rule.keys]
    value = rule.load(*(np.asarray(ckpt.tensors[n], np.float32) for n in originals))
    tree.set(rule.param, rule.layer, value, source=f'{str(ckpt.path)!r} tensor(s) {originals}')
    used.update(originals)
  return used


def _check_unused(ckpt: Checkpoint, used: set[str], patterns: Sequence[str], what: str) -> list[str]:
  """The unused tensors; raises if any matches none of `patterns`."""
  unused = sorted(n for n in ckpt.tensors if n not in used)
  unexpected = [n for n in unused if not any(re.search(p, n) for p in patterns)]
  if unexpected:
    raise CheckpointError(
        f'{what} checkpoint {str(ckpt.path)!r} has {len(unexpected)} tensors the model does not use: '
        f'{unexpected[:20]}{" ..." if len(unexpected) > 20 else ""}\nif that is intended, pass expected_unused '
        f'regexes (config.init.expected_unused) that match them' + vit.distillation_hint(unexpected))
  return unused


def config_overrides(text_dir: str | pathlib.Path | None = None,
                     image_dir: str | pathlib.Path | None = None) -> dict[str, object]:
  """The `model` config values the checkpoints fix, as {'text.width': 768, 'vision.layer_norm_eps': 1e-12, ...}.

  Apply before building the model: `config.model.update_from_flattened_dict(config_overrides(...))`. The text
  depth is left out: how BERT's layers split between text and fusion layers is the config's choice.
  """
  out: dict[str, object] = {}
  if text_dir:
    out.update({f.model_key: f.value for f in bert.fields(read_checkpoint(text_dir).config)})
  if image_dir:
    ckpt = read_checkpoint(image_dir)
    tensors = _unprefixed(ckpt, vit.HF_ANCHOR if vit.is_hf(ckpt.tensors) else vit.TIMM_ANCHOR)
    out.update({f.model_key: f.value for f in vit.fields(ckpt, {k: ckpt.tensors[v] for k, v in tensors.items()})[0]})
  return out
