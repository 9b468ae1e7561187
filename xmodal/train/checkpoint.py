"""Checkpoints for the training loop: orbax, asynchronous, the last K kept, restorable onto another mesh.

A checkpoint step directory holds two items:
  state: the train state, any pytree of jax.Arrays (flax `nn.Partitioned` boxes included: they are pytrees whose
    leaf is `.value`, so they are saved as `.../kernel/value` and come back boxed when the target is boxed).
  data: a small JSON dict, the input iterator's state, so that a resumed run does not repeat or skip examples.

Orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it (or, on GCS, writes `commit_success.txt`) only
when every process has finished, so a run killed mid-save leaves the previous step as the latest one. A save that
fails (a full disk, a filesystem refusing writes) raises `CheckpointSaveError` naming the step and the cause, and
its partial directory is removed; the steps already committed stay (orbax deletes the oldest only after a commit).

Integrity: orbax notices a truncated, missing or unparsable file, but reads a data file whose bytes changed in place
(a bad copy, bit rot) without complaint, and the run would train on wrong weights. So process 0 writes the sha256 of
every file of a step into the step (`checksums.sha256`, readable by `sha256sum -c`) after the last write and before
orbax commits it, and a restore compares them before orbax reads anything. A restore without a step takes the newest
checkpoint that reads completely: each newer one is named in a warning with its failure and, in a training run,
moved aside (not deleted); when none restores, the error lists each one's failure.

Preemption: `PreemptionGuard` turns SIGTERM/SIGINT into a flag; `PreemptionGuard.should_stop(step)` combines the
flags of all processes so that every process leaves the loop at the same step and joins the final, collective save.

  with PreemptionGuard() as guard:
    for step in range(start, total + 1):
      state = train_step(state, batch)
      stop = guard.should_stop(step)
      ckpt.save(step, state, iterator_state, force=stop or step == total)
      if stop:
        break
  ckpt.close()
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import types
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from xmodal.train.errors import RunError

PyTree = Any

log = logging.getLogger(__name__)

_STATE = 'state'
_DATA = 'data'
CHECKSUMS = 'checksums.sha256'
# Not covered by the checksums: orbax rewrites its step metadata at commit, after they are taken, and writes the
# commit markers then; a restore reads neither.
_UNCHECKED = frozenset({CHECKSUMS, '_CHECKPOINT_METADATA', 'commit_success.txt'})


class CheckpointMismatchError(ValueError):
  """The checkpoint's tree does not fit the restore target (another model shape, missing or extra parameters)."""


class CheckpointNotFoundError(RunError, FileNotFoundError):
  """There is no checkpoint, or none of the step asked for; the message lists the steps there are."""


class CheckpointDamagedError(RunError):
  """The checkpoint of the step asked for cannot be read completely; the message says why and lists the steps."""


class NoRestorableCheckpointError(RunError):
  """Every checkpoint in the directory failed to restore; the message has one line per checkpoint."""


class CheckpointSaveError(RunError):
  """A save failed (a full disk, a filesystem refusing writes); the message names the step, the cause and the last
  complete checkpoint, which is kept."""


class _Unreadable(Exception):
  """One step failed to restore (internal: `restore` turns it into one of the errors above)."""


