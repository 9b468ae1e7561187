"""The workdir lock (one live run, stale locks taken over, other hosts by heartbeat) and config changes on resume."""

import json
import logging
import os
import socket
import subprocess
import time

import pytest

from helpers import micro_config
from xmodal.train import workdir as workdir_lib
from xmodal.train.workdir import WorkdirLock, WorkdirLockedError


def _dead_pid() -> int:
  child = subprocess.Popen(['true'])
  child.wait()
  return child.pid


def _plant(path, **holder):
  path.write_text(json.dumps({'started': '2026-01-01T00:00:00+00:00', 'process_start': None, **holder}))


def test_a_lock_held_by_a_live_process_on_this_host_refuses_naming_it(tmp_path):
  sleeper = subprocess.Popen(['sleep', '60'])
  try:
    _plant(tmp_path / 'run.lock', host=socket.gethostname(), pid=sleeper.pid)
    with pytest.raises(WorkdirLockedError, match=f'pid {sleeper.pid} on host {socket.gethostname()!r}'):
      WorkdirLock(tmp_path).acquire()
  finally:
    sleeper.kill()
    sleeper.wait()
  assert json.loads((tmp_path / 'run.lock').read_text())['pid'] == sleeper.pid  # untouched


def test_a_lock_whose_process_is_gone_is_taken_over_with_a_warning(tmp_path, caplog):
  dead = _dead_pid()
  _plant(tmp_path / 'run.lock', host=socket.gethostname(), pid=dead)
  lock = WorkdirLock(tmp_path)
  lock.acquire()
  try:
    holder = json.loads((tmp_path / 'run.lock').read_text())
    assert holder['pid'] == os.getpid() and holder['host'] == socket.gethostname() and holder['started']
    assert 'took over the stale lock' in caplog.text and f'pid {dead}' in caplog.text
    with pytest.raises(WorkdirLockedError, match=f'pid {os.getpid()}'):  # and now it is ours: a second run waits
      WorkdirLock(tmp_path).acquire()
  finally:
    lock.release()
  assert not (tmp_path / 'run.lock').exists()
  assert [p.name for p in tmp_path.iterdir()] == []  # the stale lock was not left lying around


def test_a_reused_pid_is_told_apart_by_its_start_time(tmp_path):
  # This very process is alive, but it is not the one that took the lock: that one started at another time.
  start = workdir_lib._process_start(os.getpid())
  if start is None:
    pytest.skip('no /proc on this system')
  _plant(tmp_path / 'run.lock', host=socket.gethostname(), pid=os.getpid(), process_start=start - 1)
  lock = WorkdirLock(tmp_path)
  lock.acquire()
  lock.release()


def test_a_lock_from_another_host_is_refused_while_its_heartbeat_is_fresh_and_taken_over_after(tmp_path):
  path = tmp_path / 'run.lock'
  _plant(path, host='another-node', pid=1)
  with pytest.raises(WorkdirLockedError, match="pid 1 on host 'another-node'.*delete .*run.lock"):
    WorkdirLock(tmp_path).acquire()
  old = time.time() - workdir_lib.STALE_AFTER_SECONDS - 60
  os.utime(path, (old, old))
  lock = WorkdirLock(tmp_path)
  lock.acquire()
  assert json.loads(path.read_text())['host'] == socket.gethostname()
  lock.release()


def test_the_holder_refreshes_its_heartbeat(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_lib, 'HEARTBEAT_SECONDS', 0.05)
  lock = WorkdirLock(tmp_path)
  lock.acquire()
  try:
    old = time.time() - 1000
    os.utime(lock.path, (old, old))
    time.sleep(0.3)
    assert time.time() - lock.path.stat().st_mtime < 100
  finally:
    lock.release()


def test_release_leaves_a_lock_that_another_run_took_over(tmp_path):
  lock = WorkdirLock(tmp_path)
  lock.acquire()
  _plant(lock.path, host='another-node', pid=7)  # e.g. taken over after this run froze past the heartbeat
  lock.release()
  assert json.loads(lock.path.read_text())['pid'] == 7


