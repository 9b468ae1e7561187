"""The `xmodal` command: train, eval, bench, data, config.

  xmodal train --config configs/shapes.py[:size=tiny] --workdir DIR [--config.optim.lr=3e-4 ...]
  xmodal eval  --config configs/shapes.py --workdir DIR [--split test] [--step N]
  xmodal bench --config configs/bench_cpu.py [--steps 20]
  xmodal data  build|bench|train-tokenizer ...
  xmodal config --config configs/shapes.py [--config.a.b=v]   (prints the resolved config)
  xmodal export --workdir DIR --out BUNDLE [--step N] [--dtype float32|bfloat16]
  xmodal search --bundle BUNDLE --images FOLDER --query TEXT [--k 10] [--rerank 64] [--out DIR] | bench ...
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from xmodal import config as config_lib


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates `--config.a.b=v` / `--config.a.b v` overrides from the other arguments."""
  rest, overrides = [], []
  argv = list(argv)
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith('--config.'):
      if '=' in arg:
        overrides.append(arg[len('--'):])
      elif i + 1 < len(argv):
        overrides.append(f'{arg[len("--"):]}={argv[i + 1]}')
        i += 1
      else:
        raise config_lib.ConfigError(f'override {arg} has no value')
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='xmodal', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='command', required=True)
  train = sub.add_parser('train', help='train (or resume) a model')
  train.add_argument('--config', required=True, help='configs/NAME.py[:args]')
  train.add_argument('--workdir', required=True)
  evaluate = sub.add_parser('eval', help='evaluate a checkpoint: retrieval table and binding accuracy')
  evaluate.add_argument('--config', help='default: the config saved in the workdir')
  evaluate.add_argument('--workdir', required=True)
  evaluate.add_argument('--split', default=None, help='data split (default: config.data.eval_split)')
  evaluate.add_argument('--step', type=int, default=None, help='checkpoint step (default: the latest)')
  bench = sub.add_parser('bench', help='time the jitted train step on synthetic batches')
  bench.add_argument('--config', required=True)
  bench.add_argument('--steps', type=int, default=20)
  show = sub.add_parser('config', help='print the resolved config')
  show.add_argument('--config', required=True)
  sub.add_parser('data', help='xmodal data build|bench|train-tokenizer (see `xmodal data --help`)', add_help=False)
  sub.add_parser('export', help='a checkpoint as an inference bundle (see `xmodal export --help`)', add_help=False)
  sub.add_parser('search', help='search images with a bundle, or bench it (see `xmodal search --help`)',
                 add_help=False)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] == 'data':
    from xmodal.data import cli as data_cli
    return data_cli.main(argv[1:]) or 0
  if argv and argv[0] == 'export':
    from xmodal import export
    return export.main(argv[1:])
  if argv and argv[0] == 'search':  # imports no model or training code: runs from the bundle alone
    from xmodal import search_cli
    return search_cli.main(argv[1:])
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')
  try:
    rest, overrides = _split_overrides(argv)
    args = _parser().parse_args(rest)
    if args.command == 'eval':
      from xmodal.train import eval_cli
      return eval_cli.main(args.workdir, args.config, overrides, split=args.split, step=args.step)
    config = config_lib.load(args.config, overrides)
  except config_lib.ConfigError as e:
    print(f'xmodal: config error: {e}', file=sys.stderr)
    return 2
  if args.command == 'config':
    print(config)
    return 0
  if args.command == 'train':
    from xmodal.train import loop
    loop.train(config, args.workdir)
    return 0
  if args.command == 'bench':
    from xmodal import bench
    bench.main(config, steps=args.steps)
    return 0
  return 1


if __name__ == '__main__':
  sys.exit(main())
