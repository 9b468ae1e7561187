"""The command line the benchmark scripts share: `--config FILE[:arg]`, their own flags, `--config.a.b=value` overrides."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import ml_collections

from xmodal import config as config_lib


def parser(description: str, example: str) -> argparse.ArgumentParser:
  """A parser with `--config` (the config file, e.g. `example`); the script adds its own flags."""
  result = argparse.ArgumentParser(description=description)
  result.add_argument('--config', required=True, help=f'a config file[:arg], e.g. {example}')
  return result


def parse(parser_: argparse.ArgumentParser, argv: Sequence[str] | None
          ) -> tuple[argparse.Namespace, ml_collections.ConfigDict]:
  """The script's flags and the loaded config with the `--config.a.b=value` overrides applied; anything else is an
  error that names it."""
  args, rest = parser_.parse_known_args(argv)
  unknown = [a for a in rest if not a.startswith('--config.')]
  if unknown:
    parser_.error(f'unrecognised arguments: {" ".join(unknown)} (config overrides are --config.a.b=value)')
  return args, config_lib.load(args.config, rest)
