"""Checkpointer: restore onto other meshes, retention, shape errors, killed saves, preemption signals, damaged
checkpoints (checksums, fallback) and failed saves."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from helpers import one_device_env
from xmodal.train.checkpoint import (Checkpointer, CheckpointDamagedError, CheckpointMismatchError,
                                     CheckpointNotFoundError, NoRestorableCheckpointError, PreemptionGuard)

OPTIMIZER = optax.adamw(1e-2, weight_decay=0.1)


def _params(width: int = 8) -> dict:
  # A flax-style tree: one boxed (nn.Partitioned) kernel, as `nn.with_logical_partitioning` leaves them.
  kernel = jnp.arange(width * 4, dtype=jnp.float32).reshape(width, 4) / 10
  return {'dense': {'kernel': nn.Partitioned(kernel, names=('embed', 'mlp')), 'bias': jnp.arange(4.0)},
          'scale': jnp.ones((2,), jnp.bfloat16)}


def _state(width: int = 8) -> dict:
  params = _params(width)
  opt_state = OPTIMIZER.init(params)
  # One update, so that the moments are not all zeros and `count` is 1.
  updates, opt_state = OPTIMIZER.update(jax.tree.map(jnp.ones_like, params), opt_state, params)
  return {'step': jnp.array(3, jnp.int32), 'params': optax.apply_updates(params, updates), 'opt_state': opt_state}


def _shard(tree, mesh: Mesh):
  """Shards 2-D leaves over both mesh axes, replicates the rest."""
  def spec(x):
    return NamedSharding(mesh, P(*mesh.axis_names) if np.ndim(x) == 2 else P())
  return jax.tree.map(lambda x: jax.device_put(x, spec(x)), tree)


def _abstract(mesh: Mesh, width: int = 8):
  shapes = jax.eval_shape(lambda: _state(width))
  def target(s):
    sharding = NamedSharding(mesh, P(*mesh.axis_names) if len(s.shape) == 2 else P())
    return jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding)
  return jax.tree.map(target, shapes)


def _mesh(shape: tuple[int, int]) -> Mesh:
  n = shape[0] * shape[1]
  return Mesh(np.array(jax.devices()[:n]).reshape(shape), ('fsdp', 'tensor'))


def test_state_saved_on_4x2_mesh_restores_onto_2x1_mesh_and_one_device(tmp_path):
  state = _shard(_state(), _mesh((4, 2)))
  assert len(state['params']['dense']['kernel'].value.sharding.device_set) == 8
  data_state = {'epoch': 1, 'position': 12345, 'seed': 'abc'}
  with Checkpointer(tmp_path, save_every=1, keep=3) as ckpt:
    assert ckpt.save(3, state, data_state)

  expected = jax.tree.map(np.asarray, jax.device_get(_state()))
  for mesh in (_mesh((2, 1)), _mesh((1, 1))):
    with Checkpointer(tmp_path, save_every=1, keep=3) as ckpt:
      assert ckpt.latest_step() == 3
      restored, restored_data = ckpt.restore(_abstract(mesh))
    assert restored_data == data_state
    # The target's structure comes back: optax named tuples and flax boxes, not lists and dicts.
    assert jax.tree.structure(restored) == jax.tree.structure(_state())
    assert isinstance(restored['opt_state'][0], optax.ScaleByAdamState)
    assert isinstance(restored['params']['dense']['kernel'], nn.Partitioned)
    kernel = restored['params']['dense']['kernel'].value
    assert kernel.sharding.mesh.devices.shape == mesh.devices.shape
    assert kernel.sharding.device_set == set(mesh.devices.flat)
    assert restored['params']['scale'].dtype == jnp.bfloat16
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, restored), expected)


def test_a_partly_frozen_optimizer_state_restores_with_its_empty_moments(tmp_path):
  from xmodal.config.defaults import base_config
  from xmodal.train import optim
  params = {'vision': {'kernel': jnp.ones((4, 3)), 'bias': jnp.zeros(3)}, 'text': {'kernel': jnp.full((3, 2), 2.0)}}
  config = base_config().optim
  config.update(freeze=('^vision/',), warmup_steps=0)
  tx, _ = optim.build_optimizer(config, params, 10)
  opt_state = tx.init(params)
  for _ in range(2):
    _, opt_state = tx.update(jax.tree.map(jnp.ones_like, params), opt_state, params)
  state = {'params': params, 'opt_state': opt_state}
  with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
    ckpt.save(2, state, {})
    restored, _ = ckpt.restore(jax.eval_shape(lambda: state))
  # The frozen parameters' moments stay optax.MaskedNode (no leaves) and the trained ones come back as saved.
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, restored), jax.tree.map(np.asarray, state))


def test_saves_every_n_steps_and_at_the_end_and_keeps_the_last_k(tmp_path):
  state = _state()
  with Checkpointer(tmp_path, save_every=2, keep=2) as ckpt:
    saved = [step for step in range(1, 8) if ckpt.save(step, state, {'step': step})]
    assert saved == [2, 4, 6]
    assert ckpt.save(7, state, {'step': 7}, force=True)  # the end of training
    assert not ckpt.save(7, state, {'step': 7}, force=True)  # already on disk: no second write
    ckpt.wait()
    assert ckpt.all_steps() == [6, 7]
    assert ckpt.latest_step() == 7
    _, data_state = ckpt.restore(jax.eval_shape(_state), step=6)
    assert data_state == {'step': 6}
  assert sorted(p for p in os.listdir(tmp_path) if not p.startswith('.')) == ['6', '7']


def test_restoring_another_model_shape_names_the_first_mismatching_parameter(tmp_path):
  with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
    ckpt.save(1, _state(width=8), {})
    with pytest.raises(CheckpointMismatchError) as info:
      ckpt.restore(jax.eval_shape(lambda: _state(16)))
  message = str(info.value)
  # The first leaf in tree order whose shape differs: the first moment of the kernel, inside the optimizer state.
  assert "first shape mismatch at 'opt_state/0/mu/dense/kernel/value'" in message
  assert '(8, 4)' in message and '(16, 4)' in message


def test_restoring_other_parameter_names_lists_missing_and_unexpected(tmp_path):
  with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
    ckpt.save(1, {'params': {'a': jnp.ones(2), 'b': jnp.ones(3)}}, {})
    target = {'params': {'a': jax.ShapeDtypeStruct((2,), jnp.float32), 'c': jax.ShapeDtypeStruct((3,), jnp.float32)}}
    with pytest.raises(CheckpointMismatchError, match=r"missing in the checkpoint \(1\): params/c(.|\n)*"
                                                      r"unexpected in the checkpoint \(1\): params/b"):
      ckpt.restore(target)


def test_restore_without_a_checkpoint_is_a_clear_error(tmp_path):
  with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
    assert ckpt.latest_step() is None
    with pytest.raises(FileNotFoundError, match='No checkpoint'):
      ckpt.restore(jax.eval_shape(_state))


_KILLED_MID_SAVE = textwrap.dedent('''
  import os, signal, sys, time
  import jax.numpy as jnp
  from xmodal.train.checkpoint import Checkpointer
  ckpt = Checkpointer(sys.argv[1], save_every=1, keep=5)
  ckpt.save(1, {'w': jnp.full((4,), 1.0)}, {'position': 1})
  ckpt.wait()
  # 64 MB: the background write is still running when the process dies. Die once its temporary folder exists (the
  # save may return before the writer has made it: killing at once could leave nothing torn to recover from).
  ckpt.save(2, {'w': jnp.full((16 * 1024 * 1024,), 2.0)}, {'position': 2})
  deadline = time.monotonic() + 20
  while not any(n.startswith('2.') for n in os.listdir(sys.argv[1])) and time.monotonic() < deadline:
    time.sleep(0.001)
  os.kill(os.getpid(), signal.SIGKILL)
''')


def test_save_killed_midway_leaves_the_previous_checkpoint_restorable(tmp_path):
  env = one_device_env()
  child = subprocess.run([sys.executable, '-c', _KILLED_MID_SAVE, str(tmp_path)], env=env, timeout=60,
                         capture_output=True, text=True)
  assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
  assert any(name.startswith('2.') for name in os.listdir(tmp_path)), os.listdir(tmp_path)  # the torn step 2
  with Checkpointer(tmp_path, save_every=1, keep=5) as ckpt:
    assert ckpt.latest_step() == 1
    state, data_state = ckpt.restore({'w': jax.ShapeDtypeStruct((4,), jnp.float32)})
  np.testing.assert_array_equal(state['w'], np.ones(4))
  assert data_state == {'position': 1}


def test_preemption_guard_turns_sigterm_into_a_flag_and_restores_the_handler():
  def previous(signum, frame):
    raise AssertionError('the old handler must not run inside the guard')
  old = signal.signal(signal.SIGTERM, previous)
  try:
    with PreemptionGuard() as guard:
      assert not guard.should_stop(0)
      os.kill(os.getpid(), signal.SIGTERM)
      assert guard.requested and guard.signal_received == signal.SIGTERM
      assert guard.should_stop(1)
    assert signal.getsignal(signal.SIGTERM) is previous
  finally:
    signal.signal(signal.SIGTERM, old)


def test_preemption_guard_second_sigint_still_interrupts():
  # The handler before the guard: Python's default, or SIG_IGN in a pytest-xdist worker.
  previous = signal.getsignal(signal.SIGINT)
  with PreemptionGuard(signals=(signal.SIGINT,)) as guard:
    os.kill(os.getpid(), signal.SIGINT)
    assert guard.requested
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  assert signal.getsignal(signal.SIGINT) is previous


def test_a_relative_directory_works(tmp_path, monkeypatch):
  """`xmodal train --workdir runs/x` passes a relative path; orbax's writer needs an absolute one."""
  import jax.numpy as jnp
  monkeypatch.chdir(tmp_path)
  state = {'w': jnp.arange(4.0)}
  with Checkpointer('relative/checkpoints', save_every=1, keep=1) as ckpt:
    ckpt.save(1, state, {'position': 3}, force=True)
    ckpt.wait()
    restored, data = ckpt.restore(jax.eval_shape(lambda: state))
  np.testing.assert_array_equal(restored['w'], np.arange(4.0))
  assert data == {'position': 3}


