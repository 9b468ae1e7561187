"""The `xmodal` command: train, eval, bench, data, config.

  xmodal train --config configs/shapes.py[:size=tiny] --workdir DIR [--allow-config-change] [--verbose]
               [--config.optim.lr=3e-4 ...]
  xmodal eval  --config configs/shapes.py --workdir DIR [--split test] [--step N] [--verbose]
  xmodal bench --config configs/bench_cpu.py [--steps 20] [--verbose]
  xmodal data  build|bench|train-tokenizer ...
  xmodal config --config configs/shapes.py [--config.a.b=v]   (prints the resolved config)
  xmodal export --workdir DIR --out BUNDLE [--step N] [--dtype float32|bfloat16]
  xmodal search --bundle BUNDLE --images FOLDER --query TEXT [--k 10] [--rerank 64] [--out DIR] | bench ...
  xmodal serve  --bundle BUNDLE --images FOLDER [--index DIR] [--port 8000] [--host 127.0.0.1]   (a search page)
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import sys
from collections.abc import Sequence

from xmodal.cli import bench, config as show_config, console, eval as evaluate, huge_pages, train

# The commands whose arguments this parser reads, in the order `xmodal --help` lists them.
_COMMANDS = {'train': train, 'eval': evaluate, 'bench': bench, 'config': show_config}
# The commands that parse their own arguments (`main(argv) -> int`), by module and help line. Their modules are
# imported only when called: search must run from a bundle alone, with no model or training code.
_SELF_PARSED = {
    'data': ('xmodal.cli.data', 'xmodal data build|bench|train-tokenizer (see `xmodal data --help`)'),
    'export': ('xmodal.cli.export', 'a checkpoint as an inference bundle (see `xmodal export --help`)'),
    'search': ('xmodal.cli.search', 'search images with a bundle, or bench it (see `xmodal search --help`)'),
    'serve': ('xmodal.cli.serve', 'a local search page over a folder with a bundle (see `xmodal serve --help`)'),
}


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates `--config.a.b=v` / `--config.a.b v` overrides from the other arguments."""
  from xmodal.config import ConfigError  # pylint: disable=g-import-not-at-top  # the config imports the models
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
        raise ConfigError(f'override {arg} has no value')
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='xmodal', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='command', required=True)
  for command in _COMMANDS.values():
    command.add_parser(sub)
  for name, (_, help_line) in _SELF_PARSED.items():
    sub.add_parser(name, help=help_line, add_help=False)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  if argv is None:  # the process's own command line: it may start again with huge pages (not when called in-process)
    huge_pages.reexec_with_huge_pages()
  argv = list(sys.argv[1:] if argv is None else argv)
  # Both are plain classes: catching them imports neither models nor TensorFlow (search stays light).
  from xmodal.data.faults import DataError  # pylint: disable=g-import-not-at-top
  from xmodal.train.errors import RunError  # pylint: disable=g-import-not-at-top
  if argv and argv[0] in _SELF_PARSED:
    try:
      return importlib.import_module(_SELF_PARSED[argv[0]][0]).main(argv[1:]) or 0
    except (RunError, DataError) as e:
      return _report(e)
  from xmodal.config import ConfigError  # pylint: disable=g-import-not-at-top  # not before: search needs no models
  try:
    rest, overrides = _split_overrides(argv)
  except ConfigError as e:
    print(f'xmodal: config error: {e}', file=sys.stderr)
    return 2
  args = _parser().parse_args(rest)
  with console.logging_to(_log_file(args), verbose=getattr(args, 'verbose', False)):
    try:
      return _COMMANDS[args.command].run(args, overrides)
    except ConfigError as e:
      print(f'xmodal: config error: {e}', file=sys.stderr)
      return 2
    except (RunError, DataError) as e:
      return _report(e)


def _report(error: Exception) -> int:
  """A damaged checkpoint, a workdir in use, a failed save, bad input: the message names the step, file, key or line
  and says what to do, so it is printed alone (a traceback would only show where tf.data or orbax noticed); exit 1."""
  from xmodal.data.faults import DataError  # pylint: disable=g-import-not-at-top
  kind = 'data error' if isinstance(error, DataError) else 'error'
  print(f'xmodal: {kind}: {error}', file=sys.stderr)
  return 1


def _log_file(args: argparse.Namespace) -> pathlib.Path | None:
  """WORKDIR/log.txt for the commands with a workdir (eval's only when the workdir exists: a typo makes no folder)."""
  workdir = getattr(args, 'workdir', None)
  if workdir is None or (args.command == 'eval' and not pathlib.Path(workdir).is_dir()):
    return None
  return pathlib.Path(workdir) / console.LOG_FILE
