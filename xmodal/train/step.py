"""The update step: loss and gradients (optionally accumulated over micro-batches), clipping, AdamW, metrics, and the
momentum model's average and queue when it is on.

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
from xmodal.train import momentum as momentum_lib
from xmodal.train.objective import LossWeights, compute_loss, momentum_outputs
from xmodal.train.state import MomentumTrainState, Setup, TrainState


def make_train_step(model: XModal, tx: optax.GradientTransformation, lr_schedule: optax.Schedule,
                    weights: LossWeights, *, grad_accum: int = 1, skip_nonfinite: bool = False
                    ) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
  """Builds the step.

  Gradient accumulation splits the batch into `grad_accum` micro-batches and sums their gradients: memory falls by
  that factor, but each micro-batch's contrastive loss sees only the micro-batch's negatives (B / grad_accum of
  them), and hard negatives for ITM are drawn from the micro-batch. It is therefore NOT the same objective as one
  large batch: use it to fit a model, and prefer more devices to grow the contrastive batch.

  With `skip_nonfinite`, a step whose loss or gradient norm is not finite leaves the parameters and optimizer state
  (and the momentum model's average and queue) unchanged (the step counter still advances); metrics['finite'] tells
  the loop.

  With weights.momentum > 0 the state is a MomentumTrainState: the momentum model runs on each (micro-)batch before
  the loss, every micro-batch's ITC sees the queue as it was at the step's start, and after the optimizer update the
  average moves towards the new parameters and the step's global batch of momentum embeddings is enqueued.
  """
  def loss_and_grad(state, batch, rng):
    """((loss, metrics), grads, the momentum embeddings (image, text) to enqueue or None)."""
    teacher = queue = None
    if weights.momentum > 0:
      teacher = momentum_outputs(model, state.momentum_params, batch, rng, weights)
      queue = None if state.queue is None else state.queue.keys()
    value, grads = jax.value_and_grad(
        lambda p: compute_loss(model, p, batch, rng, weights, state.step, teacher, queue), has_aux=True)(state.params)
    return value, grads, None if teacher is None else (teacher.image_emb, teacher.text_emb)

  def accumulated(state, batch, rng):
    micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

    def body(carry, inputs):
      index, one = inputs
      (loss, metrics), grads, keys = loss_and_grad(state, one, jax.random.fold_in(rng, index))
      return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), keys
    (loss, metrics), grads, first_keys = loss_and_grad(state, jax.tree.map(lambda x: x[0], micro),
                                                       jax.random.fold_in(rng, 0))
    rest = jax.tree.map(lambda x: x[1:], micro)
    (loss, metrics, grads), keys = jax.lax.scan(body, (loss, metrics, grads), (jnp.arange(1, grad_accum), rest))
    if keys is not None:  # back to the batch's order: micro-batch a held rows a * B/A ... (a + 1) * B/A - 1
      keys = jax.tree.map(lambda first, others: jnp.concatenate([first, others.reshape(-1, *others.shape[2:])]),
                          first_keys, keys)
    return (loss / grad_accum, jax.tree.map(lambda m: m / grad_accum, metrics)), jax.tree.map(
        lambda g: g / grad_accum, grads), keys

  def train_step(state: TrainState, batch: dict, rng: jax.Array) -> tuple[TrainState, dict]:
    if (weights.momentum > 0) != isinstance(state, MomentumTrainState):
      raise ValueError(f'weights.momentum={weights.momentum} needs a MomentumTrainState exactly when > 0 (state.py: '
                       f'setup with the config, or state_shardings/create_state with a MomentumSpec)')
    step_rng = jax.random.fold_in(rng, state.step)
    if grad_accum > 1:
      (loss, metrics), grads, keys = accumulated(state, batch, step_rng)
    else:
      (loss, metrics), grads, keys = loss_and_grad(state, batch, step_rng)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = {'params': params, 'opt_state': opt_state}
    if weights.momentum > 0:
      new['momentum_params'] = momentum_lib.update_average(state.momentum_params, params, weights.momentum)
      if state.queue is not None:
        new['queue'] = momentum_lib.enqueue(state.queue, *keys, batch.get('image_ids'))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if skip_nonfinite:
      new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, {k: getattr(state, k) for k in new})
    metrics = dict(metrics, grad_norm=grad_norm, lr=lr_schedule(state.step), finite=finite)
    return state.replace(step=state.step + 1, **new), metrics

  return train_step


def jit_train_step(built: Setup, weights: LossWeights, mesh, *, grad_accum: int = 1, skip_nonfinite: bool = False
                   ) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
  """`make_train_step` of a `state.setup`, jitted: (state, global batch, rng) -> (state, metrics), the state kept in
  its shardings and donated, the batch split over the mesh's batch axes, the rng and metrics replicated."""
  step_fn = make_train_step(built.model, built.tx, built.lr_schedule, weights, grad_accum=grad_accum,
                            skip_nonfinite=skip_nonfinite)
  return jax.jit(step_fn, in_shardings=(built.shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
                 out_shardings=(built.shardings, sharding.replicated(mesh)), donate_argnums=0)
