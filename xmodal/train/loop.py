"""`xmodal train`: the training loop, read top to bottom as one story.

processes → workdir → mesh → model and optimizer → state (restored or born sharded) → input → update step → metrics →
loop (metrics a step late, checkpoints, validation, preemption) → final checkpoint and evaluation. The steps that
would hide the story (restore or init, the jitted update, reporting a step, validating, the final evaluation) are
functions below it.
"""

from __future__ import annotations

import functools
import json
import logging
import pathlib
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from xmodal import distributed, sharding
from xmodal.data import faults
from xmodal.models import flops
from xmodal.train import evaluation, state as state_lib, workdir as workdir_lib
from xmodal.train.checkpoint import Checkpointer, PreemptionGuard
from xmodal.train.metrics import MetricWriter
from xmodal.train.objective import LossWeights
from xmodal.train.step import caches_gradients, jit_train_step

log = logging.getLogger('xmodal.train')

DAMAGED_CHECKPOINTS = 'damaged_checkpoints'  # in the workdir: checkpoints that failed to restore, moved aside


class NonFiniteLossError(FloatingPointError):
  """The loss or gradient became NaN or infinite (train.nan_policy='stop')."""


def _progress(total: int, initial: int, enabled: bool):
  if not enabled:
    return None
  from tqdm import tqdm
  return tqdm(total=total, initial=initial, desc='train', unit='step', dynamic_ncols=True)


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
          allow_config_change: bool = False) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns the final evaluation results (or {} when stopped early).

  The run holds the workdir's lock from start to end (another live run on it is refused, see workdir.py); resuming
  with a config that changes more than `workdir.FREE_ON_RESUME` needs `allow_config_change`.
  """
  # ------------------------------------------------------------------------------------------ processes, workdir
  distributed.initialize()
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  checkpointer = Checkpointer(workdir / 'checkpoints', save_every=config.train.checkpoint_every,
                              keep=config.train.keep_checkpoints)
  try:
    lock = workdir_lib.claim(workdir, config, resuming=checkpointer.latest_step() is not None,
                             allow_config_change=allow_config_change)
  except Exception:
    checkpointer.close()
    raise
  try:
    return _train(config, workdir, checkpointer)
  finally:
    if lock is not None:
      lock.release()


def _train(config: ml_collections.ConfigDict, workdir: pathlib.Path, checkpointer: Checkpointer) -> dict[str, Any]:
  """The run, once it holds its workdir."""
  primary = jax.process_index() == 0
  if config.train.compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', config.train.compilation_cache_dir)
  total_steps = int(config.train.steps)

  # ------------------------------------------------------------------------------------------------------ mesh
  mesh = sharding.make_mesh(config.mesh.shape)
  rules = [tuple(r) for r in config.mesh.rules]
  log.info('mesh %s over %d devices (%d processes)', dict(mesh.shape), mesh.size, jax.process_count())

  # -------------------------------------------------------------------------------------- model and optimizer
  built = state_lib.setup(config, mesh, total_steps)
  model = built.model

  # ------------------------------------------------------------------------ state: restored, or born sharded
  from xmodal.data import pipeline  # TensorFlow stays out of the module import of the training code
  if primary:
    pipeline.prepare(config.data)
  state, data_state = _initial_state(config, built, checkpointer, workdir / DAMAGED_CHECKPOINTS)
  start_step = int(state.step)
  if primary:
    workdir_lib.record_config(workdir, config, start_step)

  # ----------------------------------------------------------------------------------------------------- input
  # Every split the run will read, checked now: a wrong key or a missing evaluation file fails before the first
  # step, not after training.
  pipeline.check_inputs(config.data, *evaluation.splits_read(config))
  batches = pipeline.train_iterator(config.data, state=data_state)
  batch_sharding = sharding.batch_sharding(mesh)

  # ----------------------------------------------------------------------------------------------- update step
  weights = LossWeights.from_config(config.loss, config.data)
  if weights.length_buckets and jax.process_count() > 1:
    # Whether a batch fits the plan is decided on the host, and each process holds only its part of the batch.
    log.warning('loss.length_buckets is for single-process runs; this one (%d processes) computes every text at '
                'full length', jax.process_count())
    weights = weights.without_buckets()
  compile_step = functools.partial(jit_train_step, built, mesh=mesh, grad_accum=config.train.grad_accum,
                                   grad_accum_mode=config.train.grad_accum_mode,
                                   skip_nonfinite=config.train.nan_policy == 'skip')
  jit_step = compile_step(weights)
  # Before loss.itm_start_step, a step of its own without ITM: it skips the fusion encoder's passes where the full
  # step would multiply them by 0 (the same update; a second compilation).
  early_weights = weights.before_matching()
  early_step = None if early_weights is None else compile_step(early_weights)
  # A batch that the length buckets do not fit (loss.length_buckets) runs a full-length step, compiled when first
  # needed: the same update up to float rounding.
  full_length_steps = {}

  def step_for(step: int, host_batch: dict):
    step_weights, step_fn = (early_weights, early_step) if is_early(step) else (weights, jit_step)
    if step_weights.buckets_fit(host_batch):
      return step_fn
    if step_weights not in full_length_steps:
      log.info('step %d: its texts do not fit loss.length_buckets; running it at full length', step)
      full_length_steps[step_weights] = compile_step(step_weights.without_buckets())
    return full_length_steps[step_weights]
  rng = jax.random.key(config.train.seed + 1)

  # --------------------------------------------------------------------------------------------------- metrics
  grad_cache = caches_gradients(config.train.grad_accum, config.train.grad_accum_mode)
  step_flops = weights.train_flops(model.spec, config.data.batch_size, grad_cache)
  early_flops = step_flops if early_weights is None else early_weights.train_flops(model.spec,
                                                                                   config.data.batch_size, grad_cache)
  peak = flops.peak_flops_per_device(jax.devices()[0].device_kind, config.train.peak_flops_per_device)
  writer = MetricWriter(workdir, enabled=primary, resume_step=start_step)
  log.info('%.2fM parameters, %.3f TFLOP per step', built.num_params / 1e6, step_flops / 1e12)
  if early_step is not None:
    log.info('ITM from step %d; %.3f TFLOP per step before it', weights.itm_start, early_flops / 1e12)
  progress = _progress(total_steps, start_step, primary and config.train.progress)
  is_early = lambda step: early_step is not None and step <= weights.itm_start  # loop step s runs state.step s - 1
  report = lambda step, *rest: _report_step(
      step, *rest, config=config, peak=peak, writer=writer, batches=batches, progress=progress,
      step_flops=early_flops if is_early(step) else step_flops)
  validating = bool(config.train.eval_every and config.eval.validation_split)
  validation_batches = {}  # host batches of the validation slice, read once per run

  # ------------------------------------------------------------------------------------------------------ loop
  pending = None  # (step, metrics) of the step whose metrics are not fetched yet
  last_time = time.perf_counter()
  stopped_early = False
  with PreemptionGuard() as guard, jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    for step in range(start_step + 1, total_steps + 1):
      host_batch = _next_batch(batches, guard)
      if host_batch is None:
        log.warning('stop requested while waiting for the batch of step %d; checkpointing step %d', step, step - 1)
        stopped_early = True
        break
      batch = sharding.host_to_global(host_batch, mesh, batch_sharding)
      state, metrics = step_for(step, host_batch)(state, batch, rng)
      if pending is not None:
        now = time.perf_counter()
        report(*pending, now - last_time)
        last_time = now
      pending = (step, metrics)
      if step % config.train.checkpoint_every == 0:
        report(*pending, time.perf_counter() - last_time)  # never checkpoint a state that is not finite
        pending, last_time = None, time.perf_counter()
        checkpointer.save(step, state, gather_data_states(batches.state()))
      if validating and (step % config.train.eval_every == 0 or step == total_steps):
        _validate(config, model, state.params, mesh, step, writer, validation_batches)
      if guard.should_stop(step):
        log.warning('stopping at step %d on request; checkpointing', step)
        stopped_early = True
        break
    if pending is not None:
      report(*pending, time.perf_counter() - last_time)
    if progress is not None:
      progress.close()  # the final checkpoint and evaluation are not training steps: they get their own bars

    # ------------------------------------------------------------------------ final checkpoint and evaluation
    final_step = int(state.step)
    checkpointer.save(final_step, state, gather_data_states(batches.state()), force=True)
    checkpointer.wait()
    results = {}
    if not stopped_early:
      results = _evaluate_final(config, model, state.params, mesh, final_step, writer, workdir, primary)
  writer.close()
  if primary and not stopped_early:
    _write_curves(workdir)
  checkpointer.close()
  return results


def _next_batch(batches, guard: PreemptionGuard) -> dict | None:
  """The next host batch, or None when SIGTERM/SIGINT arrives while the input pipeline has none ready.

  Waiting on data is where a stalled or empty source leaves a run; the signal must still end it. With one process
  the loop then checkpoints the last step and stops, as at any step boundary. With several, the others may already
  wait in the step's collectives for this one, so no checkpoint can be agreed: the process stops with the error.
  """
  try:
    return batches.next(stop=lambda: guard.requested)
  except faults.InputInterrupted:
    if jax.process_count() > 1:
      raise
    return None


def _initial_state(config: ml_collections.ConfigDict, built: state_lib.Setup, checkpointer: Checkpointer,
                   damaged_dir: pathlib.Path) -> tuple[state_lib.TrainState, dict | None]:
  """(state, this process's data-iterator state) of the newest checkpoint that restores (newer, damaged ones are
  moved to `damaged_dir`), else a state born sharded and None."""
  if checkpointer.latest_step() is not None:
    state, saved = checkpointer.restore(built.abstract_state(), damaged_dir=damaged_dir)
    log.info('resumed from step %d', int(state.step))
    return state, saved['processes'][jax.process_index()]
  state = state_lib.create_state(built.model, built.tx, jax.random.key(config.train.seed), built.shardings,
                                 params=_pretrained_params(config, built.model), momentum=built.momentum)
  return state, None


def _report_step(step: int, metrics: dict, seconds: float, *, config: ml_collections.ConfigDict, step_flops: float,
                 peak: float | None, writer: MetricWriter, batches, progress) -> None:
  """Fetches a step's metrics (already computed: the next step is in flight), checks and writes them.

  A non-finite loss or gradient raises NonFiniteLossError (train.nan_policy='stop') or is logged ('skip': the step
  dropped its update). Every train.log_every steps and at the last, the metrics with step time, throughput and MFU
  go to the writer beside the input pipeline's counters; the progress bar moves on every step.
  """
  values = {k: float(v) for k, v in jax.device_get(metrics).items()}
  if not values.pop('finite'):
    message = f'non-finite loss or gradient at step {step}: loss={values["loss"]}, grad_norm={values["grad_norm"]}'
    if config.train.nan_policy == 'stop':
      raise NonFiniteLossError(message + ' (train.nan_policy=stop)')
    log.warning('%s; update skipped (train.nan_policy=skip)', message)
  values['step_time'] = seconds
  values['examples_per_sec'] = config.data.batch_size / seconds
  values['tflops_per_device'] = step_flops / seconds / jax.device_count() / 1e12
  if peak:
    values['mfu'] = values['tflops_per_device'] * 1e12 / peak
  if step % config.train.log_every == 0 or step == int(config.train.steps):
    writer.write(step, values)
    stats = batches.stats()
    writer.write(step, stats, prefix='data/')
    skipped = faults.describe_skips(stats)
    if skipped:
      log.info('step %d input: %s', step, skipped)
  if progress is not None:
    progress.set_postfix(loss=f'{values["loss"]:.3f}', itc=f'{values["itc_loss"]:.3f}', refresh=False)
    progress.update(step - progress.n)


def _validate(config: ml_collections.ConfigDict, model, params, mesh, step: int, writer: MetricWriter,
              cache: dict) -> None:
  """Validation metrics of `params`, written under 'val/' (the curves' source); `cache` keeps the split's batches."""
  start = time.perf_counter()
  results = evaluation.validate(config, model, params, mesh, cache=cache)
  writer.write(step, evaluation.flatten(results), prefix='val/')
  log.info('step %d validation (%.1f s): ITC R@1 t2i %.2f i2t %.2f%s', step, time.perf_counter() - start,
           results['itc']['t2i_r1'], results['itc']['i2t_r1'],
           f", binding ITC {results['binding']['itc']:.1f} ITM {results['binding']['itm']:.1f}"
           if 'binding' in results else '')


def _evaluate_final(config: ml_collections.ConfigDict, model, params, mesh, step: int, writer: MetricWriter,
                    workdir: pathlib.Path, primary: bool) -> dict[str, Any]:
  """The final evaluation on the test split: written under 'eval/', to WORKDIR/eval.json and as the table."""
  results = evaluation.evaluate(config, model, params, mesh, progress=primary and config.train.progress)
  writer.write(step, evaluation.flatten(results), prefix='eval/')
  if primary:
    (workdir / 'eval.json').write_text(json.dumps(results, indent=2) + '\n')
    print(evaluation.format_table(results), flush=True)
  return results


def _write_curves(workdir: pathlib.Path) -> None:
  """WORKDIR/curves.png from metrics.jsonl; a missing plotting library costs the picture, not the run."""
  from xmodal.train import curves
  try:
    path = curves.write_curves(workdir / 'metrics.jsonl', workdir / 'curves.png', title=workdir.name)
  except ImportError as e:
    log.warning('curves.png not written: %s', e)
  else:
    log.info('learning curves: %s', path)


def gather_data_states(local: dict) -> dict:
  """Every process's input-iterator state, for the checkpoint (orbax's JSON item is written by process 0 only)."""
  if jax.process_count() == 1:
    return {'processes': [local]}
  from jax.experimental import multihost_utils
  blob = json.dumps(local).encode()
  size = int(np.max(multihost_utils.process_allgather(np.asarray([len(blob)]))))
  rows = multihost_utils.process_allgather(np.frombuffer(blob.ljust(size, b' '), np.uint8))
  return {'processes': [json.loads(bytes(row).decode()) for row in np.asarray(rows).reshape(jax.process_count(), -1)]}


def _pretrained_params(config: ml_collections.ConfigDict, model):
  """Parameters with imported towers when config.init names checkpoints, else None (random initialisation)."""
  if not (config.init.text or config.init.image):
    return None
  from xmodal.models import dummy_inputs
  from xmodal.pretrained import load_pretrained
  params = nn.unbox(model.init(jax.random.key(config.train.seed), *dummy_inputs(model.spec))['params'])
  params, report = load_pretrained(params, config.model, config.init.text, config.init.image,
                                   config.init.expected_unused)
  log.info('pretrained towers loaded:\n%s', report.summary())
  return jax.tree.map(jnp.asarray, params)
