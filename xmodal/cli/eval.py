"""`xmodal eval`: restore a checkpoint of a workdir and print the retrieval table (also written as JSON).

  xmodal eval --workdir DIR [--config configs/NAME.py[:arg]] [--split test] [--step N] [--pointing] [--verbose]
              [--config.a.b=v]
"""

from __future__ import annotations

import argparse
import json
import pathlib
from collections.abc import Sequence

from xmodal.cli import console


def add_parser(sub) -> None:
  """Adds the command to `sub`, the `xmodal` parser's subparsers."""
  evaluate = sub.add_parser('eval', help='evaluate a checkpoint: retrieval table and binding accuracy')
  evaluate.add_argument('--config', help='default: the config saved in the workdir')
  evaluate.add_argument('--workdir', required=True)
  evaluate.add_argument('--split', default=None, help='data split (default: config.data.eval_split)')
  evaluate.add_argument('--step', type=int, default=None, help='checkpoint step (default: the latest)')
  evaluate.add_argument('--pointing', action='store_true',
                        help='also the pointing test (shapes data): where each shape and colour word\'s heatmap '
                        'peaks, per explanation method and cross-attention layer, beside chance')
  evaluate.add_argument('--verbose', action='store_true', help=f'libraries\' INFO on the console too (always in '
                        f'WORKDIR/{console.LOG_FILE})')


def run(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  # Imported here, not above: building the parser of every command must not load the model and training code.
  # pylint: disable=g-import-not-at-top
  import flax.linen as nn
  import jax

  from xmodal import distributed, sharding
  from xmodal.train import evaluation, pointing
  from xmodal.train.run import load_run_config, restore_state
  # pylint: enable=g-import-not-at-top

  distributed.initialize()
  workdir = pathlib.Path(args.workdir)
  config = load_run_config(workdir, args.config, overrides)
  mesh = sharding.make_mesh(config.mesh.shape)
  model, state, _ = restore_state(config, workdir, args.step, mesh)
  restored_step = int(state.step)
  with jax.set_mesh(mesh), nn.logical_axis_rules([tuple(r) for r in config.mesh.rules]):
    results = evaluation.evaluate(config, model, state.params, mesh, split=args.split,
                                  progress=jax.process_index() == 0 and config.train.progress)
    if args.pointing:
      results['pointing'] = pointing.run(config, model, state.params, results['split'],
                                         progress=jax.process_index() == 0 and config.train.progress)
  results['step'] = restored_step
  if jax.process_index() == 0:
    print(f'step {restored_step}, split {results["split"]}: {results["num_images"]} images, '
          f'{results["num_texts"]} captions')
    print(evaluation.format_table(results))
    if args.pointing:
      print(pointing.format_table(results['pointing']) if results['pointing'] else
            'pointing: not a shapes dataset (the test reads the scenes\' metadata)')
    out = workdir / f'eval_{results["split"]}_{restored_step}.json'
    out.write_text(json.dumps(results, indent=2) + '\n')
    print(f'written to {out}')
  return 0
