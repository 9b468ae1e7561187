"""The train step compiles once: steps after the first, run the way xmodal/train/loop.py runs them, compile nothing."""

import contextlib
import logging

import flax.linen as nn
import jax
import numpy as np
import pytest

from helpers import micro_config
from xmodal import sharding
from xmodal.models import build
from xmodal.train import optim, state as state_lib
from xmodal.train.bench import synthetic_batch
from xmodal.train.objective import LossWeights
from xmodal.train.step import make_train_step

_LOWER_EVENT = '/jax/core/compile/jaxpr_to_mlir_module_duration'  # every in-memory cache miss lowers, cache or not


class _CompileLog(logging.Handler):
  """Collects jax's 'Compiling <name> ...' and cache-miss explanations (jax_log_compiles, jax_explain_cache_misses)."""

  def __init__(self):
    super().__init__(logging.DEBUG)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


@contextlib.contextmanager
def _count_compilations():
  log, lowerings = _CompileLog(), []
  listener = lambda event, duration, **kwargs: lowerings.append(event) if event == _LOWER_EVENT else None
  logger = logging.getLogger('jax')
  old_level = logger.level
  logger.addHandler(log)
  logger.setLevel(logging.WARNING)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    with jax.log_compiles(True), jax.explain_cache_misses(True):
      yield lowerings, log.messages
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
    logger.removeHandler(log)
    logger.setLevel(old_level)


@pytest.mark.slow  # compiles and runs the micro train step on a 2x2x2 mesh
@pytest.mark.parametrize('mesh_shape', [(2, 2, 2)])  # fsdp and tensor too: the shardings most likely to drift
def test_train_steps_after_the_first_compile_nothing(mesh_shape):
  config = micro_config(batch_size=16)
  mesh = sharding.make_mesh(mesh_shape)
  rules = [tuple(r) for r in config.mesh.rules]
  model = build(config.model)
  abstract = nn.unbox(state_lib.abstract_params(model))
  tx, lr_schedule = optim.build_optimizer(config.optim, abstract, 10)
  shardings = state_lib.state_shardings(model, tx, mesh, rules)
  state = state_lib.create_state(model, tx, jax.random.key(0), shardings)
  batch_sharding = sharding.batch_sharding(mesh)
  # Exactly the loop's jit: explicit in/out shardings, state donated.
  step_fn = make_train_step(model, tx, lr_schedule, LossWeights.from_config(config.loss))
  jit_step = jax.jit(step_fn, in_shardings=(shardings, batch_sharding, sharding.replicated(mesh)),
                     out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  rng = jax.random.key(1)
  host = np.random.default_rng(0)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    batch = sharding.host_to_global(synthetic_batch(model.spec, 16, host), mesh, batch_sharding)
    state, metrics = jit_step(state, batch, rng)
    jax.device_get(metrics)
    with _count_compilations() as (lowerings, messages):
      for _ in range(3):
        batch = sharding.host_to_global(synthetic_batch(model.spec, 16, host), mesh, batch_sharding)
        state, metrics = jit_step(state, batch, rng)
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}  # the loop's report()
        int(state.step)
  assert np.isfinite(values['loss'])
  assert int(state.step) == 4
  compiled = [m for m in messages if m.startswith('Compiling')]
  assert not lowerings and not compiled, '\n'.join(messages)


def test_the_compile_counter_sees_a_recompile():
  """The counter itself: a new input shape must register (else the test above could pass vacuously)."""
  fn = jax.jit(lambda x: x * 3.0 + 1.0)
  fn(np.zeros(3, np.float32))
  with _count_compilations() as (lowerings, messages):
    fn(np.zeros(3, np.float32))
    assert not lowerings and not [m for m in messages if m.startswith('Compiling')]
    fn(np.zeros(5, np.float32))
  assert lowerings and [m for m in messages if m.startswith('Compiling')]