class Checkpointer:
  """Saves the train state and the data-iterator state every `save_every` steps, keeps the last `keep`.

  Every method must be called by all processes of a multi-process run, at the same steps: saving and restoring are
  collective (each process writes and reads the shards it owns).
  """

  def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int):
    """Opens (or creates) a checkpoint directory.

    Saves are asynchronous: `save` returns once the arrays are copied to host memory, and a background thread writes
    them.

    Args:
      directory: a local or shared path, or a `gs://` URL; every process must see the same directory.
      save_every: `save` writes at steps that are multiples of it (and when forced).
      keep: how many of the latest checkpoints to keep; older ones are deleted.
    """
    if save_every < 1 or keep < 1:
      raise ValueError(f'save_every and keep must be >= 1, got save_every={save_every}, keep={keep}.')
    self.save_every = save_every
    self._saving: int | None = None  # the step whose write may still be in flight
    # The hook runs on process 0 between the last write of a step and its commit (orbax's rename): the checksums
    # become part of the step atomically.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._write_checksums))
    # Registering the handlers up front lets `item_metadata` read a step that this process did not write.
    handlers = {_STATE: ocp.StandardCheckpointHandler(), _DATA: ocp.JsonCheckpointHandler()}
    directory = os.fspath(directory)
    if '://' not in directory:
      directory = os.path.abspath(directory)  # orbax's array writer refuses relative paths (`--workdir runs/x`)
    self._manager = ocp.CheckpointManager(directory, options=options, item_handlers=handlers)

  @property
  def directory(self) -> str:
    return os.fspath(self._manager.directory)

  def all_steps(self) -> list[int]:
    """The steps of the complete checkpoints on disk, ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step (an interrupted save is not one), or None."""
    return self._manager.latest_step()

  def save(self, step: int, state: PyTree, data_state: dict[str, Any], *, force: bool = False) -> bool:
    """Starts saving `state` and `data_state` as `step` when it is due; returns whether a save started.

    Due means `step % save_every == 0`, or `force` (the end of training, a preemption). A step that is already on
    disk is not written again, so the loop may force a save at a step that was just saved periodically. The call
    returns after the arrays are copied off the accelerator: `state` may be donated to the next step right away.

    Args:
      step: the training step the state has reached.
      state: a pytree of jax.Arrays (the train state), sharded in any way.
      data_state: a JSON-serializable dict, the input iterator's state after this step's batch.
      force: save even when the step is not a multiple of `save_every`.

    Raises:
      CheckpointSaveError: this save, or the one before it still in flight, failed.
    """
    if not force and step % self.save_every:
      return False
    # orbax waits for the save in flight anyway; waiting here names its failure by its own step, and its checksum
    # hook, which reads `_saving`, finishes before that changes.
    self.wait()
    latest = self.latest_step()
    if latest is not None and step <= latest:
      return False
    args = ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state), _DATA: ocp.args.JsonSave(data_state)})
    self._saving = step
    try:
      # `force=True`: the decision is ours; orbax's own interval policy would second-guess it.
      return self._manager.save(step, args=args, force=True)
    except Exception as e:  # pylint: disable=broad-except  # whatever the filesystem raised, reported by step
      self._save_failed(step, e)

  def restore(self, abstract_state: PyTree, step: int | None = None, *,
              damaged_dir: str | os.PathLike | None = None) -> tuple[PyTree, dict[str, Any]]:
    """Reads a checkpoint onto the shardings of `abstract_state`, after checking it against its checksums.

    Without `step`, the newest checkpoint that restores completely: each newer one that does not is named in a
    warning with its failure and, when `damaged_dir` is given, moved there (`damaged_dir/<step>`) once an older one
    has restored (a failure of every checkpoint points at the machine, a missing mount or memory, rather than at the
    checkpoints: then nothing is moved). Only the run that owns the directory should move anything: `xmodal eval`
    falls back without it.

    Args:
      abstract_state: the target tree, normally `jax.eval_shape(init)` with each leaf a `jax.ShapeDtypeStruct`
        carrying the sharding it should have now; the mesh may differ from the one that wrote the checkpoint (8
        devices → 2, (4, 2) → (2, 1)). Its tree structure is what comes back: optax named tuples and flax boxes are
        rebuilt from it (without it they would come back as lists and dicts).
      step: the step to read; None reads the newest that restores.
      damaged_dir: where newer checkpoints that fail to restore are moved; None leaves them in place.

    Returns:
      (state, data_state).

    Raises:
      CheckpointNotFoundError: there is no checkpoint (at `step`).
      CheckpointDamagedError: `step` was given and its checkpoint cannot be read completely.
      NoRestorableCheckpointError: no step was given and no checkpoint restores.
      CheckpointMismatchError: the checkpoint holds other parameter paths or shapes than `abstract_state` (not a
        damage: every checkpoint of the run would say the same).
    """
    self.wait()  # a save of this very step may still be in flight.
    steps = self.all_steps()
    if step is not None:
      if step not in steps:
        raise CheckpointNotFoundError(f'No checkpoint of step {step} in {self.directory}; the steps there are '
                                      f'{steps}.')
      try:
        return self._restore_step(step, abstract_state)
      except _Unreadable as e:
        raise CheckpointDamagedError(
            f'Checkpoint step {step} ({self._step_dir(step)}) cannot be read: {e}\nThe steps in {self.directory} '
            f'are {steps}; name another with --step, or leave --step out for the newest that restores.') from None
    if not steps:
      raise CheckpointNotFoundError(f'No checkpoint in {self.directory}.')
    failures: dict[int, str] = {}
    for candidate in reversed(steps):
      try:
        restored = self._restore_step(candidate, abstract_state)
      except _Unreadable as e:
        log.warning('checkpoint step %d (%s) cannot be read: %s', candidate, self._step_dir(candidate), e)
        failures[candidate] = str(e)
        continue
      if failures:
        moved = self._move_aside(sorted(failures), damaged_dir) if damaged_dir is not None else []
        log.warning('restored step %d, the newest checkpoint that reads completely; skipped %s%s', candidate,
                    ', '.join(f'step {s}' for s in sorted(failures, reverse=True)),
                    f" (moved to {', '.join(moved)})" if moved else ' (left in place)')
      return restored
    lines = '\n'.join(f'  step {s} ({self._step_dir(s)}): {reason}' for s, reason in failures.items())
    raise NoRestorableCheckpointError(
        f'No checkpoint in {self.directory} restores:\n{lines}\nNothing was moved. If the files are intact (a '
        f'filesystem that was not mounted, too little memory), fix that and rerun; otherwise move the checkpoints '
        f'away to start the run afresh.')

  def _restore_step(self, step: int, abstract_state: PyTree) -> tuple[PyTree, dict[str, Any]]:
    """One step restored, or `_Unreadable` with the reason on every process (they decide together, so that all of
    them fall back to the same step)."""
    problem = self._verify(step) if jax.process_index() == 0 else None
    if any_process(problem is not None):
      raise _Unreadable(problem or 'process 0 found it damaged')
    try:
      saved = self._manager.item_metadata(step)[_STATE]
      if saved is None:
        raise ValueError(f'it has no {_STATE!r} item')
      check_compatible(_metadata_tree(saved), abstract_state, where=f'{self.directory} step {step}')
      args = ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(abstract_state), _DATA: ocp.args.JsonRestore()})
      restored = self._manager.restore(step, args=args)
    except CheckpointMismatchError:
      raise
    except Exception as e:  # pylint: disable=broad-except  # orbax and tensorstore raise many kinds for one cause
      problem = _one_line(e)
    if any_process(problem is not None):
      raise _Unreadable(problem or 'another process could not read it')
    return restored[_STATE], dict(restored[_DATA] or {})

  def _step_dir(self, step: int) -> epath.Path:
    return epath.Path(self.directory) / str(step)  # orbax's default step names: the step number

  def _verify(self, step: int) -> str | None:
    """What is wrong with the step's files by their checksums, or None (also for a step saved without them)."""
    step_dir = self._step_dir(step)
    sums = step_dir / CHECKSUMS
    if not sums.exists():
      log.info('checkpoint step %d has no %s (written before xmodal kept checksums): orbax\'s own checks only',
               step, CHECKSUMS)
      return None
    return check_files(step_dir, parse_checksums(sums.read_text()))

  def _write_checksums(self) -> None:
    """orbax's post-finalization hook (process 0, the save thread): the step's files as they will be committed."""
    tmp = epath.Path(self.directory) / f'{self._saving}{ocp.path.atomicity.TMP_DIR_SUFFIX}'
    # On object stores orbax writes the step in place and commits it with a marker file instead of a rename.
    step_dir = tmp if tmp.exists() else self._step_dir(self._saving)
    (step_dir / CHECKSUMS).write_text(format_checksums(digest_files(step_dir)))

  def _move_aside(self, steps: Sequence[int], damaged_dir: str | os.PathLike) -> list[str]:
    """Moves the steps' directories into `damaged_dir` (process 0), then re-reads the step list (every process)."""
    moved = []
    if jax.process_index() == 0:
      target_dir = epath.Path(damaged_dir)
      target_dir.mkdir(parents=True, exist_ok=True)
      for step in steps:
        target, n = target_dir / str(step), 1
        while target.exists():  # the same step damaged again in a later attempt: keep both
          target, n = target_dir / f'{step}.{n}', n + 1
        self._step_dir(step).rename(target)
        moved.append(os.fspath(target))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('xmodal checkpoints moved aside')
    self._manager.reload()
    return moved

  def _save_failed(self, step: int, error: BaseException) -> None:
    """Removes the step's partial directory (process 0) and raises CheckpointSaveError naming what is kept."""
    self._saving = None
    partial = epath.Path(self.directory) / f'{step}{ocp.path.atomicity.TMP_DIR_SUFFIX}'
    if jax.process_index() == 0 and partial.exists():
      try:
        partial.rmtree()  # never committed, so no restore reads it; on a full disk its space is what is missing
      except OSError as e:
        log.warning('could not remove the partial checkpoint %s: %s', partial, e)
    self._manager.reload()  # orbax listed the step when the save started
    latest = self.latest_step()
    kept = (f'The last complete checkpoint, step {latest}, is kept: rerunning the command resumes from it.'
            if latest is not None else 'There is no complete checkpoint yet: rerunning the command starts afresh.')
    raise CheckpointSaveError(f'Saving checkpoint step {step} to {self.directory} failed: {_one_line(error)}\n'
                              f'{kept} Free space or fix the filesystem first.') from error

  def wait(self) -> None:
    """Blocks until the save in flight (if any) is committed.

    Raises:
      CheckpointSaveError: it failed.
    """
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except  # whatever the filesystem raised, reported by step
      self._save_failed(self._saving, e)
    self._saving = None

  def close(self) -> None:
    """Waits for the save in flight and releases the manager's threads.

    Raises:
      CheckpointSaveError: the save in flight failed.
    """
    try:
      self.wait()
    finally:
      try:
        self._manager.close()
      except Exception as e:  # pylint: disable=broad-except  # the failed save, already reported by wait()
        log.info('closing the checkpoint manager after a failed save: %s', _one_line(e))

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()


