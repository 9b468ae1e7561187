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
from xmodal.train.objective import (EmbeddingGrads, LossWeights, compute_loss, contrastive_loss_of_embeddings, embed,
                                    momentum_outputs)
from xmodal.train.state import MomentumTrainState, Setup, TrainState


# The values of `train.grad_accum_mode`: 'micro' = each micro-batch's own losses; 'exact' = gradient caching.
GRAD_ACCUM_MODES = ('micro', 'exact')


def check_grad_accum_mode(mode: str, weights: LossWeights) -> None:
  """Raises ValueError for a mode that is not one of GRAD_ACCUM_MODES, or 'exact' with a loss it does not cache
  (the momentum form of ITC, the ring form, written-negative columns in ITC)."""
  if mode not in GRAD_ACCUM_MODES:
    raise ValueError(f'grad_accum_mode {mode!r} is not one of {GRAD_ACCUM_MODES}')
  if mode == 'exact' and (weights.momentum > 0 or weights.chunked or weights.itc_written_negatives):
    raise ValueError("grad_accum_mode='exact' caches the plain ITC (+ sigmoid) only: not with momentum > 0, chunked "
                     'or itc_written_negatives')


def caches_gradients(grad_accum: int, grad_accum_mode: str) -> bool:
  """Whether the step runs gradient caching (and so the towers' forward pass twice)."""
  return grad_accum > 1 and grad_accum_mode == 'exact'


def make_train_step(model: XModal, tx: optax.GradientTransformation, lr_schedule: optax.Schedule,
                    weights: LossWeights, *, grad_accum: int = 1, grad_accum_mode: str = 'micro',
                    skip_nonfinite: bool = False) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
  """Builds the step.

  Gradient accumulation splits the batch of B into A = `grad_accum` micro-batches (micro-batch a holds rows
  a * B/A ... (a + 1) * B/A - 1) and averages their gradients. `grad_accum_mode` says what the contrastive losses see:

  - 'micro': each micro-batch's own losses. Memory falls by A, but each micro-batch's contrastive loss sees only
    the micro-batch's negatives (B / A of them), and hard negatives for ITM are drawn from the micro-batch. It is
    therefore NOT the same objective as one large batch.
  - 'exact': gradient caching (Gao et al. 2021). (1) The towers embed every micro-batch, one after another, keeping
    no activations; (2) ITC (and the sigmoid loss) and their gradients with respect to the (B, E) embeddings, the
    temperature and the sigmoid's scale and bias are taken over the whole batch; (3) each micro-batch's forward pass
    runs again and the cached embedding gradients are pushed through it (the gradient of sum(g * embedding)),
    summed over micro-batches. ITC's loss and gradients equal one large batch's to float tolerance; the towers run
    forward twice. ITM and MLM stay per micro-batch, exactly as in 'micro': ITM's hard negatives are drawn from the
    micro-batch's block of the whole batch's similarity matrix (its own rows and columns, the only tokens at hand
    in that pass), and their losses and gradients are averaged over micro-batches. Not with the momentum model,
    the ring form (chunked) or ITC's written-negative columns (`check_grad_accum_mode`).

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

  check_grad_accum_mode(grad_accum_mode, weights)

  def split(tree):
    return jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), tree)

  def accumulated(state, batch, rng):
    micro = split(batch)

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

  def cached(state, batch, rng):
    """'exact' accumulation (gradient caching): ((loss, metrics), grads, None)."""
    params, micro = state.params, split(batch)
    # (1) Every micro-batch's embeddings, one micro-batch at a time; nothing is differentiated here.
    image_emb, text_emb = jax.lax.map(lambda one: embed(model, jax.lax.stop_gradient(params), one), micro)
    image_emb, text_emb = (x.reshape(-1, x.shape[-1]) for x in (image_emb, text_emb))
    # (2) The contrastive losses over the whole batch; gradients to the embeddings and to the parameters they read
    # (the temperature, the sigmoid's scale and bias; zeros elsewhere).
    (contrastive, contrastive_metrics), (head_grads, image_grad, text_grad) = jax.value_and_grad(
        lambda p, i, t: contrastive_loss_of_embeddings(model, p, i, t, batch.get('image_ids'), weights),
        argnums=(0, 1, 2), has_aux=True)(params, image_emb, text_emb)
    # x A: the accumulated gradient is divided by A below, as ITM's and MLM's average must be.
    cache = split(EmbeddingGrads(image_grad * grad_accum, text_grad * grad_accum))

    # (3) Each micro-batch's forward again: ITM and MLM on it, and the cached gradients through its embeddings.
    def grad_of(index, one, grads):
      return jax.value_and_grad(lambda p: compute_loss(model, p, one, jax.random.fold_in(rng, index), weights,
                                                       state.step, embedding_grads=grads), has_aux=True)(params)

    def body(carry, inputs):
      (_, metrics), grads = grad_of(*inputs)
      return jax.tree.map(jnp.add, carry, (metrics, grads)), None
    first = lambda tree: jax.tree.map(lambda x: x[0], tree)
    rest = lambda tree: jax.tree.map(lambda x: x[1:], tree)
    (_, metrics), grads = grad_of(0, first(micro), first(cache))
    (metrics, grads), _ = jax.lax.scan(body, (metrics, grads), (jnp.arange(1, grad_accum), rest(micro), rest(cache)))
    metrics = jax.tree.map(lambda m: m / grad_accum, metrics)
    loss = contrastive + metrics['loss']  # whole-batch ITC (+ sigmoid) + the micro-batches' mean ITM (+ MLM)
    metrics = dict(metrics, **contrastive_metrics, loss=loss)
    grads = jax.tree.map(lambda g, h: g / grad_accum + h, grads, head_grads)
    return (loss, metrics), grads, None

  def train_step(state: TrainState, batch: dict, rng: jax.Array) -> tuple[TrainState, dict]:
    if (weights.momentum > 0) != isinstance(state, MomentumTrainState):
      raise ValueError(f'weights.momentum={weights.momentum} needs a MomentumTrainState exactly when > 0 (state.py: '
                       f'setup with the config, or state_shardings/create_state with a MomentumSpec)')
    step_rng = jax.random.fold_in(rng, state.step)
    if caches_gradients(grad_accum, grad_accum_mode):
      (loss, metrics), grads, keys = cached(state, batch, step_rng)
    elif grad_accum > 1:
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


def jit_train_step(built: Setup, weights: LossWeights, mesh, *, grad_accum: int = 1, grad_accum_mode: str = 'micro',
                   skip_nonfinite: bool = False) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
  """`make_train_step` of a `state.setup`, jitted: (state, global batch, rng) -> (state, metrics), the state kept in
  its shardings and donated, the batch split over the mesh's batch axes, the rng and metrics replicated."""
  step_fn = make_train_step(built.model, built.tx, built.lr_schedule, weights, grad_accum=grad_accum,
                            grad_accum_mode=grad_accum_mode, skip_nonfinite=skip_nonfinite)
  return jax.jit(step_fn, in_shardings=(built.shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
                 out_shardings=(built.shardings, sharding.replicated(mesh)), donate_argnums=0)
