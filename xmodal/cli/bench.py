"""`xmodal bench`: time the jitted train step on synthetic batches; the last line printed is one JSON object.

  xmodal bench --config configs/bench_cpu.py [--steps 20] [--verbose] [--config.a.b=value ...]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence


def add_parser(sub) -> None:
  """Adds the command to `sub`, the `xmodal` parser's subparsers."""
  bench = sub.add_parser('bench', help='time the jitted train step on synthetic batches')
  bench.add_argument('--config', required=True)
  bench.add_argument('--steps', type=int, default=20)
  bench.add_argument('--verbose', action='store_true', help='libraries\' INFO on the console too')


def run(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  # Imported here, not above: building the parser of every command must not load the model and training code.
  from xmodal import config as config_lib  # pylint: disable=g-import-not-at-top
  from xmodal.train import bench  # pylint: disable=g-import-not-at-top
  result = bench.run(config_lib.load(args.config, overrides), steps=args.steps)
  for key, value in result.items():
    print(f'{key:>24}: {value:.4g}' if isinstance(value, float) else f'{key:>24}: {value}')
  print(json.dumps(result))
  return 0
