"""`xmodal serve`: a local search page over an images folder with an exported bundle.

  xmodal serve --bundle BUNDLE --images FOLDER [--index DIR] [--port 8000] [--host 127.0.0.1] [--batch-size 32]

Indexes FOLDER (with --index: loads DIR's index and syncs it with FOLDER, or writes a new one there, as
`xmodal search --index` does), then serves http://HOST:PORT/: a query box, the results with their ITC and ITM scores,
and, for a clicked result, where each word of the query looks in it. The JSON API is xmodal.inference.server's.
Binds 127.0.0.1 unless --host says otherwise: the page serves the folder's images to whoever reaches it.
Needs the `serve` extra (fastapi, uvicorn): pip install -e '.[serve]'.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys
from collections.abc import Sequence

from xmodal.inference import BundleError, Index, Retriever
from xmodal.inference.index import INDEX_FILE

_NEEDS = ('fastapi', 'uvicorn')


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='xmodal serve', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--bundle', required=True, help='a bundle written by `xmodal export`')
  parser.add_argument('--images', required=True, help='folder of gallery images (searched recursively)')
  parser.add_argument('--index', help='index folder: loaded and synced with --images if present, else written')
  parser.add_argument('--host', default='127.0.0.1', help='address to bind (0.0.0.0: every network interface)')
  parser.add_argument('--port', type=int, default=8000)
  parser.add_argument('--batch-size', type=int, default=32)
  parser.add_argument('--max-k', type=int, default=100, help='the most results one request may ask for')
  parser.add_argument('--no-progress', action='store_true', help='no tqdm bar while indexing')
  return parser


def _index(retriever: Retriever, args: argparse.Namespace) -> Index:
  """--index's saved index synced with --images, or a new one (kept in --index when given)."""
  progress = not args.no_progress
  if args.index and (pathlib.Path(args.index) / INDEX_FILE).exists():
    index = retriever.load_index(args.index)
    retriever.sync(index, args.images, progress=progress)
    return index
  return retriever.index(args.images, progress=progress, path=args.index)


def main(argv: Sequence[str]) -> int:
  args = _parser().parse_args(list(argv))
  missing = [name for name in _NEEDS if importlib.util.find_spec(name) is None]
  if missing:  # before the bundle loads and the folder is indexed, which may take long
    print(f'xmodal serve: needs {" and ".join(missing)}; install the serve extra: pip install -e \'.[serve]\'',
          file=sys.stderr)
    return 2
  import uvicorn  # pylint: disable=g-import-not-at-top
  from xmodal.inference import server  # pylint: disable=g-import-not-at-top  # imports fastapi
  try:
    retriever = Retriever.load(args.bundle, batch_size=args.batch_size)
  except BundleError as e:
    print(f'xmodal serve: bad bundle: {e}', file=sys.stderr)
    return 2
  try:
    index = _index(retriever, args)
  # A missing folder, an unusable index: the message names it.
  except (ValueError, OSError) as e:
    print(f'xmodal serve: {e}', file=sys.stderr)
    return 2
  print(f'index: {len(index)} images ({index.report.summary()})')
  app = server.create_app(retriever, index, args.images, max_k=args.max_k)
  print(f'serving http://{args.host}:{args.port}/  (Ctrl-C stops)')
  uvicorn.run(app, host=args.host, port=args.port, log_level='warning')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
