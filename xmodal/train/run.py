"""A training run's workdir read back: the config it ran with and a checkpoint restored onto a mesh (eval and export).

`main` is `xmodal eval`: restore a checkpoint of a workdir and print the retrieval table (also written as JSON).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

import flax.linen as nn
import jax
import ml_collections

from xmodal import config as config_lib, distributed, sharding
from xmodal.train import evaluation, state as state_lib
from xmodal.train.checkpoint import Checkpointer


def load_run_config(workdir: pathlib.Path, spec: str | None, overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """The config given on the command line, else the one the run wrote into its workdir."""
  if spec:
    return config_lib.load(spec, overrides)
  saved = workdir / 'config.json'
  if not saved.exists():
    raise config_lib.ConfigError(f'{saved} does not exist; pass --config')
  config = ml_collections.ConfigDict(json.loads(saved.read_text()))
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
  """(model, train state, data iterator state) of a checkpoint, restored onto `mesh`."""
  built = state_lib.setup(config, mesh, config.train.steps)
  model = built.model
  with Checkpointer(workdir / 'checkpoints', save_every=1, keep=1_000_000) as checkpointer:
    state, data_state = checkpointer.restore(built.abstract_state(), step=step)
  return model, state, data_state


def main(workdir: str, spec: str | None, overrides: Sequence[str], split: str | None = None,
         step: int | None = None) -> int:
  distributed.initialize()
  workdir = pathlib.Path(workdir)
  config = load_run_config(workdir, spec, overrides)
  mesh = sharding.make_mesh(config.mesh.shape)
  model, state, _ = restore_state(config, workdir, step, mesh)
  restored_step = int(state.step)
  with jax.set_mesh(mesh), nn.logical_axis_rules([tuple(r) for r in config.mesh.rules]):
    results = evaluation.evaluate(config, model, state.params, mesh, split=split,
                                  progress=jax.process_index() == 0 and config.train.progress)
  results['step'] = restored_step
  if jax.process_index() == 0:
    print(f'step {restored_step}, split {results["split"]}: {results["num_images"]} images, '
          f'{results["num_texts"]} captions')
    print(evaluation.format_table(results))
    out = workdir / f'eval_{results["split"]}_{restored_step}.json'
    out.write_text(json.dumps(results, indent=2) + '\n')
    print(f'written to {out}')
  return 0
