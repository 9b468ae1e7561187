"""loss.itm_start_step: ITM (and the relation term) count from a step on; before it the fusion encoder and ITM head
get no gradient and the loss is the other terms' alone."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import micro_config
from xmodal import config as config_lib
from xmodal.models import build
from xmodal.train import state as state_lib
from xmodal.train.bench import synthetic_batch
from xmodal.train.objective import LossWeights, compute_loss


def _norms(grads, prefix):
  return [float(jnp.linalg.norm(g)) for path, g in jax.tree_util.tree_leaves_with_path(grads)
          if jax.tree_util.keystr(path).startswith(prefix)]


def test_before_its_start_step_itm_adds_nothing_and_from_it_everything():
  model = build(micro_config().model)
  params = nn.unbox(model.init(jax.random.key(0), *state_lib.dummy_inputs(model.spec))['params'])
  batch = jax.tree.map(jnp.asarray, synthetic_batch(model.spec, 8, np.random.default_rng(0)))
  rng = jax.random.key(1)
  late = LossWeights(itm_start=5)
  loss_and_grads = lambda weights, step: jax.value_and_grad(
      lambda p: compute_loss(model, p, batch, rng, weights, step)[0])(params)

  before, before_grads = loss_and_grads(late, jnp.asarray(4))
  without_itm, _ = loss_and_grads(LossWeights(itm=0.0), jnp.asarray(4))
  np.testing.assert_allclose(before, without_itm, rtol=1e-6)
  for prefix in ("['fusion']", "['itm_head']"):
    assert _norms(before_grads, prefix) and max(_norms(before_grads, prefix)) == 0.0, prefix

  at_start, start_grads = loss_and_grads(late, jnp.asarray(5))
  from_zero, zero_grads = loss_and_grads(LossWeights(), jnp.asarray(5))
  np.testing.assert_allclose(at_start, from_zero, rtol=1e-6)
  assert at_start > before
  assert min(_norms(start_grads, "['itm_head']")) > 0
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
  jax.tree.map(close, start_grads, zero_grads)


@pytest.mark.parametrize('start, message', [(-1, 'must be >= 0'), (100, 'leaves ITM no step')])
def test_a_start_step_outside_the_run_is_refused_by_name(start, message):
  config = micro_config()
  config.train.steps = 100
  config.loss.itm_start_step = start
  with pytest.raises(ValueError, match=f'loss.itm_start_step.*{message}'):
    config_lib.validate(config)


def test_the_loops_step_before_the_start_is_the_same_update_without_the_fusion_passes():
  model = build(micro_config().model)
  params = nn.unbox(model.init(jax.random.key(0), *state_lib.dummy_inputs(model.spec))['params'])
  batch = jax.tree.map(jnp.asarray, synthetic_batch(model.spec, 8, np.random.default_rng(0)))
  late = LossWeights(itm_start=5)
  assert LossWeights().before_matching() is None
  value_and_grad = lambda weights: jax.value_and_grad(
      lambda p: compute_loss(model, p, batch, jax.random.key(1), weights, jnp.asarray(4)), has_aux=True)(params)
  (loss, metrics), grads = value_and_grad(late)
  (early_loss, early_metrics), early_grads = value_and_grad(late.before_matching())
  np.testing.assert_allclose(early_loss, loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8), early_grads, grads)
  assert 'itm_loss' in metrics and 'itm_loss' not in early_metrics
