"""Faults of a workdir, each met by a real `xmodal train` (or `xmodal eval`) of the micro model in a subprocess: a
damaged newest checkpoint, a second run on a live workdir, a stale lock, a changed config, a save that fails."""

import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import ROOT, logged_losses, micro_model_config, one_device_env, train_command, xla_flags

# Every test resumes a 4-step run in a subprocess (about half a minute each on two cores).
pytestmark = pytest.mark.slow


def _xmodal(*args, timeout=300, compile_cache=True, **kwargs) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'xmodal.cli', *map(str, args)], cwd=ROOT,
                        env=one_device_env(compile_cache), timeout=timeout,
                        capture_output=True, text=True, **kwargs)


# The runs here carry a larger vocabulary than the micro model's: its word embedding, and each of Adam's two moments
# of it, is one float32 array of this many bytes that orbax writes whole into one data file. Which other arrays share
# that file depends on the writer's timing, so this is the one size a checkpoint's largest data file is sure to reach.
_VOCAB_SIZE = 4096
_WORD_EMBEDDING_BYTES = _VOCAB_SIZE * micro_model_config().text.width * 4


def _train_args(workdir, shapes_dir, steps, extra=()):
  # Every run checkpoints every 2 steps and keeps the compiled programs in the tests' cache (a free key).
  cache = os.environ['XMODAL_TEST_COMPILE_CACHE']
  return train_command(workdir, shapes_dir, steps, [f'--config.model.text.vocab_size={_VOCAB_SIZE}',
                                                    '--config.train.checkpoint_every=2',
                                                    '--config.train.keep_checkpoints=5',
                                                    f'--config.train.compilation_cache_dir={cache}', *extra])


def _train(workdir, shapes_dir, steps, extra=(), **kwargs) -> subprocess.CompletedProcess:
  return _xmodal('train', *_train_args(workdir, shapes_dir, steps, extra), **kwargs)


@pytest.fixture(scope='module')
def four_steps(shapes_dir, tmp_path_factory):
  """A finished run of 4 steps with checkpoints at 2 and 4; tests resume copies of it."""
  workdir = tmp_path_factory.mktemp('four_steps') / 'run'
  result = _train(workdir, shapes_dir, steps=4)
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']
  return workdir


@pytest.fixture
def workdir(four_steps, tmp_path):
  copy = tmp_path / 'run'
  shutil.copytree(four_steps, copy)
  return copy


def _largest_data_file(step_dir):
  return max((p for p in (step_dir / 'state').rglob('*') if p.is_file() and p.parent.name == 'd'),
             key=lambda p: p.stat().st_size)


