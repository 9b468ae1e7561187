"""A training run's workdir as something one run owns: a lock that keeps a second live run out, and the config the
run trained with (`config.json`, and `config_history.jsonl` when a resumed run changed it).

  lock = claim(workdir, config, resuming=..., allow_config_change=...)   # every process; process 0 does the work
  ... restore or init ...
  record_config(workdir, config, start_step)                            # process 0
  ... train ...
  lock.release()

The lock (`WORKDIR/run.lock`, JSON with host, pid and start time) is created by process 0 with O_EXCL, so that of two
runs starting together exactly one gets it. A lock whose process is gone is stale and taken over with a warning:
on this host that is known (the pid no longer runs, or runs another program, told apart by its start time); a lock
from another host (a workdir on a shared filesystem) cannot be checked, so its holder refreshes the file's mtime every
`HEARTBEAT_SECONDS` and a lock not refreshed for `STALE_AFTER_SECONDS` counts as stale. That needs the hosts' clocks to
agree within minutes; a run on another host that froze for longer than that loses its lock.

On resume the config is compared with config.json: the keys in `FREE_ON_RESUME` may change; any other change stops
the run with the differing keys, old -> new, unless the run allows it, and then each config with the step it began
at goes to config_history.jsonl.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import pathlib
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections

from xmodal.config import ConfigError
from xmodal.train.checkpoint import any_process
from xmodal.train.errors import RunError

log = logging.getLogger(__name__)

LOCK_FILE = 'run.lock'
CONFIG_FILE = 'config.json'
HISTORY_FILE = 'config_history.jsonl'
HEARTBEAT_SECONDS = 60
STALE_AFTER_SECONDS = 600

# The keys a resumed run may change without --allow-config-change: how long the run goes on (train.steps; the
# cosine schedule then stretches to the new length from the resumed step on) and how it reports, saves and
# evaluates. None changes what a step computes from its state and batch.
FREE_ON_RESUME = frozenset({
    'train.steps', 'train.log_every', 'train.progress',
    'train.checkpoint_every', 'train.keep_checkpoints', 'train.eval_every',
    'train.peak_flops_per_device',  # only the MFU reported
    'train.compilation_cache_dir',  # a cache of compiled programs: the same programs either way
})
MISSING = '<absent>'  # a key one of the two configs does not have (an older or newer xmodal wrote it)


class WorkdirLockedError(RunError):
  """Another live run holds the workdir's lock; the message names it (host, pid, start time)."""


class ConfigChangeError(ConfigError):
  """A resumed run's config differs from the workdir's config.json in keys that change the training."""


# ------------------------------------------------------------------------------------------------------------ lock

def _process_start(pid: int) -> int | None:
  """The process's start time in clock ticks since boot (Linux), which tells a pid reused by another program apart;
  None where /proc does not say."""
  try:
    stat = pathlib.Path(f'/proc/{pid}/stat').read_text()
  except OSError:
    return None
  return int(stat.rsplit(')', 1)[1].split()[19])  # field 22; the command name before ')' may hold spaces


