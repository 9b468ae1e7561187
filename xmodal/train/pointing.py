"""The pointing test as `xmodal eval --pointing` runs it: every caption of a shapes split with its image, through
`models.explain`, scored by `evaluation.pointing` (where each shape and colour word's heatmap peaks)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import ml_collections
import numpy as np

from xmodal.bundle import format as bundle_lib
from xmodal.evaluation import pointing as pointing_lib
from xmodal.inference import preprocess as preprocess_lib
from xmodal.models import XModal, explain as explain_lib
from xmodal.tokenizer import load_tokenizer


def run(config: ml_collections.ConfigDict, model: XModal, params, split: str, batch_size: int = 64,
        progress: bool = False) -> dict[str, Any] | None:
  """Pointing accuracy on `split` of the configured xmodal_shapes dataset (None for another dataset).

  Returns {'split', 'pairs', 'layers', 'methods', 'shape': {...}, 'colour': {...}} as `evaluation.pointing.summarize`
  writes each kind: accuracy (%) per method and cross-attention layer (the Locator's first), and chance (%).
  """
  from xmodal.data.shapes import builder as shapes  # pylint: disable=g-import-not-at-top  (TensorFlow)
  from xmodal.train.evaluation import shapes_builder  # pylint: disable=g-import-not-at-top

  if jax.process_count() > 1:
    raise ValueError('the pointing test runs in one process (xmodal eval --pointing without a multi-process launch)')
  builder = shapes_builder(config.data.tfds_name, config.data.tfds_data_dir)
  if builder is None:
    return None
  scenes, captions = shapes.read_split(builder, split)
  spec = bundle_lib.preprocess_spec(config.data.image_size, config.data.mean, config.data.std)
  pixels = np.stack([preprocess_lib.preprocess(rgb, spec) for rgb in shapes.read_images(builder, split)])
  image_of = np.repeat(np.arange(len(captions)), [len(c) for c in captions])
  texts = [c for cs in captions for c in cs]
  tokenizer = load_tokenizer(config.data.tokenizer)
  max_len = config.model.max_text_len
  targets = pointing_lib.targets(texts, [scenes[i] for i in image_of], tokenizer.token_offsets(texts), max_len)
  ids, mask = tokenizer.encode(texts, max_len)
  # Each image's tokens once (five captions read each image), then the pairs' maps a batch at a time.
  encode = jax.jit(lambda p, x: model.apply({'params': p}, x, method=XModal.encode_image)[0])
  image_tokens = np.concatenate([np.asarray(encode(params, pixels[i:i + batch_size]))
                                 for i in range(0, len(pixels), batch_size)])
  explain = jax.jit(functools.partial(_explain_pairs, model))
  starts = range(0, len(texts), batch_size)
  # Where each batch's targets begin (`targets` come in row order).
  first_target = np.searchsorted([t.row for t in targets], [*starts, len(texts)])
  if progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    starts = tqdm(starts, desc='pointing', unit='batch', dynamic_ncols=True)
  hit, patches = [], None
  for number, start in enumerate(starts):
    rows = np.minimum(np.arange(start, start + batch_size), len(texts) - 1)  # one shape: the last batch repeats
    maps = np.asarray(explain(params, image_tokens[image_of[rows]], ids[rows], mask[rows]))
    patches = maps.shape[-1]
    chosen = targets[first_target[number]:first_target[number + 1]]
    if chosen:
      hit.append(pointing_lib.hits(maps, chosen, config.data.image_size, first_row=start))
  kinds = [t.kind for t in targets]
  chances = {kind: pointing_lib.chance([t for t in targets if t.kind == kind], patches, config.data.image_size)
             for kind in pointing_lib.WORD_KINDS}
  summary = pointing_lib.summarize(np.concatenate(hit), kinds, chances, explain_lib.METHODS)
  return {'split': split, 'pairs': len(texts), 'layers': int(np.concatenate(hit).shape[2]),
          'methods': list(explain_lib.METHODS), **summary}


def _explain_pairs(model: XModal, params, image_tokens, ids, mask):
  text_tokens, _ = model.apply({'params': params}, ids, mask, method=XModal.encode_text)
  maps, _ = explain_lib.explain(model, params, text_tokens, mask, image_tokens)
  return maps


def format_table(results: dict[str, Any]) -> str:
  """Pointing accuracy (%) per word kind, method and layer, beside chance."""
  layers = results['layers']
  head = f'{"pointing (" + results["split"] + ")":<24}' + ''.join(f'{"layer " + str(k):>9}' for k in range(layers))
  lines = [head]
  for kind in pointing_lib.WORD_KINDS:
    entry = results[kind]
    for method in results['methods']:
      lines.append(f'{kind + " words, " + method:<24}' + ''.join(f'{v:>9.1f}' for v in entry[method]))
    lines.append(f'{kind + " words, chance":<24}{entry["chance"]:>9.1f}   ({entry["count"]} words)')
  return '\n'.join(lines)
