"""The device mesh, logical-axis rules, and the shardings of parameters and batches.

One mesh with named axes ('data', 'fsdp', 'tensor'). Parameters carry logical axis names (see models/layers.py);
the config's rules map each logical name onto mesh axes. Batches split their leading axis over ('data', 'fsdp').
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from xmodal.data.device import batch_spec, host_to_global  # TF-free; re-exported as the one host→device path

MESH_AXES = ('data', 'fsdp', 'tensor')

__all__ = ['MESH_AXES', 'make_mesh', 'resolve_mesh_shape', 'batch_sharding', 'replicated', 'logical_shardings',
           'host_to_global', 'batch_spec']


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Replaces one -1 by the devices left over; the product must equal the device count."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f'mesh.shape {shape} must give one size per axis {MESH_AXES}')
  if shape.count(-1) > 1:
    raise ValueError(f'mesh.shape {shape}: at most one axis may be -1')
  known = int(np.prod([s for s in shape if s != -1]))
  if known <= 0 or num_devices % known:
    raise ValueError(f'mesh.shape {shape} does not divide the {num_devices} devices')
  resolved = tuple(num_devices // known if s == -1 else s for s in shape)
  if int(np.prod(resolved)) != num_devices:
    raise ValueError(f'mesh.shape {shape} uses {int(np.prod(resolved))} devices, but there are {num_devices}')
  return resolved


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all), with Auto axis types (GSPMD propagation)."""
  devices = list(jax.devices() if devices is None else devices)
  resolved = resolve_mesh_shape(shape, len(devices))
  if len(devices) == len(jax.devices()):
    # create_device_mesh orders devices so that the fast axes (tensor, fsdp) sit on the closest links.
    grid = mesh_utils.create_device_mesh(resolved, devices=devices)
  else:
    grid = np.asarray(devices).reshape(resolved)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, batch_spec(mesh))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def logical_shardings(boxed_tree, mesh: Mesh, rules: Sequence[tuple[str, str | tuple[str, ...] | None]]):
  """NamedShardings for a tree whose leaves are `nn.Partitioned` boxes (or plain leaves, replicated).

  The result has the structure of the unboxed tree.
  """
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, [tuple(r) for r in rules])