def _running(pid: int, start: int | None) -> bool:
  """Whether `pid` is a live process on this host (the same one that took the lock, when `start` is known)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # alive, another user's
  now = _process_start(pid)
  return start is None or now is None or now == start


def describe(holder: Mapping[str, Any]) -> str:
  return f"pid {holder.get('pid')} on host {holder.get('host')!r}, started {holder.get('started')}"


class WorkdirLock:
  """The lock file of one workdir; `acquire` takes it or raises WorkdirLockedError, `release` gives it back."""

  def __init__(self, workdir: str | os.PathLike):
    self.path = pathlib.Path(workdir) / LOCK_FILE
    self._content: bytes | None = None  # what we wrote, while we hold it
    self._stop = threading.Event()
    self._heartbeat: threading.Thread | None = None

  @property
  def held(self) -> bool:
    return self._content is not None

  def acquire(self) -> None:
    pid = os.getpid()
    mine = {'host': socket.gethostname(), 'pid': pid, 'process_start': _process_start(pid),
            'started': datetime.datetime.now().astimezone().isoformat(timespec='seconds')}
    content = (json.dumps(mine, indent=2) + '\n').encode()
    for _ in range(5):  # each pass either takes the lock, refuses, or removes one stale lock and tries again
      try:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
      except FileExistsError:
        self._remove_if_stale()
        continue
      with os.fdopen(fd, 'wb') as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
      self._content = content
      self._heartbeat = threading.Thread(target=self._beat, name='xmodal-lock-heartbeat', daemon=True)
      self._heartbeat.start()
      return
    raise WorkdirLockedError(f'Could not take {self.path}: other runs keep taking it.')

  def _remove_if_stale(self) -> None:
    """Raises WorkdirLockedError when the lock's holder may be alive; removes the lock when it is stale."""
    try:
      content, age = self.path.read_bytes(), time.time() - self.path.stat().st_mtime
    except FileNotFoundError:
      return  # released meanwhile
    try:
      holder = json.loads(content)
    except ValueError:
      if age < 10:  # being written by a run that has just created it
        time.sleep(1)
        return
      holder = {}  # a run died between creating and writing it
    why_stale = self._why_stale(holder, age)
    if why_stale is None:
      raise WorkdirLockedError(
          f'{self.path.parent} is in use by another run: {describe(holder)} holds {self.path}. Wait for it to end '
          f'or stop it. If it is gone and the lock stayed (a machine that crashed), delete {self.path}.')
    # The rename succeeds for one of several runs taking over the same stale lock; the others find no file.
    aside = self.path.with_name(f'{LOCK_FILE}.stale-{os.getpid()}')
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return
    if aside.read_bytes() != content:  # another run took the stale lock over just before us: give its lock back
      try:
        os.link(aside, self.path)
      except FileExistsError:
        pass
    else:
      log.warning('took over the stale lock %s of %s: %s', self.path, describe(holder), why_stale)
    aside.unlink()

  @staticmethod
  def _why_stale(holder: Mapping[str, Any], age: float) -> str | None:
    """Why the holder is gone, or None while it may be alive."""
    if not isinstance(holder, dict) or 'pid' not in holder:
      return 'the lock file is empty or unreadable'
    if holder.get('host') == socket.gethostname():
      if _running(int(holder['pid']), holder.get('process_start')):
        return None
      return f"process {holder['pid']} no longer runs on this host"
    if age > STALE_AFTER_SECONDS:  # another host: its heartbeat is all there is to go by
      return f'its heartbeat stopped {age / 60:.0f} minutes ago (another host: the process cannot be checked)'
    return None

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT_SECONDS):
      try:
        os.utime(self.path)
      except OSError as e:
        log.warning('could not refresh the lock %s: %s', self.path, e)

  def release(self) -> None:
    """Removes the lock if it is still ours (a run that took it over as stale keeps its own)."""
    if self._content is None:
      return
    self._stop.set()
    if self._heartbeat is not None:
      self._heartbeat.join()
    try:
      if self.path.read_bytes() == self._content:
        self.path.unlink()
    except FileNotFoundError:
      pass
    self._content = None


# ---------------------------------------------------------------------------------------------------------- config

def as_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as config.json holds it (tuples become lists), so that the two compare."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """{'optim': {'lr': 1e-4}} -> {'optim.lr': 1e-4}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
  """{'optim.lr': (old, new)} for every key whose value differs between two configs in JSON form, sorted by key."""
  old, new = flatten(old), flatten(new)
  return {key: (old.get(key, MISSING), new.get(key, MISSING))
          for key in sorted(old.keys() | new.keys()) if old.get(key, MISSING) != new.get(key, MISSING)}


def format_changes(changes: Mapping[str, tuple[Any, Any]]) -> str:
  return '\n'.join(f'  {key}: {old!r} -> {new!r}' for key, (old, new) in changes.items())


