"""The `xmodal` command: train, eval, bench, data, config.

  xmodal train --config configs/shapes.py[:size=tiny] --workdir DIR [--verbose] [--config.optim.lr=3e-4 ...]
  xmodal eval  --config configs/shapes.py --workdir DIR [--split test] [--step N] [--verbose]
  xmodal bench --config configs/bench_cpu.py [--steps 20] [--verbose]
  xmodal data  build|bench|train-tokenizer ...
  xmodal config --config configs/shapes.py [--config.a.b=v]   (prints the resolved config)
  xmodal export --workdir DIR --out BUNDLE [--step N] [--dtype float32|bfloat16]
  xmodal search --bundle BUNDLE --images FOLDER --query TEXT [--k 10] [--rerank 64] [--out DIR] | bench ...
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pathlib
import sys
from collections.abc import Iterator, Sequence

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


LOG_FILE = 'log.txt'  # in the workdir: every log line of every library, appended
_FORMAT = '%(asctime)s %(levelname)s %(name)s: %(message)s'


class _ConsoleHandler(logging.Handler):
  """Writes to the current sys.stderr through tqdm, so a line lands above the progress bars instead of inside one."""

  def emit(self, record: logging.LogRecord) -> None:
    try:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      tqdm.write(self.format(record), file=sys.stderr)
    except Exception:  # pylint: disable=broad-except
      self.handleError(record)


class _LogFile(logging.FileHandler):
  """Appends to a file opened (its folder made) at the first record: a command stopped by its config makes no folder."""

  def __init__(self, path: pathlib.Path):
    super().__init__(path, mode='a', encoding='utf-8', delay=True)
    self.setFormatter(logging.Formatter(_FORMAT))

  def _open(self):
    pathlib.Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
    return super()._open()


def _ours_or_warning(record: logging.LogRecord) -> bool:
  """The console's filter: xmodal's own lines at any level, anything else from WARNING up."""
  return record.levelno >= logging.WARNING or record.name == 'xmodal' or record.name.startswith('xmodal.')


@contextlib.contextmanager
def logging_to(log_file: pathlib.Path | None, verbose: bool = False) -> Iterator[None]:
  """The one place xmodal configures logging, for the length of a command.

  Console (stderr): xmodal's lines, and warnings and errors from any library; `verbose` adds every library's INFO.
  `log_file` (appended, with timestamps and logger names): every INFO line, xmodal's and the libraries' (absl,
  orbax, tensorflow, tfds, jax). absl's records reach the root logger like any other, through its 'absl' logger; its
  own stderr handler stays off. TensorFlow's C++ INFO is silenced unless `verbose` or TF_CPP_MIN_LOG_LEVEL is set
  (its oneDNN notice is not: TensorFlow prints it whatever the level).
  """
  if not verbose:
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')  # read when TensorFlow loads: xmodal.data imports it later
  root = logging.getLogger()
  try:
    from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
    root.removeHandler(absl_logging.get_absl_handler())
  except ImportError:
    pass
  console = _ConsoleHandler()
  console.setFormatter(logging.Formatter(_FORMAT, datefmt='%H:%M:%S'))
  if not verbose:
    console.addFilter(_ours_or_warning)
  handlers: list[logging.Handler] = [console]
  if log_file is not None:
    handlers.append(_LogFile(log_file))
  level = root.level
  root.setLevel(logging.INFO)
  for handler in handlers:
    root.addHandler(handler)
  try:
    yield
  finally:
    for handler in handlers:
      root.removeHandler(handler)
      handler.close()
    root.setLevel(level)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='xmodal', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='command', required=True)
  train = sub.add_parser('train', help='train (or resume) a model')
  train.add_argument('--config', required=True, help='configs/NAME.py[:args]')
  train.add_argument('--workdir', required=True)
  train.add_argument('--verbose', action='store_true', help=f'libraries\' INFO on the console too (always in '
                     f'WORKDIR/{LOG_FILE})')
  evaluate = sub.add_parser('eval', help='evaluate a checkpoint: retrieval table and binding accuracy')
  evaluate.add_argument('--config', help='default: the config saved in the workdir')
  evaluate.add_argument('--workdir', required=True)
  evaluate.add_argument('--split', default=None, help='data split (default: config.data.eval_split)')
  evaluate.add_argument('--step', type=int, default=None, help='checkpoint step (default: the latest)')
  evaluate.add_argument('--verbose', action='store_true', help=f'libraries\' INFO on the console too (always in '
                        f'WORKDIR/{LOG_FILE})')
  bench = sub.add_parser('bench', help='time the jitted train step on synthetic batches')
  bench.add_argument('--config', required=True)
  bench.add_argument('--steps', type=int, default=20)
  bench.add_argument('--verbose', action='store_true', help='libraries\' INFO on the console too')
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
    from xmodal.bundle import export
    return export.main(argv[1:])
  if argv and argv[0] == 'search':  # imports no model or training code: runs from the bundle alone
    from xmodal import search_cli
    return search_cli.main(argv[1:])
  try:
    rest, overrides = _split_overrides(argv)
  except config_lib.ConfigError as e:
    print(f'xmodal: config error: {e}', file=sys.stderr)
    return 2
  args = _parser().parse_args(rest)
  with logging_to(_log_file(args), verbose=getattr(args, 'verbose', False)):
    return _run(args, overrides)


def _log_file(args: argparse.Namespace) -> pathlib.Path | None:
  """WORKDIR/log.txt for the commands with a workdir (eval's only when the workdir exists: a typo makes no folder)."""
  workdir = getattr(args, 'workdir', None)
  if workdir is None or (args.command == 'eval' and not pathlib.Path(workdir).is_dir()):
    return None
  return pathlib.Path(workdir) / LOG_FILE


def _run(args: argparse.Namespace, overrides: list[str]) -> int:
  try:
    if args.command == 'eval':
      from xmodal.train import run
      return run.main(args.workdir, args.config, overrides, split=args.split, step=args.step)
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
    from xmodal.train import bench
    bench.main(config, steps=args.steps)
    return 0
  return 1


if __name__ == '__main__':
  sys.exit(main())