def test_a_damaged_newest_checkpoint_falls_back_and_the_resume_gives_the_losses_of_the_uninterrupted_run(
    workdir, shapes_dir):
  uninterrupted = logged_losses(workdir)
  data_file = _largest_data_file(workdir / 'checkpoints' / '4')
  os.truncate(data_file, data_file.stat().st_size // 2)  # what a partial copy or a full disk leaves

  named = _xmodal('eval', '--workdir', workdir, '--step', 4)
  assert named.returncode == 1, named.stderr[-3000:]
  assert f"xmodal: error: Checkpoint step 4 ({workdir / 'checkpoints' / '4'}) cannot be read: state/" in named.stderr
  assert 'differs from its save-time checksum' in named.stderr and 'are [2, 4]' in named.stderr
  assert 'Traceback' not in named.stderr
  exported = _xmodal('export', '--workdir', workdir, '--out', workdir.parent / 'bundle', '--step', 4)
  assert exported.returncode == 1 and 'are [2, 4]' in exported.stderr, exported.stderr[-3000:]
  assert 'Traceback' not in exported.stderr

  resumed = _train(workdir, shapes_dir, steps=4)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"checkpoint step 4 ({workdir / 'checkpoints' / '4'}) cannot be read" in resumed.stderr
  assert (f"restored step 2, the newest checkpoint that reads completely; skipped step 4 (moved to "
          f"{workdir / 'damaged_checkpoints' / '4'})") in resumed.stderr
  assert (workdir / 'damaged_checkpoints' / '4' / 'state').is_dir()  # kept for a post-mortem, not deleted
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']  # step 4 written again
  again = logged_losses(workdir)
  assert [m['step'] for m in again] == [1, 2, 3, 4]  # the lost steps' lines replaced, not repeated
  np.testing.assert_allclose([m['loss'] for m in again], [m['loss'] for m in uninterrupted], rtol=1e-5)


def test_a_second_run_on_a_live_workdir_is_refused_naming_the_holder(workdir, shapes_dir):
  first = subprocess.Popen([sys.executable, '-m', 'xmodal.cli', 'train',
                            *_train_args(workdir, shapes_dir, steps=100000)],
                           cwd=ROOT, env=dict(os.environ, XLA_FLAGS=xla_flags(1)),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    lock = workdir / 'run.lock'
    deadline = time.time() + 120
    while time.time() < deadline and not (lock.exists() and f'"pid": {first.pid}' in lock.read_text()):
      time.sleep(0.2)
    second = _train(workdir, shapes_dir, steps=6)
    assert json.loads(lock.read_text())['pid'] == first.pid  # still the first run's
    assert first.poll() is None
  finally:
    first.kill()
    first.wait()
  assert second.returncode == 1, second.stderr[-3000:]
  assert f'{workdir} is in use by another run: pid {first.pid} on host {socket.gethostname()!r}' in second.stderr
  assert 'Traceback' not in second.stderr


def test_a_stale_lock_is_taken_over(workdir, shapes_dir):
  gone = subprocess.Popen(['true'])
  gone.wait()
  (workdir / 'run.lock').write_text(json.dumps({'host': socket.gethostname(), 'pid': gone.pid,
                                                'started': '2026-01-01T00:00:00+00:00'}))
  result = _train(workdir, shapes_dir, steps=5)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'took over the stale lock {workdir / "run.lock"} of pid {gone.pid}' in result.stderr
  assert f'process {gone.pid} no longer runs on this host' in result.stderr
  assert [m['step'] for m in logged_losses(workdir)] == [1, 2, 3, 4, 5]
  assert not (workdir / 'run.lock').exists()  # released at the end


def test_a_config_change_is_refused_with_the_diff_and_allowed_and_recorded_with_the_flag(workdir, shapes_dir):
  refused = _train(workdir, shapes_dir, steps=5, extra=['--config.optim.lr=0.001'])
  assert refused.returncode == 2, refused.stderr[-3000:]
  assert f"the config differs from {workdir / 'config.json'}" in refused.stderr
  diff = [line.strip() for line in refused.stderr.splitlines() if ' -> ' in line]
  assert diff == ['optim.lr: 0.0001 -> 0.001']  # train.steps 4 -> 5 is free
  assert json.loads((workdir / 'config.json').read_text())['optim']['lr'] == 1e-4
  assert [m['step'] for m in logged_losses(workdir)] == [1, 2, 3, 4]

  allowed = _train(workdir, shapes_dir, steps=5, extra=['--config.optim.lr=0.001', '--allow-config-change'])
  assert allowed.returncode == 0, allowed.stderr[-3000:]
  assert [m['step'] for m in logged_losses(workdir)] == [1, 2, 3, 4, 5]
  history = [json.loads(l) for l in (workdir / 'config_history.jsonl').read_text().splitlines()]
  assert [(h['step'], h['changes']) for h in history] == [
      (0, {}), (4, {'optim.lr': [1e-4, 1e-3], 'train.steps': [4, 5]})]
  assert history[0]['config']['optim']['lr'] == 1e-4
  assert json.loads((workdir / 'config.json').read_text())['optim']['lr'] == 1e-3


def test_a_failed_save_keeps_the_last_good_checkpoint(workdir, shapes_dir):
  # A filesystem that refuses to grow a file past a limit (RLIMIT_FSIZE, EFBIG: what a full disk does to the
  # next write) below the size of the data file that holds the word embedding, above every other file the run writes.
  limit = _WORD_EMBEDDING_BYTES // 2
  assert _largest_data_file(workdir / 'checkpoints' / '4').stat().st_size >= _WORD_EMBEDDING_BYTES
  assert (workdir / 'log.txt').stat().st_size * 3 < limit
  full_disk = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
  # keep_checkpoints=1: a save that fails must not have removed the older steps; no compilation cache (its files
  # would meet the limit too).
  args = [a for a in _train_args(workdir, shapes_dir, steps=6, extra=['--config.train.keep_checkpoints=1'])
          if 'compilation_cache_dir' not in a]
  failed = _xmodal('train', *args, compile_cache=False, preexec_fn=full_disk)
  assert failed.returncode == 1, failed.stderr[-3000:]
  assert f"xmodal: error: Saving checkpoint step 6 to {workdir / 'checkpoints'} failed: " in failed.stderr
  assert 'File too large' in failed.stderr
  assert 'The last complete checkpoint, step 4, is kept: rerunning the command resumes from it.' in failed.stderr
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']  # nothing half-written for a resume to pick
  assert not (workdir / 'run.lock').exists()

  import jax
  from xmodal import sharding
  from xmodal.train.run import load_run_config, restore_state
  _, state, _ = restore_state(load_run_config(workdir, None, []), workdir, None,
                              sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
  assert int(state.step) == 4
