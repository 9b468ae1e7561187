"""The train state, born sharded: shapes by `jax.eval_shape`, shardings from logical names, then a jitted init."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from xmodal import parallel
from xmodal.models import XModal, dummy_inputs


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def abstract_params(model: XModal):
  """The boxed (nn.Partitioned) parameter shapes, without computing anything."""
  return jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy_inputs(model.spec))['params'])


def state_shardings(model: XModal, tx: optax.GradientTransformation, mesh: Mesh, rules) -> TrainState:
  """NamedShardings of every leaf of the TrainState: parameters and their optimizer moments alike."""
  boxed = abstract_params(model)
  param_shardings = parallel.logical_shardings(boxed, mesh, rules)
  opt_shapes = jax.eval_shape(tx.init, nn.unbox(boxed))
  opt_shardings = optax.tree_map_params(tx, lambda _, s: s, opt_shapes, param_shardings,
                                        transform_non_params=lambda _: parallel.replicated(mesh))
  return TrainState(step=parallel.replicated(mesh), params=param_shardings, opt_state=opt_shardings)


def create_state(model: XModal, tx: optax.GradientTransformation, rng: jax.Array, shardings: TrainState,
                 params=None) -> TrainState:
  """Initialises the state directly into its shardings (no full copy on one device).

  `params` (unboxed), when given, replace the random initialisation (e.g. imported pretrained towers).
  """
  def init(rng, params):
    if params is None:
      params = nn.unbox(model.init(rng, *dummy_inputs(model.spec))['params'])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  if params is None:
    return jax.jit(lambda rng: init(rng, None), out_shardings=shardings)(rng)
  params = jax.device_put(params, shardings.params)
  return jax.jit(lambda params: init(None, params), out_shardings=shardings)(params)


def abstract_state(shardings: TrainState, model: XModal, tx: optax.GradientTransformation) -> TrainState:
  """ShapeDtypeStructs carrying the target shardings: what a checkpoint restores onto."""
  shapes = jax.eval_shape(lambda: TrainState(step=jnp.zeros((), jnp.int32),
                                             params=nn.unbox(abstract_params(model)),
                                             opt_state=tx.init(nn.unbox(abstract_params(model)))))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
