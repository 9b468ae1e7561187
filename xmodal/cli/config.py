"""`xmodal config`: print the resolved config (the file, its argument and the overrides, validated).

  xmodal config --config configs/NAME.py[:arg] [--config.a.b=value ...]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def add_parser(sub) -> None:
  """Adds the command to `sub`, the `xmodal` parser's subparsers."""
  show = sub.add_parser('config', help='print the resolved config')
  show.add_argument('--config', required=True)


def run(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  from xmodal import config as config_lib  # pylint: disable=g-import-not-at-top  # it imports the model code
  print(config_lib.load(args.config, overrides))
  return 0