# ------------------------------------------------------------------------------------------------------ checksums

def digest_files(root: epath.Path) -> dict[str, str]:
  """{'state/d/abc': sha256 hex} of every file below `root`, but the ones orbax rewrites at commit."""
  digests = {}
  for folder, _, files in root.walk():  # not rglob: epath refuses '**' (thousands of requests on GCS)
    for name in files:
      if name not in _UNCHECKED:
        digests[os.fspath((folder / name).relative_to(root))] = _sha256(folder / name)
  return dict(sorted(digests.items()))


def format_checksums(digests: dict[str, str]) -> str:
  """`sha256sum`'s format: `cd <step> && sha256sum -c checksums.sha256` checks a checkpoint by hand."""
  return ''.join(f'{digest}  {name}\n' for name, digest in digests.items())


def parse_checksums(text: str) -> dict[str, str]:
  return {name: digest for digest, _, name in (line.partition('  ') for line in text.splitlines() if line)}


def check_files(root: epath.Path, expected: dict[str, str]) -> str | None:
  """What differs between the files below `root` and their save-time `expected` digests (one line), or None."""
  problems = []
  for name, digest in expected.items():
    path = root / name
    if not path.exists():
      problems.append(f'{name} is missing')
    elif _sha256(path) != digest:
      problems.append(f'{name} differs from its save-time checksum (now {path.stat().length} bytes)')
  if not problems:
    return None
  more = f' (and {len(problems) - 1} more files)' if len(problems) > 1 else ''
  return f'{problems[0]}{more}'


