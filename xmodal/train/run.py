"""A training run's workdir read back: the config it ran with and a checkpoint restored onto a mesh.

What `xmodal eval` and `xmodal export` (xmodal/cli/eval.py, xmodal/bundle/export.py) start from.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import ml_collections

from xmodal import config as config_lib
from xmodal.train import state as state_lib
from xmodal.train.checkpoint import Checkpointer
from xmodal.train.workdir import CONFIG_FILE, read_config


def load_run_config(workdir: pathlib.Path, spec: str | None, overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """The config given on the command line, else the one the run wrote into its workdir."""
  if spec:
    return config_lib.load(spec, overrides)
  saved = read_config(workdir)
  if saved is None:
    raise config_lib.ConfigError(f'{workdir / CONFIG_FILE} does not exist; pass --config')
  config = ml_collections.ConfigDict(saved)
  _restore_tuples(config)
  config_lib.apply_overrides(config, overrides)
  config_lib.validate(config)
  return config


def _restore_tuples(node: ml_collections.ConfigDict) -> None:
  """JSON turns tuples into lists; the code (and overrides' types) expect tuples."""
  for key, value in node.items():
    if isinstance(value, ml_collections.ConfigDict):
      _restore_tuples(value)
    elif isinstance(value, list):
      node[key] = _as_tuples(value)


def _as_tuples(value):
  return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def restore_state(config: ml_collections.ConfigDict, workdir: pathlib.Path, step: int | None, mesh):
  """(model, train state, data iterator state) of a checkpoint, restored onto `mesh`.

  `step` None: the newest checkpoint that restores; newer ones that do not are named in a warning and left in place
  (a reader does not move what the training run owns). A named step that is missing or damaged is an error listing
  the steps there are.
  """
  built = state_lib.setup(config, mesh, config.train.steps)
  model = built.model
  with Checkpointer(workdir / 'checkpoints', save_every=1, keep=1_000_000) as checkpointer:
    state, data_state = checkpointer.restore(built.abstract_state(), step=step)
  return model, state, data_state
