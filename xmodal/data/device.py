"""Host batches → global jax.Arrays on a mesh. TensorFlow-free: an accelerator host imports it without TF."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding

BATCH_AXES = ('data', 'fsdp')


def batch_spec(mesh: Mesh) -> PartitionSpec:
  """The leading (batch) axis split over the mesh's data-parallel axes, ('data', 'fsdp') where present."""
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  return PartitionSpec(axes if axes else None)


def host_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh,
                   spec_or_sharding: PartitionSpec | Sharding | None = None) -> dict[str, jax.Array]:
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
