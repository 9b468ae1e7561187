"""The jitted train step alone, on synthetic batches of the config's shapes (no input pipeline): `xmodal bench`.

Reports compile time, median steady-state step time, examples/s, model TFLOP/s per device and MFU, peak memory,
parameter count and FLOPs per step. MFU is given against both peaks, each named in the result: the datasheet's
(the device table in xmodal/models/flops.py, or `train.peak_flops_per_device`; None on CPUs, which no table knows) and
a large jitted matmul timed after every step (`mfu_measured_matmul`). `mfu` itself is the datasheet's where known,
else the measured one, and `mfu_basis` says which. `run` returns them as one dict; `xmodal bench`
(xmodal/cli/bench.py) prints it, the last line as JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from xmodal import sharding
from xmodal.models import buckets, flops
from xmodal.train import state as state_lib
from xmodal.train.objective import LossWeights
from xmodal.train.step import caches_gradients, jit_train_step


def matmul_timer(size: int = 2048, dtype=jnp.float32):
  """A compiled large square matmul; calling the result times one run and returns its FLOP/s."""
  a = jax.random.normal(jax.random.key(0), (size, size), dtype)
  b = jax.random.normal(jax.random.key(1), (size, size), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, b).block_until_ready()

  def time_one() -> float:
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    return 2 * size ** 3 / (time.perf_counter() - start)
  return time_one


def measure_matmul_peak(size: int = 2048, dtype=jnp.float32, repeats: int = 10) -> float:
  """FLOP/s of a large jitted square matmul on the default device: the machine's practical peak."""
  time_one = matmul_timer(size, dtype)
  return statistics.median([time_one() for _ in range(repeats)])


def synthetic_batch(spec, batch: int, rng: np.random.Generator, negatives: bool = False,
                    regions: tuple[int, int] | None = None, grounded: bool = False, relations: bool = False,
                    length_buckets: Sequence[buckets.Bucket] = ()) -> dict[str, np.ndarray]:
  """Random inputs of the model's shapes; captions of random length; distinct image ids; with `negatives`, a written
  negative caption per example too (as data.negatives_key gives); with `regions` (R, phrase length), R boxes of
  random phrases per example (as data.region_boxes_key gives), and with `grounded` each caption token's region
  index or -1 (as data.caption_grounding gives); with `relations`, a relation swap per example (as
  data.relation_swaps gives). Texts' lengths follow `length_buckets` where given (`_text_lengths`)."""
  length = spec.max_text_len

  def texts() -> tuple[np.ndarray, np.ndarray]:
    lengths = _text_lengths(length, batch, rng, length_buckets)
    return (rng.integers(5, spec.text.vocab_size, size=(batch, length)).astype(np.int32),
            (np.arange(length)[None] < lengths[:, None]).astype(np.int32))

  ids, mask = texts()
  out = {'images': rng.normal(size=(batch, spec.image_size, spec.image_size, 3)).astype(np.float32),
         'text_ids': ids, 'text_mask': mask, 'image_ids': np.arange(batch, dtype=np.int64)}
  if negatives:
    out['negative_ids'], out['negative_mask'] = texts()
    out['negative_valid'] = np.ones((batch,), bool)
  if relations:
    out['relation_ids'], out['relation_mask'] = texts()
    out['relation_valid'] = np.ones((batch,), bool)
  if regions:
    count, phrase_len = regions
    corner = rng.uniform(0.0, 0.6, size=(batch, count, 2))
    out['region_boxes'] = np.concatenate([corner, corner + 0.3], axis=-1).astype(np.float32)
    out['region_ids'] = rng.integers(5, spec.text.vocab_size, size=(batch, count, phrase_len), dtype=np.int32)
    out['region_mask'] = np.ones((batch, count, phrase_len), np.int32)
    out['region_valid'] = np.ones((batch, count), bool)
    if grounded:
      out['text_regions'] = rng.integers(-1, count, size=(batch, length), dtype=np.int32)
  return out


