"""Reading and writing single parameters of an XModal tree: scanned or not, boxed or not, sharded or not.

Paths are written in scanned form ('text/layers/attn/qkv/kernel' + a layer index). In a scanned tree the layer is a
slice of the stacked leaf; in an unscanned tree it is the leaf 'text/layers_3/attn/qkv/kernel'.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from xmodal.pretrained.common import CheckpointError

PyTree = Any


class ParamTree:
  """A flat view of a parameter tree (`{'params': ...}` variables or the params themselves) that records writes."""

  def __init__(self, params: PyTree):
    # Variables from `model.init` hold everything under 'params'; a bare parameter tree holds the towers directly.
    self._wrapped = 'params' in params and 'text' not in params
    self._flat = traverse_util.flatten_dict(params['params'] if self._wrapped else params, sep='/')
    self._stacks: dict[str, np.ndarray] = {}  # scanned leaf -> new value being filled, layer by layer
    self._stack_layers: dict[str, set[int]] = {}  # scanned leaf -> the layers written so far
    self._written: dict[str, np.ndarray] = {}  # unstacked leaf -> new value

  def _locate(self, param: str, layer: int | None) -> tuple[str, int | None]:
    """(flat leaf name, index along its stacked 'layers' axis or None)."""
    if layer is None:
      if param not in self._flat:
        raise CheckpointError(f'the model has no parameter {param!r}')
      return param, None
    if param in self._flat:
      depth = _value(self._flat[param]).shape[0]
      if layer >= depth:
        raise CheckpointError(f'layer {layer} of {param!r} does not exist: the model stacks {depth} layers')
      return param, layer
    unscanned = param.replace('/layers/', f'/layers_{layer}/', 1)
    if unscanned not in self._flat:
      raise CheckpointError(f'the model has no parameter {param!r} (layer {layer}), scanned or as {unscanned!r}')
    return unscanned, None

  def shape(self, param: str, layer: int | None) -> tuple[int, ...]:
    """The shape of one parameter (one layer's slice of a stacked leaf)."""
    name, index = self._locate(param, layer)
    shape = tuple(_value(self._flat[name]).shape)
    return shape[1:] if index is not None else shape

  def get(self, param: str, layer: int | None) -> np.ndarray:
    """The value of one parameter (one layer's slice of a stacked leaf), on the host."""
    name, index = self._locate(param, layer)
    value = np.asarray(jax.device_get(_value(self._flat[name])))
    return value[index] if index is not None else value

  def set(self, param: str, layer: int | None, value: np.ndarray, source: str) -> None:
    """Writes one parameter; `source` names the checkpoint tensors in the error when shapes differ."""
    name, index = self._locate(param, layer)
    old = _value(self._flat[name])
    want = tuple(old.shape[1:] if index is not None else old.shape)
    if tuple(value.shape) != want:
      where = f'{param} (layer {layer})' if layer is not None else param
      raise CheckpointError(f'checkpoint {source} gives shape {tuple(value.shape)} for model parameter {where}, '
                            f'which has shape {want}')
    value = np.asarray(value, dtype=old.dtype)
    if index is None:
      self._written[name] = value
      return
    if name not in self._stacks:
      self._stacks[name] = np.empty(old.shape, old.dtype)
      self._stack_layers[name] = set()
    self._stacks[name][index] = value
    self._stack_layers[name].add(index)

  def result(self) -> tuple[PyTree, list[str], list[str]]:
    """(the new tree in the input's form, filled parameter names, unfilled parameter names).

    A stacked leaf with only some layers written keeps its other layers and is listed as unfilled with them, e.g.
    'fusion/layers/attn/qkv/kernel[layers 2,3]'.
    """
    new_flat, filled, unfilled = dict(self._flat), [], []
    for name, leaf in self._flat.items():
      if name in self._written:
        new_flat[name] = _rebox(leaf, self._written[name])
        filled.append(name)
      elif name in self._stacks:
        stack, done = self._stacks[name], self._stack_layers[name]
        missing = sorted(set(range(stack.shape[0])) - done)
        if missing:
          stack[missing] = np.asarray(jax.device_get(_value(leaf)))[missing]
          unfilled.append(f'{name}[layers {",".join(map(str, missing))}]')
        new_flat[name] = _rebox(leaf, stack)
        filled.append(name if not missing else f'{name}[layers {",".join(map(str, sorted(done)))}]')
      else:
        unfilled.append(name)
    tree = traverse_util.unflatten_dict(new_flat, sep='/')
    return ({'params': tree} if self._wrapped else tree), filled, unfilled


def _value(leaf: Any) -> Any:
  """A leaf without its partitioning box (model.init boxes parameters in `nn.Partitioned`)."""
  return leaf.unbox() if isinstance(leaf, nn.meta.AxisMetadata) else leaf


def _rebox(leaf: Any, value: np.ndarray) -> Any:
  """`value` in the place of `leaf`: in the same box, and with the same sharding when `leaf` is a jax.Array."""
  old = _value(leaf)
  if isinstance(old, jax.Array):
    # Built shard by shard so that a parameter born sharded stays so, on any number of hosts.
    value = jax.make_array_from_callback(value.shape, old.sharding, lambda index: value[index])
  return leaf.replace_boxed(value) if isinstance(leaf, nn.meta.AxisMetadata) else value
