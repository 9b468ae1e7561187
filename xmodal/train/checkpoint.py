"""Checkpoints for the training loop: orbax, asynchronous, the last K kept, restorable onto another mesh.

A checkpoint step directory holds two items:
  state: the train state, any pytree of jax.Arrays (flax `nn.Partitioned` boxes included: they are pytrees whose
    leaf is `.value`, so they are saved as `.../kernel/value` and come back boxed when the target is boxed).
  data: a small JSON dict, the input iterator's state, so that a resumed run does not repeat or skip examples.

Orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it (or, on GCS, writes `commit_success.txt`) only
when every process has finished, so a run killed mid-save leaves the previous step as the latest one.

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

import logging
import os
import signal
import types
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

PyTree = Any

_STATE = 'state'
_DATA = 'data'


class CheckpointMismatchError(ValueError):
  """The checkpoint's tree does not fit the restore target (another model shape, missing or extra parameters)."""


class Checkpointer:
  """Saves the train state and the data-iterator state every `save_every` steps, keeps the last `keep`.

  Every method must be called by all processes of a multi-process run, at the same steps: saving and restoring are
  collective (each process writes and reads the shards it owns).
  """

  def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int, async_save: bool = True):
    """Opens (or creates) a checkpoint directory.

    Args:
      directory: a local or shared path, or a `gs://` URL; every process must see the same directory.
      save_every: `save` writes at steps that are multiples of it (and when forced).
      keep: how many of the latest checkpoints to keep; older ones are deleted.
      async_save: write in a background thread; `save` returns once the arrays are copied to host memory.
    """
    if save_every < 1 or keep < 1:
      raise ValueError(f'save_every and keep must be >= 1, got save_every={save_every}, keep={keep}.')
    self.save_every = save_every
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
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
    """
    if not force and step % self.save_every:
      return False
    latest = self.latest_step()
    if latest is not None and step <= latest:
      return False
    args = ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state), _DATA: ocp.args.JsonSave(data_state)})
    # `force=True`: the decision is ours; orbax's own interval policy would second-guess it.
    return self._manager.save(step, args=args, force=True)

  def restore(self, abstract_state: PyTree, step: int | None = None) -> tuple[PyTree, dict[str, Any]]:
    """Reads a checkpoint onto the shardings of `abstract_state`.

    Args:
      abstract_state: the target tree, normally `jax.eval_shape(init)` with each leaf a `jax.ShapeDtypeStruct`
        carrying the sharding it should have now; the mesh may differ from the one that wrote the checkpoint (8
        devices → 2, (4, 2) → (2, 1)). Its tree structure is what comes back: optax named tuples and flax boxes are
        rebuilt from it (without it they would come back as lists and dicts).
      step: the step to read; None reads the latest.

    Returns:
      (state, data_state).

    Raises:
      FileNotFoundError: there is no checkpoint (at `step`).
      CheckpointMismatchError: the checkpoint holds other parameter paths or shapes than `abstract_state`.
    """
    self.wait()  # a save of this very step may still be in flight.
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f'No checkpoint in {self.directory}.')
    elif step not in self.all_steps():
      raise FileNotFoundError(f'No checkpoint of step {step} in {self.directory}; there are {self.all_steps()}.')
    saved = self._manager.item_metadata(step)[_STATE]
    check_compatible(_metadata_tree(saved), abstract_state, where=f'{self.directory} step {step}')
    args = ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(abstract_state), _DATA: ocp.args.JsonRestore()})
    restored = self._manager.restore(step, args=args)
    return restored[_STATE], dict(restored[_DATA] or {})

  def wait(self) -> None:
    """Blocks until the save in flight (if any) is committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the save in flight and releases the manager's threads."""
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()


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
