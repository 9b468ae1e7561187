"""The train state, born sharded: shapes by `jax.eval_shape`, shardings from logical names, then a jitted init."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from xmodal import sharding
from xmodal.models import XModal, build, dummy_inputs
from xmodal.train import optim
from xmodal.train.momentum import FeatureQueue, MomentumSpec
from xmodal.train.objective import LossWeights, matching_only_parameters


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


@flax.struct.dataclass
class MomentumTrainState(TrainState):
  """The state of a run with ALBEF's momentum model (loss.momentum > 0; xmodal/train/momentum.py). Without it the
  state stays a plain TrainState, so that the default run's state and checkpoints have no extra leaves."""
  momentum_params: Any  # the parameters' moving average, sharded like them
  queue: FeatureQueue | None  # None without a queue (loss.queue_size 0)


def abstract_params(model: XModal):
  """The boxed (nn.Partitioned) parameter shapes, without computing anything."""
  return jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy_inputs(model.spec))['params'])


def state_shardings(model: XModal, tx: optax.GradientTransformation, mesh: Mesh, rules, boxed=None,
                    momentum: MomentumSpec | None = None) -> TrainState:
  """NamedShardings of every leaf of the TrainState: parameters and their optimizer moments alike (and, with
  `momentum`, the MomentumTrainState's average like the parameters and its queue over the batch axes).

  `boxed`: the model's `abstract_params`, when the caller has them already (tracing init is not free).
  """
  boxed = abstract_params(model) if boxed is None else boxed
  param_shardings = sharding.logical_shardings(boxed, mesh, rules)
  opt_shapes = jax.eval_shape(tx.init, nn.unbox(boxed))
  # Frozen parameters have no moments: their place holds an empty optax.MaskedNode, which stays as it is.
  masked = lambda x: isinstance(x, optax.MaskedNode)
  opt_shardings = optax.tree_map_params(tx, lambda x, s: x if masked(x) else s, opt_shapes, param_shardings,
                                        transform_non_params=lambda _: sharding.replicated(mesh), is_leaf=masked)
  state = TrainState(step=sharding.replicated(mesh), params=param_shardings, opt_state=opt_shardings)
  if momentum is None:
    return state
  return MomentumTrainState(**vars(state), momentum_params=param_shardings, queue=momentum.queue_shardings(mesh))


def create_state(model: XModal, tx: optax.GradientTransformation, rng: jax.Array, shardings: TrainState,
                 params=None, momentum: MomentumSpec | None = None) -> TrainState:
  """Initialises the state directly into its shardings (no full copy on one device).

  `params` (unboxed), when given, replace the random initialisation (e.g. imported pretrained towers). With
  `momentum` (the spec `shardings` were made with) the momentum average starts equal to the parameters (ALBEF copies
  them) and the queue empty.
  """
  def init(rng, params):
    if params is None:
      params = nn.unbox(model.init(rng, *dummy_inputs(model.spec))['params'])
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    if momentum is None:
      return state
    return MomentumTrainState(**vars(state), momentum_params=params, queue=momentum.empty_queue())
  if params is None:
    return jax.jit(lambda rng: init(rng, None), out_shardings=shardings)(rng)
  params = jax.device_put(params, shardings.params)
  return jax.jit(lambda params: init(None, params), out_shardings=shardings)(params)


@dataclasses.dataclass(frozen=True)
class Setup:
  """What training, benchmarking and evaluation build alike from a config: model, optimizer, state shardings."""
  model: XModal
  tx: optax.GradientTransformation
  lr_schedule: optax.Schedule
  shardings: TrainState
  params: Any  # the parameters' ShapeDtypeStructs (unboxed)
  momentum: MomentumSpec | None = None  # the momentum model's state layout (loss.momentum > 0), else None

  @property
  def num_params(self) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))

  def abstract_state(self) -> TrainState:
    """ShapeDtypeStructs carrying the target shardings: what a checkpoint restores onto."""
    shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=self.params,
                        opt_state=jax.eval_shape(self.tx.init, self.params))
    if self.momentum is not None:
      shapes = MomentumTrainState(**vars(shapes), momentum_params=self.params,
                                  queue=jax.eval_shape(self.momentum.empty_queue))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, self.shardings)


def setup(config: ml_collections.ConfigDict, mesh: Mesh, total_steps: int) -> Setup:
  """Builds the model and optimizer of `config` and the shardings of their state on `mesh` (init traced once)."""
  model = build(config.model)
  boxed = abstract_params(model)
  params = nn.unbox(boxed)
  late = None
  if config.loss.get('itm_start_step', 0) > 0:  # the parameters only ITM trains start then
    weights = LossWeights.from_config(config.loss, config.get('data'))
    late = optim.LateStart(weights.itm_start, matching_only_parameters(weights))
  tx, lr_schedule = optim.build_optimizer(config.optim, params, total_steps, late)
  momentum = MomentumSpec.from_config(config)
  shardings = state_shardings(model, tx, mesh, [tuple(r) for r in config.mesh.rules], boxed=boxed, momentum=momentum)
  return Setup(model, tx, lr_schedule, shardings, params, momentum)