def _sha256(path: epath.Path) -> str:
  digest = hashlib.sha256()
  with path.open('rb') as f:
    while block := f.read(1 << 23):
      digest.update(block)
  return digest.hexdigest()


def _one_line(error: BaseException, limit: int = 400) -> str:
  """The innermost message of an exception chain, on one line of at most about `limit` characters.

  orbax wraps tensorstore's precise error ('OUT_OF_RANGE: Error reading "params.vision.pos_embedding/0.0.0" ...') in a
  generic one that prints the whole TensorStore spec; the cause is the line worth reading. A long one keeps its
  start (what failed) and its end (the system's reason: 'File too large', 'No space left on device').
  """
  while (inner := error.__cause__ or (None if error.__suppress_context__ else error.__context__)) is not None:
    error = inner
  text = ' '.join(str(error).split()).split(' [tensorstore_spec=')[0]
  if len(text) > limit:
    text = f'{text[:limit // 2]} ... {text[-limit // 2:]}'
  return f'{type(error).__name__}: {text}'


# --------------------------------------------------------------------------------------------------- tree checking

def _key_name(key: Any) -> str:
  for attr in ('key', 'name', 'idx'):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _leaf_paths(tree: PyTree) -> dict[str, tuple[int, ...]]:
  """{'params/dense/kernel/value': shape} in tree order.

  Path entries are plain names, so that a named tuple's field (`GetAttrKey`) matches the dict key orbax stores it
  under, and a list index matches a tuple index.
  """
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(_key_name(k) for k in path): tuple(getattr(leaf, 'shape', np.shape(leaf))) for path, leaf in leaves}


