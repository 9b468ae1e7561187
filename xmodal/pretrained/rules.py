"""One model parameter <-> checkpoint tensors, with the layout change both ways.

A `Rule` is used to load (checkpoint tensors -> parameter) and, unchanged, to export (parameter -> checkpoint tensors),
so that a round trip cannot disagree with a load. Torch `Linear` weights are (out, in); xmodal kernels are (in, out),
with attention widths split into (heads, head_dim) and Q, K, V fused into one (D, 3, heads, head_dim) kernel.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Rule:
  """How one model parameter is made from (and turned back into) checkpoint tensors.

  Attributes:
    param: the parameter's path in scanned form, e.g. 'text/layers/attn/qkv/kernel' (`ParamTree` maps it to
      'text/layers_3/...' in an unscanned tree).
    layer: the index along the stacked 'layers' axis, None for parameters outside the layer stack.
    keys: checkpoint tensor names, without the checkpoint's prefix.
    load: checkpoint tensors (in `keys` order) -> the parameter's value (one layer's slice).
    save: the parameter's value -> checkpoint tensors (in `keys` order).
  """
  param: str
  layer: int | None
  keys: tuple[str, ...]
  load: Callable[..., np.ndarray]
  save: Callable[[np.ndarray], tuple[np.ndarray, ...]]


def copy(param: str, key: str, layer: int | None = None) -> Rule:
  """Same layout on both sides: LayerNorm scales and biases, embeddings, biases of unsplit outputs."""
  return Rule(param, layer, (key,), lambda t: t, lambda p: (p,))


def linear(param: str, key: str, layer: int | None = None) -> Rule:
  """A torch Linear weight (out, in) as a flax Dense kernel (in, out)."""
  return Rule(param, layer, (key,), lambda w: w.T, lambda k: (k.T,))


def qkv_kernel(param: str, keys: tuple[str, str, str], heads: int, layer: int) -> Rule:
  """Separate query/key/value weights, each (D, D_in), as one fused kernel (D_in, 3, heads, head_dim)."""
  def load(q, k, v):
    return np.stack([q.T, k.T, v.T], axis=1).reshape(q.shape[1], 3, heads, q.shape[0] // heads)

  def save(kernel):
    flat = kernel.reshape(kernel.shape[0], 3, -1)
    return tuple(flat[:, i].T for i in range(3))
  return Rule(param, layer, keys, load, save)


def qkv_bias(param: str, keys: tuple[str, str, str], heads: int, layer: int) -> Rule:
  """Separate query/key/value biases, each (D,), as one (3, heads, head_dim) bias."""
  return Rule(param, layer, keys, lambda q, k, v: np.stack([q, k, v]).reshape(3, heads, -1),
              lambda b: tuple(b.reshape(3, -1)))


def fused_qkv_kernel(param: str, key: str, heads: int, layer: int) -> Rule:
  """timm's fused qkv weight (3 * D, D_in), rows ordered (q|k|v, head, head_dim), as (D_in, 3, heads, head_dim)."""
  return Rule(param, layer, (key,), lambda w: w.T.reshape(w.shape[1], 3, heads, -1),
              lambda k: (k.reshape(k.shape[0], -1).T,))


def fused_qkv_bias(param: str, key: str, heads: int, layer: int) -> Rule:
  """timm's fused qkv bias (3 * D,) as (3, heads, head_dim)."""
  return Rule(param, layer, (key,), lambda b: b.reshape(3, heads, -1), lambda b: (b.reshape(-1),))


def out_kernel(param: str, key: str, heads: int, layer: int) -> Rule:
  """The attention output weight (D, D_in) as a kernel (heads, head_dim, D): input features are head-major."""
  return Rule(param, layer, (key,), lambda w: w.T.reshape(heads, -1, w.shape[0]),
              lambda k: (k.reshape(-1, k.shape[-1]).T,))


def conv_kernel(param: str, key: str) -> Rule:
  """A torch Conv2d weight (out, in, kh, kw) as a flax Conv kernel (kh, kw, in, out)."""
  return Rule(param, None, (key,), lambda w: w.transpose(2, 3, 1, 0), lambda k: (k.transpose(3, 2, 0, 1),))


def layer_norm(param: str, key: str, layer: int | None = None) -> list[Rule]:
  """A torch LayerNorm ('KEY.weight', 'KEY.bias') as xmodal's LayerNorm ('PARAM/norm/scale', 'PARAM/norm/bias')."""
  return [copy(f'{param}/norm/scale', f'{key}.weight', layer), copy(f'{param}/norm/bias', f'{key}.bias', layer)]


def dense(param: str, key: str, layer: int | None = None) -> list[Rule]:
  """A torch Linear ('KEY.weight', 'KEY.bias') as a flax Dense ('PARAM/kernel', 'PARAM/bias')."""
  return [linear(f'{param}/kernel', f'{key}.weight', layer), copy(f'{param}/bias', f'{key}.bias', layer)]
