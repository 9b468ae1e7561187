"""optim.LateStart: parameters that start training at a step as if freshly initialised there (loss.itm_start_step's
fusion encoder and ITM head), checked against an AdamW written out in numpy."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import micro_config
from xmodal import sharding
from xmodal.config.defaults import base_config
from xmodal.train import optim
from xmodal.train import state as state_lib

TOTAL, START = 12, 5


def _optim_config(**overrides):
  config = base_config('tiny').optim
  config.update(**{'lr': 0.1, 'warmup_steps': 3, 'weight_decay': 0.1, 'clip_norm': 0.0, **overrides})
  return config


def _params():
  rng = np.random.default_rng(0)
  return {'towers': {'kernel': jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)},
          'head': {'kernel': jnp.asarray(rng.normal(size=(2, 2)), jnp.float32),
                   'bias': jnp.asarray(rng.normal(size=(2,)), jnp.float32)}}


def _gradients(steps):
  rng = np.random.default_rng(1)
  return [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), _params()) for _ in range(steps)]


def _run(tx, params, gradients):
  """The parameters after each step."""
  state, history = tx.init(params), []
  for grads in gradients:
    updates, state = tx.update(grads, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    history.append(params)
  return history


def _numpy_adamw(p, grads, lrs, config, decay):
  """AdamW from its definition: bias-corrected moments, decoupled weight decay, step t's rate lrs[t]."""
  m, v, out = np.zeros_like(p), np.zeros_like(p), []
  for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
    m = config.b1 * m + (1 - config.b1) * g
    v = config.b2 * v + (1 - config.b2) * g * g
    step = (m / (1 - config.b1 ** t)) / (np.sqrt(v / (1 - config.b2 ** t)) + config.eps)
    p = p - lr * (step + (config.weight_decay * p if decay else 0.0))
    out.append(p)
  return out


def test_late_parameters_stay_put_then_train_as_a_fresh_adamw_from_their_start():
  config, params, gradients = _optim_config(), _params(), _gradients(TOTAL)
  late, _ = optim.build_optimizer(config, params, TOTAL, optim.LateStart(START, ('^head/',)))
  plain, schedule = optim.build_optimizer(config, params, TOTAL)
  with_late, without = _run(late, params, gradients), _run(plain, params, gradients)

  for step in range(TOTAL):  # the other parameters train as without a late start (to rounding)
    np.testing.assert_allclose(with_late[step]['towers']['kernel'], without[step]['towers']['kernel'],
                               rtol=1e-6, atol=1e-7)
  for step in range(START):
    jax.tree.map(np.testing.assert_array_equal, with_late[step]['head'], params['head'])

  late_schedule = optim.schedule(config, TOTAL - START)
  lrs = [float(late_schedule(t)) for t in range(TOTAL - START)]
  assert lrs[0] == 0.0 and max(lrs) == pytest.approx(config.lr)  # its own warmup, from its start
  assert float(schedule(START)) < config.lr  # where the run's schedule has gone on decaying
  for name, decay in (('kernel', True), ('bias', False)):
    late_gradients = [np.asarray(g['head'][name]) for g in gradients[START:]]
    expected = _numpy_adamw(np.asarray(params['head'][name]), late_gradients, lrs, config, decay)
    for step, want in zip(range(START, TOTAL), expected):
      np.testing.assert_allclose(with_late[step]['head'][name], want, rtol=1e-5, atol=1e-6)
  moved = np.abs(with_late[-1]['head']['kernel'] - params['head']['kernel']).max()
  assert moved > 1e-2


def test_a_late_start_with_frozen_parameters_leaves_them_frozen_and_clips_the_others_together():
  config, params, gradients = _optim_config(freeze=('^towers/',), clip_norm=0.5), _params(), _gradients(TOTAL)
  tx, _ = optim.build_optimizer(config, params, TOTAL, optim.LateStart(START, ('^head/kernel',)))
  history = _run(tx, params, gradients)
  for step in range(TOTAL):
    np.testing.assert_array_equal(history[step]['towers']['kernel'], params['towers']['kernel'])
  # Before the start only the bias trains: clipped with the late kernel's gradient in the norm, not the frozen one's.
  g = gradients[0]['head']
  norm = np.sqrt(np.sum(np.square(g['kernel'])) + np.sum(np.square(g['bias'])))
  clipped = np.asarray(g['bias']) * min(1.0, 0.5 / norm)
  lr = float(optim.schedule(config, TOTAL)(0))
  expected = _numpy_adamw(np.asarray(params['head']['bias']), [clipped], [lr], config, decay=False)[0]
  np.testing.assert_allclose(history[0]['head']['bias'], expected, rtol=1e-5, atol=1e-6)


def test_a_late_start_that_matches_no_parameter_is_refused_by_pattern():
  with pytest.raises(ValueError, match=re.escape("('^fusoin/',)")):
    optim.build_optimizer(_optim_config(), _params(), TOTAL, optim.LateStart(START, ('^fusoin/',)))


def test_setup_starts_the_fusion_encoder_and_itm_head_late_and_nothing_else():
  config = micro_config()
  config.train.steps, config.loss.itm_start_step = 10, 4
  built = state_lib.setup(config, sharding.make_mesh((1, 1, 1), jax.devices()[:1]), 10)
  params = nn.unbox(built.model.init(jax.random.key(0), *state_lib.dummy_inputs(built.model.spec))['params'])
  tx = built.tx
  state, grads = tx.init(params), jax.tree.map(jnp.ones_like, params)
  for _ in range(2):  # the second step: the first one's rate is the warmup's 0
    updates, state = tx.update(grads, state, params)
  for path, update in jax.tree_util.tree_leaves_with_path(updates):
    late = jax.tree_util.keystr(path).startswith(("['fusion']", "['itm_head']"))
    assert (float(jnp.abs(update).max()) == 0.0) == late, jax.tree_util.keystr(path)
