"""Exact gradient accumulation (train.grad_accum_mode='exact', gradient caching): the whole batch's contrastive loss
and gradients from micro-batches, ITM per micro-batch, the configs it refuses, and its FLOP count."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import micro_config
from xmodal import config as config_lib
from xmodal import sharding
from xmodal.models import build, flops
from xmodal.models.model import ModelSpec
from xmodal.train import state as state_lib
from xmodal.train.bench import synthetic_batch
from xmodal.train.objective import LossWeights
from xmodal.train.step import make_train_step

BATCH = 8


def _keep_gradients() -> optax.GradientTransformation:
  """An 'optimizer' whose state after a step is that step's gradient, and whose update is zero."""
  return optax.GradientTransformation(
      init=lambda params: jax.tree.map(jnp.zeros_like, params),
      update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def _step_gradients(weights: LossWeights, grad_accum: int, mode: str, mesh_shape=(1, 1, 1)):
  """One jitted step of the micro model on a fixed batch of 8: (gradients as numpy, metrics)."""
  config = micro_config(batch_size=BATCH)
  mesh = sharding.make_mesh(mesh_shape, jax.devices()[:int(np.prod(mesh_shape))])
  rules = [tuple(r) for r in config.mesh.rules]
  model = build(config.model)
  tx = _keep_gradients()
  shardings = state_lib.state_shardings(model, tx, mesh, rules)
  state = state_lib.create_state(model, tx, jax.random.key(0), shardings)
  step = jax.jit(make_train_step(model, tx, optax.constant_schedule(0.0), weights, grad_accum=grad_accum,
                                 grad_accum_mode=mode),
                 in_shardings=(shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)))
  batch = synthetic_batch(model.spec, BATCH, np.random.default_rng(1))
  batch['image_ids'][1] = batch['image_ids'][0]  # two captions of one image: multi-positive targets
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state, metrics = step(state, sharding.host_to_global(batch, mesh), jax.random.key(2))
  return jax.tree.map(np.asarray, nn.unbox(state.opt_state)), jax.device_get(metrics)


def _max_relative_difference(a, b) -> float:
  return max(float(np.max(np.abs(x - y)) / (np.max(np.abs(y)) + 1e-12))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.slow  # compiles the micro train step three times
def test_exact_accumulation_equals_the_full_batch_itc_and_sigmoid_gradients():
  weights = LossWeights(itc=1.0, itm=0.0, sigmoid=0.5)
  full, full_metrics = _step_gradients(weights, 1, 'micro')
  exact, exact_metrics = _step_gradients(weights, 4, 'exact')
  micro, _ = _step_gradients(weights, 4, 'micro')
  for key in ('loss', 'itc_loss', 'sigmoid_loss', 'itc_i2t_acc', 'itc_t2i_acc'):
    np.testing.assert_allclose(exact_metrics[key], full_metrics[key], rtol=1e-5, err_msg=key)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), exact, full)
  # The temperature and the sigmoid's scale and bias get theirs from the whole-batch pass alone.
  for name in ('temperature', 'sigmoid_log_scale', 'sigmoid_bias'):
    assert np.abs(full[name]) > 1e-6, name
  # Per-micro-batch losses see 2 negatives instead of 8: a different objective, far outside the tolerance above.
  assert _max_relative_difference(micro, full) > 1e-2