def test_config_changes_lists_every_differing_key_old_to_new():
  old, new = micro_config(), micro_config()
  new.optim.lr = 3e-4
  new.data.batch_size = 32
  new.train.steps = 99
  changes = workdir_lib.config_changes(workdir_lib.as_json(old), workdir_lib.as_json(new))
  assert changes == {'data.batch_size': (16, 32), 'optim.lr': (1e-4, 3e-4), 'train.steps': (4, 99)}
  assert workdir_lib.config_changes({'a': {'b': 1}}, {'a': {'c': 1}}) == {
      'a.b': (1, workdir_lib.MISSING), 'a.c': (workdir_lib.MISSING, 1)}


def test_a_resume_may_change_cadences_freely_but_not_the_training(tmp_path, caplog):
  caplog.set_level(logging.INFO, logger='xmodal.train.workdir')
  config = micro_config()
  workdir_lib.record_config(tmp_path, config, 0)
  free = micro_config()
  free.train.update(steps=40, log_every=7, checkpoint_every=3, keep_checkpoints=9, eval_every=5, progress=False)
  workdir_lib.check_resumed_config(tmp_path, free, allow_change=False)
  assert 'train.steps: 4 -> 40' in caplog.text
  changed = micro_config()
  changed.optim.lr = 3e-4
  changed.train.steps = 40
  with pytest.raises(workdir_lib.ConfigChangeError) as info:
    workdir_lib.check_resumed_config(tmp_path, changed, allow_change=False)
  message = str(info.value)
  assert 'optim.lr: 0.0001 -> 0.0003' in message and '--allow-config-change' in message
  assert 'train.steps' not in message  # free keys are not what stops the run
  workdir_lib.check_resumed_config(tmp_path, changed, allow_change=True)


def test_the_history_records_each_config_with_the_step_it_began_at(tmp_path):
  config = micro_config()
  workdir_lib.record_config(tmp_path, config, 0)
  workdir_lib.record_config(tmp_path, config, 2)  # a resume with the same config: nothing new
  config.optim.lr = 3e-4
  workdir_lib.record_config(tmp_path, config, 2)
  history = [json.loads(l) for l in (tmp_path / 'config_history.jsonl').read_text().splitlines()]
  assert [(h['step'], h['changes']) for h in history] == [(0, {}), (2, {'optim.lr': [1e-4, 3e-4]})]
  assert history[1]['config']['optim']['lr'] == 3e-4 == workdir_lib.read_config(tmp_path)['optim']['lr']


def test_a_workdir_from_before_the_history_starts_it_with_its_config_json(tmp_path):
  config = micro_config()
  (tmp_path / 'config.json').write_text(config.to_json_best_effort())
  config.data.batch_size = 32
  workdir_lib.record_config(tmp_path, config, 6)
  history = [json.loads(l) for l in (tmp_path / 'config_history.jsonl').read_text().splitlines()]
  assert [(h['step'], h['changes']) for h in history] == [(0, {}), (6, {'data.batch_size': [16, 32]})]


def test_a_config_json_from_an_older_xmodal_reads_with_the_new_fields_at_their_defaults(tmp_path):
  """Fields added since a run was written (here MLM's) take their defaults: the run evaluates and resumes as before,
  and they are not changes. A field that the run did set keeps its value."""
  from xmodal.train import run
  config = micro_config()
  old = json.loads(config.to_json_best_effort())
  del old['loss']['mlm_weight'], old['model']['mlm_head']
  old['optim']['lr'] = 3e-4
  (tmp_path / 'config.json').write_text(json.dumps(old))
  saved = workdir_lib.read_config(tmp_path)
  assert saved['loss']['mlm_weight'] == 0.0 and saved['model']['mlm_head'] is False and saved['optim']['lr'] == 3e-4
  config.optim.lr = 3e-4
  workdir_lib.check_resumed_config(tmp_path, config, allow_change=False)  # raises on any change
  assert run.load_run_config(tmp_path, None, []).model.mlm_head is False
