"""The update step: loss and gradients (optionally accumulated over micro-batches), clipping, AdamW, metrics.

Pure: `train_step(state, batch, rng) -> (state, metrics)`; `jit_train_step` compiles it the one way the loop and the
benchmark run it: explicit shardings, the state donated.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from xmodal import sharding
from xmodal.models import XModal
from xmodal.train.objective import LossWeights, compute_loss
from xmodal.train.state import Setup, TrainState


def make_train_step(model: XModal, tx: optax.GradientTransformation, lr_schedule: optax.Schedule,
                    weights: LossWeights, *, grad_accum: int = 1, skip_nonfinite: bool = False
                    ) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
  """Builds the step.

  Gradient accumulation splits the batch into `grad_accum` micro-batches and sums their gradients: memory falls by
  that factor, but each micro-batch's contrastive loss sees only the micro-batch's negatives (B / grad_accum of
  them), and hard negatives for ITM are drawn from the micro-batch. It is therefore NOT the same objective as one
  large batch: use it to fit a model, and prefer more devices to grow the contrastive batch.

  With `skip_nonfinite`, a step whose loss or gradient norm is not finite leaves the parameters and optimizer state
  unchanged (the step counter still advances); metrics['finite'] tells the loop.
  """
  def loss_and_grad(params, batch, rng, step):
    return jax.value_and_grad(lambda p: compute_loss(model, p, batch, rng, weights, step), has_aux=True)(params)

  def accumulated(params, batch, rng, step):
    micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

    def body(carry, inputs):
      index, one = inputs
      (loss, metrics), grads = loss_and_grad(params, one, jax.random.fold_in(rng, index), step)
      return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None
    (loss, metrics), grads = loss_and_grad(params, jax.tree.map(lambda x: x[0], micro), jax.random.fold_in(rng, 0),
                                           step)
    rest = jax.tree.map(lambda x: x[1:], micro)
    (loss, metrics, grads), _ = jax.lax.scan(body, (loss, metrics, grads), (jnp.arange(1, grad_accum), rest))
    return (loss / grad_accum, jax.tree.map(lambda m: m / grad_accum, metrics)), jax.tree.map(
        lambda g: g / grad_accum, grads)

  def train_step(state: TrainState, batch: dict, rng: jax.Array) -> tuple[TrainState, dict]:
    step_rng = jax.random.fold_in(rng, state.step)
    if grad_accum > 1:
      (loss, metrics), grads = accumulated(state.params, batch, step_rng, state.step)
    else:
      (loss, metrics), grads = loss_and_grad(state.params, batch, step_rng, state.step)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if skip_nonfinite:
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
      params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
    metrics = dict(metrics, grad_norm=grad_norm, lr=lr_schedule(state.step), finite=finite)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def jit_train_step(built: Setup, weights: LossWeights, mesh, *, grad_accum: int = 1, skip_nonfinite: bool = False
                   ) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
  """`make_train_step` of a `state.setup`, jitted: (state, global batch, rng) -> (state, metrics), the state kept in
  its shardings and donated, the batch split over the mesh's batch axes, the rng and metrics replicated."""
  step_fn = make_train_step(built.model, built.tx, built.lr_schedule, weights, grad_accum=grad_accum,
                            skip_nonfinite=skip_nonfinite)
  return jax.jit(step_fn, in_shardings=(built.shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
                 out_shardings=(built.shardings, sharding.replicated(mesh)), donate_argnums=0)
