"""`xmodal export`: a training workdir's checkpoint as an inference bundle (xmodal/bundle/export.py writes it).

  xmodal export --workdir DIR --out BUNDLE [--step N] [--dtype float32|bfloat16] [--platforms cpu,cuda]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from xmodal.bundle import export as export_lib


def main(argv: Sequence[str]) -> int:
  # The bundle's own description is the help: what is exported and how.
  parser = argparse.ArgumentParser(prog='xmodal export', description=export_lib.__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True, help='a training workdir (config.json + checkpoints/)')
  parser.add_argument('--out', required=True, help='the bundle directory to write (must not exist)')
  parser.add_argument('--step', type=int, default=None, help='checkpoint step (default: the latest)')
  parser.add_argument('--dtype', choices=export_lib.DTYPES, default='float32')
  parser.add_argument('--platforms', default=','.join(export_lib.DEFAULT_PLATFORMS),
                      help='comma-separated jax.export platforms, e.g. cpu,cuda')
  args = parser.parse_args(argv)
  manifest = export_lib.export_workdir(args.workdir, args.out, args.step, args.dtype, args.platforms.split(','))
  size = sum(f['bytes'] for f in manifest['files'].values())
  print(f'bundle {args.out}: step {manifest["source"]["step"]}, {manifest["parameters"]["count"]:,} parameters '
        f'({manifest["dtype"]}), {len(manifest["files"])} files, {size / 1e6:.1f} MB')
  return 0
