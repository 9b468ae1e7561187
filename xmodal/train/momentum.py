"""ALBEF's momentum model as train state: the moving average of the parameters and the queues of its features.

  momentum params  m <- mu * m + (1 - mu) * p after every optimizer update (loss.momentum = mu; 0 = off). Born equal
                   to the parameters (imported towers included), so a parameter that never moves (optim.freeze, or an
                   lr multiplier of 0) keeps its average equal to itself; one that moves slower (a multiplier < 1)
                   has an average that trails its slower path. The average covers the whole parameter tree, so it is
                   sharded like the parameters; the loss reads its towers, projections, fusion encoder and MLM head.
  feature queue    the momentum image and text embeddings and image ids of the last loss.queue_size / B global
                   batches (B = data.batch_size), first in, first out: slot s of (S, B, E) holds one global batch,
                   sharded over the mesh's batch axes like the batch itself, so that enqueueing moves no data between
                   devices and the layout does not depend on the mesh (a checkpoint restores onto another one).
                   Slots not yet written are masked out of the loss, never read as zeros.

Pure functions: the jitted step (step.py) calls them; the state layout (state.py) asks `MomentumSpec` for shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from xmodal import sharding
from xmodal.losses.contrastive import QueuedKeys


@flax.struct.dataclass
class FeatureQueue:
  """image, text (S, B, E) float32 momentum embeddings; ids (S, B) int32 image ids (-1 where the batch had none);
  count () int32: global batches enqueued so far. Slot count % S is written next; slots below count are filled."""
  image: jax.Array
  text: jax.Array
  ids: jax.Array
  count: jax.Array

  @property
  def slots(self) -> int:
    return self.image.shape[0]

  def keys(self) -> QueuedKeys:
    """The queue as the loss reads it: (Q, E), (Q, E), (Q,) and (Q,) bool valid, Q = S * B."""
    slots, batch, dim = self.image.shape
    valid = jnp.broadcast_to((jnp.arange(slots) < self.count)[:, None], (slots, batch))
    return QueuedKeys(self.image.reshape(slots * batch, dim), self.text.reshape(slots * batch, dim),
                      self.ids.reshape(-1), valid.reshape(-1))


@dataclasses.dataclass(frozen=True)
class MomentumSpec:
  """The momentum state's layout: the queue's size (0 = none), the global batch it takes per step, the embedding
  width."""
  queue_size: int
  batch_size: int
  embed_dim: int

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> MomentumSpec | None:
    """None when loss.momentum is 0 (the state then has no momentum fields at all)."""
    if not config.loss.momentum:
      return None
    return cls(int(config.loss.queue_size), int(config.data.batch_size), int(config.model.embed_dim))

  def empty_queue(self) -> FeatureQueue | None:
    if not self.queue_size:
      return None
    slots = self.queue_size // self.batch_size
    zeros = jnp.zeros((slots, self.batch_size, self.embed_dim), jnp.float32)
    return FeatureQueue(zeros, zeros, jnp.full((slots, self.batch_size), -1, jnp.int32), jnp.zeros((), jnp.int32))

  def queue_shardings(self, mesh: Mesh) -> FeatureQueue | None:
    """Each slot split over the batch axes as the batch is; the counter replicated."""
    if not self.queue_size:
      return None
    axes = sharding.batch_spec(mesh)[0]
    features = NamedSharding(mesh, P(None, axes, None))
    return FeatureQueue(features, features, NamedSharding(mesh, P(None, axes)), sharding.replicated(mesh))


def update_average(average: Any, params: Any, momentum: float) -> Any:
  """m + (1 - mu) (p - m), which is mu m + (1 - mu) p, and exactly m where p == m (a frozen parameter stays put)."""
  return jax.tree.map(lambda m, p: m + (1.0 - momentum) * (p - m), average, params)


def enqueue(queue: FeatureQueue, image: jax.Array, text: jax.Array, ids: jax.Array | None) -> FeatureQueue:
  """Writes one global batch, (B, E), (B, E) and (B,) ids (None: -1), over the oldest slot."""
  slot = queue.count % queue.slots
  ids = jnp.full(image.shape[:1], -1, jnp.int32) if ids is None else ids.astype(jnp.int32)
  write = lambda array, rows: jax.lax.dynamic_update_index_in_dim(array, rows.astype(array.dtype), slot, 0)
  return FeatureQueue(write(queue.image, image), write(queue.text, text), write(queue.ids, ids), queue.count + 1)
