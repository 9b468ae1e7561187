"""The device mesh, its axis names, the logical-axis rules, and the shardings of parameters and batches.

The one owner of axis names. One mesh with named axes ('data', 'fsdp', 'tensor'). Parameters carry logical axis names
(see models/layers.py); rules map each logical name onto mesh axes (DEFAULT_RULES, the config's `mesh.rules`).
Batches split their leading axis over ('data', 'fsdp'), and `host_to_global` assembles each process's part of a batch
into global jax.Arrays. TensorFlow-free: an accelerator host imports it without TF.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P, Sharding

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')  # the mesh axes a batch's leading axis is split over

# Logical axis → mesh axes. Batch over data and fsdp; parameters sharded over fsdp on their width ('embed') and over
# tensor on heads/mlp/vocab (Megatron-style). The stacked 'layers' axis of scanned parameters is never sharded.
DEFAULT_RULES = (
    ('batch', BATCH_AXES),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('vocab', 'tensor'),
    ('kv', None),
    ('length', None),
    ('layers', None),
)


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


def batch_spec(mesh: Mesh) -> P:
  """The leading (batch) axis split over the mesh's data-parallel axes, ('data', 'fsdp') where present."""
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  return P(axes if axes else None)


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


def host_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh,
                   spec_or_sharding: P | Sharding | None = None) -> dict[str, jax.Array]:
  """Assembles each process's (B_local, ...) arrays into global (B_local * processes, ...) jax.Arrays.

  Args:
    batch: this process's part of the batch, every leaf with the same leading size.
    mesh: the device mesh.
    spec_or_sharding: a PartitionSpec (applied on `mesh`) or a Sharding; default `batch_spec(mesh)`.

  Returns:
    The same keys, each a global jax.Array sharded along its leading axis.
  """
  if spec_or_sharding is None:
    spec_or_sharding = batch_spec(mesh)
  sharding = (spec_or_sharding if isinstance(spec_or_sharding, Sharding)
              else NamedSharding(mesh, spec_or_sharding))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
