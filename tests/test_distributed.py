"""Two processes on this machine form one run: global arrays, reductions, preemption agreement, checkpoints."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from helpers import ROOT, xla_flags
from xmodal import distributed
from xmodal.train.checkpoint import Checkpointer

PROCESSES = 2
DEVICES_PER_PROCESS = 2
BATCH, DIM = 16, 8

# Each process owns half of a fixed global batch and feeds it with make_array_from_process_local_data.
_WORKER = textwrap.dedent('''
  import json, os, signal, sys
  from xmodal import distributed
  distributed.initialize()  # from XMODAL_* variables

  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from xmodal.train.checkpoint import Checkpointer, PreemptionGuard, any_process

  BATCH, DIM, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
  rng = np.random.default_rng(0)
  images, texts = rng.normal(size=(2, BATCH, DIM)).astype(np.float32)
  mesh = Mesh(np.array(jax.devices()), ('data',))
  batch = NamedSharding(mesh, P('data'))
  share = BATCH // jax.process_count()
  rows = slice(jax.process_index() * share, (jax.process_index() + 1) * share)
  image = jax.make_array_from_process_local_data(batch, images[rows], (BATCH, DIM))
  text = jax.make_array_from_process_local_data(batch, texts[rows], (BATCH, DIM))

  @jax.jit
  def contrastive(image, text):
    logits = image @ text.T / 0.07  # every row meets all global columns: a cross-process all-gather
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.diagonal(logits))

  loss = float(contrastive(image, text))

  # Only process 1 is "preempted"; both must decide to stop at the same step.
  with PreemptionGuard() as guard:
    if jax.process_index() == 1:
      os.kill(os.getpid(), signal.SIGTERM)
    stops = [guard.should_stop(step) for step in (1, 2)]
  nobody = any_process(False)

  # A collective checkpoint of a state sharded over both processes' devices.
  state = {'w': jax.make_array_from_process_local_data(batch, images[rows], (BATCH, DIM))}
  with Checkpointer(workdir, save_every=1, keep=2) as ckpt:
    ckpt.save(5, state, {'position': 5})
    ckpt.wait()
    back, data_state = ckpt.restore({'w': jax.ShapeDtypeStruct((BATCH, DIM), jnp.float32, sharding=batch)})
  shards = sorted(back['w'].addressable_shards, key=lambda s: s.index[0].start)
  local = np.concatenate([np.asarray(s.data) for s in shards])
  print('RESULT ' + json.dumps({
      'process': jax.process_index(), 'processes': jax.process_count(), 'devices': jax.device_count(),
      'primary': distributed.is_primary(), 'loss': loss, 'stops': stops, 'nobody': nobody,
      'restored_ok': bool(np.array_equal(local, images[rows])), 'data_state': data_state}), flush=True)
''')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _reference_loss() -> float:
  """The same loss in float64 numpy on the whole batch, one process."""
  images, texts = np.random.default_rng(0).normal(size=(2, BATCH, DIM)).astype(np.float32).astype(np.float64)
  logits = images @ texts.T / 0.07
  top = logits.max(axis=1)
  logsumexp = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
  return float(np.mean(logsumexp - np.diagonal(logits)))


@pytest.fixture(scope='module')
def two_process_run(tmp_path_factory):
  """Launches the worker as 2 processes × 2 CPU devices; returns (results by process, checkpoint dir)."""
  workdir = tmp_path_factory.mktemp('ckpt')
  port = _free_port()
  procs = []
  for pid in range(PROCESSES):
    env = dict(os.environ, XMODAL_COORDINATOR=f'127.0.0.1:{port}', XMODAL_NUM_PROCESSES=str(PROCESSES),
               XMODAL_PROCESS_ID=str(pid), JAX_PLATFORMS='cpu',
               XLA_FLAGS=xla_flags(DEVICES_PER_PROCESS))
    procs.append(subprocess.Popen([sys.executable, '-c', _WORKER, str(BATCH), str(DIM), str(workdir)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=60)[0])
  finally:
    for proc in procs:  # a hung or failed peer must not outlive the test
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  for proc, out in zip(procs, outputs):
    assert proc.returncode == 0, out[-3000:]
  results = [json.loads(line[len('RESULT '):]) for out in outputs for line in out.splitlines()
             if line.startswith('RESULT ')]
  return sorted(results, key=lambda r: r['process']), workdir


@pytest.mark.slow  # the two-process run (module fixture) starts two JAX processes
def test_two_processes_form_one_run_with_all_devices(two_process_run):
  results, _ = two_process_run
  assert [r['process'] for r in results] == [0, 1]
  assert all(r['processes'] == PROCESSES and r['devices'] == PROCESSES * DEVICES_PER_PROCESS for r in results)
  assert [r['primary'] for r in results] == [True, False]


@pytest.mark.slow  # the two-process run (module fixture) starts two JAX processes
def test_global_batch_reduction_over_two_processes_equals_single_process_value(two_process_run):
  results, _ = two_process_run
  for r in results:
    np.testing.assert_allclose(r['loss'], _reference_loss(), rtol=1e-5)


@pytest.mark.slow  # the two-process run (module fixture) starts two JAX processes
def test_sigterm_on_one_process_stops_every_process_at_the_same_step(two_process_run):
  results, _ = two_process_run
  assert [r['stops'] for r in results] == [[True, True], [True, True]]
  assert [r['nobody'] for r in results] == [False, False]


@pytest.mark.slow  # the two-process run (module fixture) starts two JAX processes
def test_checkpoint_written_by_two_processes_restores_in_one_process_onto_two_devices(two_process_run):
  results, workdir = two_process_run
  assert all(r['restored_ok'] and r['data_state'] == {'position': 5} for r in results)
  mesh = Mesh(np.array(jax.devices()[:2]), ('data',))
  target = {'w': jax.ShapeDtypeStruct((BATCH, DIM), jnp.float32, sharding=NamedSharding(mesh, P('data')))}
  with Checkpointer(workdir, save_every=1, keep=2) as ckpt:
    state, data_state = ckpt.restore(target)
  images = np.random.default_rng(0).normal(size=(2, BATCH, DIM)).astype(np.float32)[0]
  np.testing.assert_array_equal(np.asarray(state['w']), images)
  assert data_state == {'position': 5}


def test_single_process_initialize_is_a_no_op(monkeypatch):
  for name in ('XMODAL_COORDINATOR', 'XMODAL_PROCESS_ID', 'XMODAL_DISTRIBUTED', 'SLURM_JOB_ID',
               'OMPI_COMM_WORLD_SIZE'):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv('XMODAL_NUM_PROCESSES', '1')
  distributed.initialize()
  monkeypatch.delenv('XMODAL_NUM_PROCESSES')
  distributed.initialize()
  assert not jax.distributed.is_initialized()
  assert distributed.is_primary() and jax.process_count() == 1


def test_partial_layout_is_an_error_naming_what_is_missing(monkeypatch):
  monkeypatch.delenv('XMODAL_COORDINATOR', raising=False)
  monkeypatch.delenv('XMODAL_PROCESS_ID', raising=False)
  monkeypatch.setenv('XMODAL_NUM_PROCESSES', '4')
  with pytest.raises(ValueError, match='XMODAL_COORDINATOR, XMODAL_PROCESS_ID'):
    distributed.initialize()


def test_slurm_batch_script_without_srun_is_told_to_use_srun(monkeypatch):
  for name in ('XMODAL_COORDINATOR', 'XMODAL_NUM_PROCESSES', 'XMODAL_PROCESS_ID', 'XMODAL_DISTRIBUTED',
               'SLURM_STEP_NODELIST', 'SLURM_STEP_NUM_TASKS'):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv('SLURM_JOB_ID', '42')
  monkeypatch.setenv('SLURM_NTASKS', '8')
  with pytest.raises(RuntimeError, match='srun'):
    distributed.initialize()
  monkeypatch.setenv('SLURM_NTASKS', '1')
  assert distributed.detect_cluster() is None


_LAUNCHED = textwrap.dedent('''
  import sys
  from xmodal import distributed
  distributed.initialize()
  import jax
  print('launched', jax.process_index(), jax.process_count(), jax.device_count(), *sys.argv[1:], flush=True)
  if sys.argv[1:] == ['--fail'] and jax.process_index() == 1:
    raise RuntimeError('process 1 fails')
  if sys.argv[1:] == ['--fail']:
    import time; time.sleep(120)  # a survivor that would hang: the launcher must kill it
''')


def _launch(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
  script = tmp_path / 'launched.py'
  script.write_text(_LAUNCHED)
  env = dict(os.environ, XMODAL_CMD=f'{sys.executable} {script}', KILL_GRACE='1')
  done = subprocess.run(['bash', str(ROOT / 'launch' / 'local.sh'), '-n', '2', '-d', '2', '-l', str(tmp_path / 'logs'),
                         '--', *args], env=env, capture_output=True, text=True, timeout=60)
  logs = [(tmp_path / 'logs' / f'process_{i}.log').read_text() for i in range(2)]
  return done, logs


def test_local_launcher_runs_one_job_of_two_processes_with_arguments_passed_through(tmp_path):
  done, logs = _launch(tmp_path, '--config', 'configs/x.py', '--workdir', 'a b')
  assert done.returncode == 0, done.stderr
  assert 'launched 0 2 4 --config configs/x.py --workdir a b' in logs[0]
  assert 'launched 1 2 4 --config configs/x.py --workdir a b' in logs[1]


def test_local_launcher_kills_the_others_and_fails_when_one_process_fails(tmp_path):
  done, logs = _launch(tmp_path, '--fail')
  assert done.returncode == 1
  assert 'process 1 exited with status 1' in done.stderr
  assert 'RuntimeError: process 1 fails' in logs[1]