# ------------------------------------------------------------------------------- damaged checkpoints, failed saves

def _random_state(step: int) -> dict:
  # Random values: zstd stores them as raw blocks, so a changed byte is still a valid array on disk.
  return {'w': jnp.asarray(np.random.default_rng(step).normal(size=4096), jnp.float32)}


def _save_steps(directory, steps=(1, 2), keep=5) -> None:
  with Checkpointer(directory, save_every=1, keep=keep) as ckpt:
    for step in steps:
      ckpt.save(step, _random_state(step), {'position': step})


def _data_file(step_dir):
  """The largest file of the step's array data (an OCDBT data file)."""
  return max((p for p in (step_dir / 'state').rglob('*') if p.is_file() and p.parent.name == 'd'),
             key=lambda p: p.stat().st_size)


def _flip_bytes(path, n=16):
  data = bytearray(path.read_bytes())
  middle = len(data) // 2
  data[middle:middle + n] = bytes(b ^ 0xFF for b in data[middle:middle + n])
  path.write_bytes(bytes(data))


_TARGET = {'w': jax.ShapeDtypeStruct((4096,), jnp.float32)}


def test_a_byte_changed_in_place_is_caught_by_the_checksums_where_orbax_alone_reads_it_silently(tmp_path):
  _save_steps(tmp_path / 'run')
  _flip_bytes(_data_file(tmp_path / 'run' / '2'))
  # Why xmodal writes checksums: without them, orbax restores the changed bytes as if nothing happened.
  shutil.copytree(tmp_path / 'run', tmp_path / 'unchecked')
  (tmp_path / 'unchecked' / '2' / 'checksums.sha256').unlink()
  with Checkpointer(tmp_path / 'unchecked', save_every=1, keep=5) as ckpt:
    silently_wrong, _ = ckpt.restore(_TARGET, step=2)
  assert not np.array_equal(silently_wrong['w'], _random_state(2)['w'])

  with Checkpointer(tmp_path / 'run', save_every=1, keep=5) as ckpt:
    with pytest.raises(CheckpointDamagedError, match=r'step 2 .* state/.*/d/\w+ differs from its save-time '
                                                     r'checksum(.|\n)*steps in .* are \[1, 2\]'):
      ckpt.restore(_TARGET, step=2)


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one_and_is_moved_aside(tmp_path, caplog):
  _save_steps(tmp_path / 'checkpoints')
  damaged = _data_file(tmp_path / 'checkpoints' / '2')
  os.truncate(damaged, damaged.stat().st_size // 2)
  with Checkpointer(tmp_path / 'checkpoints', save_every=1, keep=5) as ckpt:
    state, data_state = ckpt.restore(_TARGET, damaged_dir=tmp_path / 'damaged')
    assert ckpt.all_steps() == [1]
  np.testing.assert_array_equal(state['w'], _random_state(1)['w'])
  assert data_state == {'position': 1}
  assert f"checkpoint step 2 ({tmp_path / 'checkpoints' / '2'}) cannot be read" in caplog.text
  assert f"restored step 1, the newest checkpoint that reads completely; skipped step 2 (moved to " \
         f"{tmp_path / 'damaged' / '2'})" in caplog.text
  assert (tmp_path / 'damaged' / '2' / 'checksums.sha256').exists()  # moved whole, not deleted
  # A reader (xmodal eval) falls back the same way but moves nothing.
  _save_steps(tmp_path / 'reader')
  (tmp_path / 'reader' / '2' / 'state' / '_METADATA').write_text('{')
  with Checkpointer(tmp_path / 'reader', save_every=1, keep=5) as ckpt:
    state, _ = ckpt.restore(_TARGET)
    assert ckpt.all_steps() == [1, 2]
  np.testing.assert_array_equal(state['w'], _random_state(1)['w'])


def test_when_no_checkpoint_restores_the_error_lists_each_failure_and_nothing_moves(tmp_path):
  _save_steps(tmp_path / 'checkpoints')
  _flip_bytes(_data_file(tmp_path / 'checkpoints' / '2'))
  # Step 1 from before checksums were kept: orbax's own error, cut to its one useful line.
  (tmp_path / 'checkpoints' / '1' / 'checksums.sha256').unlink()
  os.truncate(_data_file(tmp_path / 'checkpoints' / '1'), 10)
  with Checkpointer(tmp_path / 'checkpoints', save_every=1, keep=5) as ckpt:
    with pytest.raises(NoRestorableCheckpointError) as info:
      ckpt.restore(_TARGET, damaged_dir=tmp_path / 'damaged')
    assert ckpt.all_steps() == [1, 2]
  lines = str(info.value).splitlines()
  assert lines[0] == f"No checkpoint in {tmp_path / 'checkpoints'} restores:"
  assert lines[1].startswith(f"  step 2 ({tmp_path / 'checkpoints' / '2'}): state/") and 'checksum' in lines[1]
  assert lines[2].startswith(f"  step 1 ({tmp_path / 'checkpoints' / '1'}): ValueError: OUT_OF_RANGE: Error reading")
  assert 'tensorstore_spec' not in lines[2] and len(lines[2]) < 600
  assert 'Nothing was moved' in lines[3] and not (tmp_path / 'damaged').exists()


def test_a_missing_step_lists_the_steps_there_are(tmp_path):
  _save_steps(tmp_path)
  with Checkpointer(tmp_path, save_every=1, keep=5) as ckpt:
    with pytest.raises(CheckpointNotFoundError, match=r'No checkpoint of step 7 .*the steps there are \[1, 2\]'):
      ckpt.restore(_TARGET, step=7)


_SAVE_ON_A_FULL_DISK = textwrap.dedent('''
  import resource, sys
  import jax.numpy as jnp, numpy as np
  from xmodal.train.checkpoint import Checkpointer, CheckpointSaveError
  ckpt = Checkpointer(sys.argv[1], save_every=1, keep=1)
  ckpt.save(1, {'w': jnp.ones(16)}, {'position': 1})
  ckpt.wait()
  # Files may no longer grow past 64 kB (what a full disk does to the next write); the next step's array is 4 MB.
  resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.RLIM_INFINITY))
  ckpt.save(2, {'w': jnp.asarray(np.random.default_rng(0).normal(size=1 << 20), jnp.float32)}, {'position': 2})
  try:
    ckpt.wait()
  except CheckpointSaveError as e:
    print(e)
    sys.exit(3)
''')


def test_a_failed_save_keeps_the_last_checkpoint_and_leaves_no_partial_one(tmp_path):
  child = subprocess.run([sys.executable, '-c', _SAVE_ON_A_FULL_DISK, str(tmp_path)],
                         env=one_device_env(compile_cache=False), timeout=120,
                         capture_output=True, text=True)
  assert child.returncode == 3, child.stderr[-3000:]
  assert child.stdout.startswith(f'Saving checkpoint step 2 to {tmp_path} failed: ')
  assert 'File too large' in child.stdout
  assert 'The last complete checkpoint, step 1, is kept' in child.stdout
  assert sorted(os.listdir(tmp_path)) == ['1']  # keep=1, yet step 1 stays; no partial step 2 on the full disk
  with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
    state, data_state = ckpt.restore({'w': jax.ShapeDtypeStruct((16,), jnp.float32)})
  np.testing.assert_array_equal(state['w'], np.ones(16))
  assert data_state == {'position': 1}
