"""`xmodal train`: train (or resume) the run in a workdir from a config file.

  xmodal train --config configs/NAME.py[:arg] --workdir DIR [--allow-config-change] [--verbose] [--config.a.b=value ...]
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from xmodal.cli import console


def add_parser(sub) -> None:
  """Adds the command to `sub`, the `xmodal` parser's subparsers."""
  train = sub.add_parser('train', help='train (or resume) a model')
  train.add_argument('--config', required=True, help='configs/NAME.py[:args]')
  train.add_argument('--workdir', required=True)
  train.add_argument('--allow-config-change', action='store_true',
                     help='resume even though the config differs from WORKDIR/config.json in keys that change the '
                     'training (the changes go to WORKDIR/config_history.jsonl)')
  train.add_argument('--verbose', action='store_true', help=f'libraries\' INFO on the console too (always in '
                     f'WORKDIR/{console.LOG_FILE})')


def run(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  # Imported here, not above: building the parser of every command must not load the model and training code.
  from xmodal import config as config_lib  # pylint: disable=g-import-not-at-top
  from xmodal.train import loop  # pylint: disable=g-import-not-at-top
  loop.train(config_lib.load(args.config, overrides), args.workdir, allow_config_change=args.allow_config_change)
  from xmodal.data import pipeline  # pylint: disable=g-import-not-at-top
  if pipeline.input_blocked():
    # Stopped while the input waited on a read that never returned (the run is saved): that thread stays inside
    # tf.data, and tearing the interpreter down around a live from_generator pipeline can hang (tensorflow#22632,
    # #21277; a CI run did not end within 120 s of such a stop). Nothing is left to do but flush what was written.
    logging.getLogger('xmodal').info('the input pipeline is still waiting on a read: ending without teardown')
    console.exit_now(0)
  return 0
