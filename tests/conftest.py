"""Test setup: 8 fake CPU devices, so that sharding is tested on every machine (set before jax's backend starts)."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # read when jax is imported (helpers imports it)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from helpers import xla_flags  # noqa: E402  # this folder; XLA_FLAGS is read when the backend starts, not at import

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + xla_flags(8)).strip()
# The pytest-xdist workers and the `xmodal` subprocesses start after this and inherit it: their heaps get the huge
# pages that the `xmodal` command re-executes itself for (xmodal/cli/huge_pages.py; the suite ran about 5 % faster).
from xmodal.cli import huge_pages  # noqa: E402  # imports neither jax nor the models

_TUNABLES = huge_pages.tunables_here(os.environ)
if _TUNABLES:
  os.environ['GLIBC_TUNABLES'] = _TUNABLES

import tempfile  # noqa: E402

import jax  # noqa: E402

# Tests compile the same small programs again and again (a fresh closure per test); a persistent cache shared by the
# pytest-xdist workers of one run turns the repeats into lookups. Fresh per run: a stale cache cannot hide a change.
_CACHE = os.environ.setdefault('XMODAL_TEST_COMPILE_CACHE', tempfile.mkdtemp(prefix='xmodal-jax-cache-'))
jax.config.update('jax_compilation_cache_dir', _CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
# The `xmodal` subprocesses (CLI tests) share it too: jax reads its options from the environment at import.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', _CACHE)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')


import pytest  # noqa: E402


@pytest.fixture(scope='session')
def shapes_dir(tmp_path_factory):
  """A prepared xmodal_shapes of 64 train / 16 validation / 16 test / 16 test_hard / 16 validation_hard images (its
  version folder)."""
  from xmodal.data.shapes import builder as shapes
  data_dir = tmp_path_factory.mktemp('tfds')
  config = shapes.shapes_config(seed=0, train_size=64, validation_size=16, test_size=16, test_hard_size=16,
                                validation_hard_size=16)
  builder = shapes.XmodalShapes(config=config, data_dir=str(data_dir))
  builder.download_and_prepare()
  return builder.data_dir


@pytest.fixture(scope='session')
def tiny_model():
  """(model, variables): the tiny preset, initialised once per worker from key 0."""
  from xmodal.config.model import model_config
  from xmodal.models import build, dummy_inputs
  model = build(model_config('tiny'))
  variables = jax.jit(model.init)(jax.random.key(0), *dummy_inputs(model.spec))
  return model, variables