def read_config(workdir: str | os.PathLike) -> dict[str, Any] | None:
  """The workdir's config.json as a dict, None when there is none.

  Fields added to xmodal since the run wrote it take their defaults, which are always the behaviour from before the
  field existed (MLM off, ...): an older run then reads, evaluates and resumes as it ran, and its new fields are not
  changes.
  """
  path = pathlib.Path(workdir) / CONFIG_FILE
  if not path.exists():
    return None
  from xmodal.config.defaults import base_config  # pylint: disable=g-import-not-at-top
  return _with_defaults(json.loads(path.read_text()), base_config().to_dict())


def _with_defaults(saved: dict[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
  out = dict(saved)
  for key, default in defaults.items():
    if key not in out:
      out[key] = default
    elif isinstance(default, Mapping) and isinstance(out[key], Mapping):
      out[key] = _with_defaults(out[key], default)
  return out


def check_resumed_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict, *,
                         allow_change: bool) -> None:
  """Raises ConfigChangeError when `config` differs from the workdir's config.json beyond FREE_ON_RESUME (and the
  change is not allowed); logs the differences that go on."""
  saved = read_config(workdir)
  if saved is None:
    return
  changes = config_changes(saved, as_json(config))
  blocking = {k: v for k, v in changes.items() if k not in FREE_ON_RESUME}
  path = pathlib.Path(workdir) / CONFIG_FILE
  if blocking and not allow_change:
    raise ConfigChangeError(
        f'the config differs from {path}, the config of the run being resumed:\n{format_changes(blocking)}\n'
        f'Resume with the old values, start a new workdir, or pass --allow-config-change to go on with the new ones '
        f'(recorded in {pathlib.Path(workdir) / HISTORY_FILE}).')
  if changes:  # a warning when it changes the training, a note when only the length or the cadences change
    log.log(logging.WARNING if blocking else logging.INFO, 'resuming with a config that differs from %s%s:\n%s',
            path, ' (allowed by --allow-config-change)' if blocking else '', format_changes(changes))


def record_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict, step: int) -> None:
  """Writes config.json and, when the config differs from the last one the run went through, appends it to
  config_history.jsonl with the step it begins at and its changes, old -> new (process 0)."""
  workdir = pathlib.Path(workdir)
  current = as_json(config)
  history_file = workdir / HISTORY_FILE
  now = datetime.datetime.now().astimezone().isoformat(timespec='seconds')
  entries = []
  if history_file.exists():
    last = _last_config(history_file)
  else:
    last = read_config(workdir)
    if last is not None:  # a workdir from before the history: its config.json is the one it began with
      entries.append({'step': 0, 'time': now, 'changes': {}, 'config': last})
  if last != current:
    changes = {k: list(v) for k, v in config_changes(last, current).items()} if last is not None else {}
    entries.append({'step': step, 'time': now, 'changes': changes, 'config': current})
  with history_file.open('a', encoding='utf-8') as f:
    f.writelines(json.dumps(entry, sort_keys=True) + '\n' for entry in entries)
  (workdir / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2, sort_keys=True) + '\n')


def _last_config(history_file: pathlib.Path) -> dict[str, Any] | None:
  """The config of the history's last complete line (a run killed while appending leaves a partial one)."""
  for line in reversed(history_file.read_text().splitlines()):
    try:
      return json.loads(line)['config']
    except (ValueError, KeyError):
      continue
  return None


# ----------------------------------------------------------------------------------------------------------- claim

def claim(workdir: str | os.PathLike, config: ml_collections.ConfigDict, *, resuming: bool,
          allow_config_change: bool) -> WorkdirLock | None:
  """Takes the workdir for this run: process 0 takes the lock and, when `resuming`, checks the config; every
  process learns whether the run may start (a collective: call it on every process at the same point).

  Returns the lock on process 0 (release it when the run ends), None on the others.
  Raises WorkdirLockedError or ConfigChangeError on every process (on the others a RunError pointing at process 0).
  """
  lock, error = None, None
  if jax.process_index() == 0:
    lock = WorkdirLock(workdir)
    try:
      lock.acquire()
      if resuming:
        check_resumed_config(workdir, config, allow_change=allow_config_change)
    except (RunError, ConfigError) as e:
      lock.release()
      error = e
  if any_process(error is not None):
    raise error or RunError('process 0 could not take the workdir; its output says why.')
  return lock