def _metadata_tree(metadata: Any) -> PyTree:
  return getattr(metadata, 'tree', metadata)  # orbax 0.12 wraps the tree in a TreeMetadata.


def check_compatible(saved: PyTree, target: PyTree, *, where: str = 'the checkpoint') -> None:
  """Raises `CheckpointMismatchError` unless `saved` and `target` have the same leaf paths and shapes.

  Args:
    saved: the checkpoint's tree of array metadata (anything with `.shape`).
    target: the restore target (ShapeDtypeStructs or arrays).
    where: names the checkpoint in the message.
  """
  have, want = _leaf_paths(saved), _leaf_paths(target)
  problems = []
  for path, shape in want.items():
    if path in have and have[path] != shape:
      problems.append(f'first shape mismatch at {path!r}: checkpoint {have[path]}, target {shape}')
      break
  missing = [p for p in want if p not in have]
  unexpected = [p for p in have if p not in want]
  if missing:
    problems.append(f'missing in the checkpoint ({len(missing)}): {_head(missing)}')
  if unexpected:
    problems.append(f'unexpected in the checkpoint ({len(unexpected)}): {_head(unexpected)}')
  if problems:
    raise CheckpointMismatchError(
        f'Cannot restore {where}: it was written for another model or optimizer.\n  ' + '\n  '.join(problems)
        + '\nRestore with the config that wrote it, or start a new workdir.')


def _head(paths: Sequence[str], n: int = 10) -> str:
  return ', '.join(paths[:n]) + (', ...' if len(paths) > n else '')


# ---------------------------------------------------------------------------------------------------- preemption

def any_process(flag: bool) -> bool:
  """True on every process when `flag` is True on any of them (one tiny all-gather; local when single-process)."""
  if jax.process_count() == 1:
    return bool(flag)
  flags = multihost_utils.process_allgather(np.asarray(flag, dtype=np.int32))
  return bool(np.any(flags))


class PreemptionGuard:
  """Context manager that turns SIGTERM/SIGINT into a request to stop at the next step boundary.

  Inside the context a signal sets `requested` instead of killing the process; the loop then saves with
  `force=True` and returns. A second SIGINT raises KeyboardInterrupt, so that Ctrl-C twice still kills a stuck run.
  On exit the previous handlers are put back.

  Handlers can only be installed from the main thread (a Python rule); elsewhere the guard raises ValueError.
  """

  def __init__(self, signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT), *, check_every: int = 1):
    """Args:
      signals: the signals to intercept.
      check_every: in multi-process runs, `should_stop` communicates only at steps that are multiples of it (the
        flags are combined with a host-synchronising collective; every few steps keeps it out of the hot loop).
    """
    self.signals = tuple(signals)
    self.check_every = max(1, check_every)
    self.requested = False
    self.signal_received: int | None = None
    self._previous: dict[int, Any] = {}

  def _handle(self, signum: int, frame: types.FrameType | None) -> None:
    del frame
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.requested = True
    self.signal_received = signum
    logging.warning('Received %s: will checkpoint and stop at the next step boundary.', signal.Signals(signum).name)

  def __enter__(self) -> PreemptionGuard:
    for signum in self.signals:
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info: object) -> None:
    for signum, previous in self._previous.items():
      # None: the old handler was not installed from Python (e.g. by a C++ runtime); the default is the best guess.
      signal.signal(signum, signal.SIG_DFL if previous is None else previous)
    self._previous.clear()

  def should_stop(self, step: int) -> bool:
    """Whether the loop should checkpoint and stop after `step`; the same answer on every process.

    Must be called by every process at every step (it is collective at multiples of `check_every`).
    """
    if jax.process_count() == 1:
      return self.requested
    if step % self.check_every:
      return False
    return any_process(self.requested)