@pytest.mark.slow  # compiles the micro train step three times
def test_exact_accumulation_with_itm_keeps_the_full_batch_itc_and_the_micro_batch_itm():
  weights = LossWeights(itc=1.0, itm=1.0)
  _, full_metrics = _step_gradients(weights, 1, 'micro')
  exact, exact_metrics = _step_gradients(weights, 4, 'exact')
  _, micro_metrics = _step_gradients(weights, 4, 'micro')
  assert np.isfinite(exact_metrics['loss']) and np.isfinite(exact_metrics['grad_norm'])
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(exact))
  np.testing.assert_allclose(exact_metrics['itc_loss'], full_metrics['itc_loss'], rtol=1e-5)
  assert abs(float(micro_metrics['itc_loss']) - float(full_metrics['itc_loss'])) > 1e-3
  # ITM: the same pairs, negatives and key per micro-batch as 'micro' mode.
  for key in ('itm_loss', 'itm_acc'):
    np.testing.assert_allclose(exact_metrics[key], micro_metrics[key], rtol=1e-5, err_msg=key)
  np.testing.assert_allclose(exact_metrics['loss'], exact_metrics['itc_loss'] + exact_metrics['itm_loss'], rtol=1e-5)


@pytest.mark.slow  # compiles the micro train step on one device and on 8
def test_exact_accumulation_on_a_mesh_matches_one_device():
  weights = LossWeights(itc=1.0, itm=1.0, sigmoid=0.5)
  one, one_metrics = _step_gradients(weights, 4, 'exact')
  sharded, sharded_metrics = _step_gradients(weights, 4, 'exact', (4, 2, 1))
  for key in ('loss', 'itc_loss', 'sigmoid_loss', 'itm_loss'):
    np.testing.assert_allclose(sharded_metrics[key], one_metrics[key], rtol=1e-5, err_msg=key)
  # Against each leaf's largest entry, not entry by entry: a sharded sum adds in another order, and its rounding
  # scales with the terms, so a gradient entry that nearly cancels (0.0044 in a leaf up to 8) differs by more than
  # 1e-4 of itself on some CPUs (the worst leaf reads 5e-6 of its largest entry). A sharding mistake is off by a whole
  # term.
  assert _max_relative_difference(sharded, one) < 1e-4, _max_relative_difference(sharded, one)


@pytest.mark.parametrize('key, value', [('loss.momentum', 0.995), ('loss.chunked', True),
                                        ('loss.itc_written_negatives', True)])
def test_exact_accumulation_refuses_the_losses_it_does_not_cache(key, value):
  config = micro_config()
  config.train.update(grad_accum=2, grad_accum_mode='exact')
  config.data.negatives_key = 'negative'  # what itc_written_negatives needs, so that only the mode is wrong
  section, name = key.split('.')
  config[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=f'^{key}:.*grad_accum_mode'):
    config_lib.validate(config)
  config.train.grad_accum_mode = 'micro'
  config_lib.validate(config)


def test_grad_accum_mode_must_be_a_known_one():
  config = micro_config()
  config.train.grad_accum_mode = 'exakt'
  with pytest.raises(config_lib.ConfigError, match=r"^train.grad_accum_mode: 'exakt' is not one of"):
    config_lib.validate(config)
  with pytest.raises(ValueError, match='momentum'):
    make_train_step(None, None, None, LossWeights(momentum=0.995), grad_accum=2, grad_accum_mode='exact')


def test_exact_accumulation_counts_a_second_forward_pass_of_the_towers():
  config = micro_config().model
  spec = ModelSpec.from_config(config)
  v, t = config.vision, config.text
  tokens = 1 + (config.image_size // v.patch_size) ** 2
  layer = lambda n, d, mlp: 2 * n * d * 3 * d + 2 * n * d * d + 2 * 2 * n * n * d + 2 * 2 * n * d * mlp
  patchify = 2 * (tokens - 1) * v.patch_size ** 2 * 3 * v.width
  towers = (patchify + v.depth * layer(tokens, v.width, v.mlp_dim) + t.depth * layer(config.max_text_len, t.width,
                                                                                    t.mlp_dim)
            + 2 * v.width * config.embed_dim + 2 * t.width * config.embed_dim)
  assert flops.train_flops(spec, 16, grad_cache=True) - flops.train_flops(spec, 16) == 16 * towers
  weights = LossWeights(mlm=0.0)
  assert weights.train_flops(spec, 16, grad_cache=True) == flops.train_flops(spec, 16, grad_cache=True)