def _text_lengths(length: int, batch: int, rng: np.random.Generator, plan: Sequence[buckets.Bucket]) -> np.ndarray:
  """Random text lengths, uniform over [length / 3, length]; with a bucket `plan` (loss.length_buckets), each
  bucket's share of the rows and a quarter more uniform up to its length, above the one before (the rows left
  above the last), in random order: the step a bench times is then the bucketed one, as on data the plan fits.
  (ITM's hard negatives repeat some texts and leave out others: at the plan's exact shares a batch often would not
  fit.)"""
  if not plan:
    return rng.integers(length // 3, length + 1, size=batch)
  bounds = [length // 3 - 1]
  counts = []
  for share, top in plan:
    counts.append(min(math.ceil(1.25 * share * batch), batch - sum(counts)))
    bounds.append(top)
  counts.append(batch - sum(counts))
  bounds.append(length)
  bounds[0] = min(bounds[0], bounds[1] - 1)
  lengths = np.concatenate([rng.integers(low + 1, high + 1, size=count)
                            for low, high, count in zip(bounds, bounds[1:], counts)])
  return rng.permutation(lengths)


def compiler_options(config: ml_collections.ConfigDict) -> dict | None:
  """XLA options for the train step's compile, from `train.compiler_options` ((name, value) pairs, values typed:
  (('xla_cpu_use_onednn', True),)) when the config has that knob; None otherwise."""
  pairs = config.train.get('compiler_options', ()) or ()
  return {str(name): value for name, value in pairs} or None


@dataclasses.dataclass
class CompiledStep:
  """The config's jitted train step, compiled, with its state, one synthetic batch and the context it runs in.

  `xmodal bench` times it alone; benchmarks/compare.py alternates it with an eager PyTorch step. Call `run_one()`
  inside `context()`: one step, waited for, its metrics returned (the state is donated and replaced).
  """
  built: state_lib.Setup
  weights: LossWeights
  mesh: jax.sharding.Mesh
  rules: list
  compiled: Any
  state: state_lib.TrainState
  batch: dict
  rng: jax.Array
  compile_seconds: float
  options: dict | None
  grad_cache: bool = False  # the step accumulates by gradient caching (its towers run forward twice)

  @property
  def batch_size(self) -> int:
    return int(self.batch['images'].shape[0])

  @property
  def flops_per_step(self) -> int:
    return self.weights.train_flops(self.built.model.spec, self.batch_size, self.grad_cache)

  def context(self) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nn.logical_axis_rules(self.rules))
    return stack

  def run_one(self) -> dict:
    self.state, metrics = self.compiled(self.state, self.batch, self.rng)
    jax.block_until_ready(metrics)
    return metrics


def compile_step(config: ml_collections.ConfigDict, total_steps: int) -> CompiledStep:
  """Builds the config's model, optimizer (its schedule over `total_steps`) and state, a synthetic batch of the
  config's shapes, and compiles the jitted step on them (`train.compiler_options` applied)."""
  mesh = sharding.make_mesh(config.mesh.shape)
  rules = [tuple(r) for r in config.mesh.rules]
  built = state_lib.setup(config, mesh, max(total_steps, 2))
  model = built.model
  weights = LossWeights.from_config(config.loss, config.data)
  accum, accum_mode = config.train.grad_accum, config.train.grad_accum_mode
  jit_step = jit_train_step(built, weights, mesh, grad_accum=accum, grad_accum_mode=accum_mode)
  # Outside the rules context: init's flat-then-reshaped DenseGeneral kernels must not meet activation rules.
  state = state_lib.create_state(model, built.tx, jax.random.key(0), built.shardings, momentum=built.momentum)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    regions = (weights.regions_per_example, weights.phrase_len) if weights.regions_per_example else None
    batch = sharding.host_to_global(synthetic_batch(model.spec, config.data.batch_size, np.random.default_rng(0),
                                                    negatives=bool(config.data.negatives_key), regions=regions,
                                                    grounded=weights.grounded_captions,
                                                    relations=weights.relation > 0,
                                                    length_buckets=weights.length_buckets), mesh)
    rng = jax.random.key(1)
    start = time.perf_counter()
    options = compiler_options(config)
    compiled = jit_step.lower(state, batch, rng).compile(compiler_options=options)
    compile_seconds = time.perf_counter() - start
  return CompiledStep(built, weights, mesh, rules, compiled, state, batch, rng, compile_seconds, options,
                      caches_gradients(accum, accum_mode))


def run(config: ml_collections.ConfigDict, steps: int = 20) -> dict:
  step = compile_step(config, steps)
  device_kind = jax.devices()[0].device_kind
  # Two peaks, both reported. The datasheet's (the device table, or train.peak_flops_per_device) is the machine's and
  # gives `mfu` wherever it is known. A large matmul timed after every step, best of 3 (the first runs on caches the
  # step has just evicted: a 1-step bench of `base` read 31 GFLOP/s against 82), is what the library reaches on this
  # machine under the same load; CPUs have no table entry, so there it is `mfu`'s basis.
  datasheet = flops.peak_flops_per_device(device_kind, config.train.peak_flops_per_device)
  on_cpu = jax.devices()[0].platform == 'cpu'
  time_matmul = matmul_timer(2048 if on_cpu else 8192, jnp.float32 if on_cpu else jnp.dtype(config.model.dtype))
  peaks = []
  with step.context():
    metrics = step.run_one()
    time_matmul()  # warm, in the same context as the timed calls (a new context may mean a new compile)
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      metrics = step.run_one()
      times.append(time.perf_counter() - start)
      peaks.append(max(time_matmul() for _ in range(3)))
  measured = statistics.median(peaks)
  step_time = statistics.median(times)
  batch_size = step.batch_size
  step_flops = step.flops_per_step
  per_device = step_flops / step_time / jax.device_count()
  memory = None
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    memory = int(stats['peak_bytes_in_use'])
  else:
    analysis = step.compiled.memory_analysis()
    if analysis is not None:
      memory = int(analysis.temp_size_in_bytes + analysis.argument_size_in_bytes + analysis.output_size_in_bytes)
  return {
      'device': device_kind, 'devices': jax.device_count(), 'batch': batch_size,
      'params': step.built.num_params,
      'flops_per_step': step_flops, 'compile_s': round(step.compile_seconds, 2), 'step_s': step_time,
      'step_s_min': min(times), 'examples_per_s': batch_size / step_time,
      'tflops_per_device': per_device / 1e12,
      'mfu': per_device / (datasheet or measured),
      'mfu_basis': 'datasheet' if datasheet else 'measured matmul',
      'mfu_datasheet': per_device / datasheet if datasheet else None,
      'mfu_measured_matmul': per_device / measured,
      'peak_tflops_datasheet': datasheet / 1e12 if datasheet else None,
      'peak_tflops_measured_matmul': measured / 1e12,
      'peak_memory_bytes': memory, 'loss': float(metrics['loss']), 'steps': steps,
      'compiler_options': step.options or {},
  }
