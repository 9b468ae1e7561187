"""`xmodal search`: text → images over a folder with an exported bundle, and its throughput benchmark.

  xmodal search --bundle BUNDLE --images FOLDER --query "a red circle left of a blue square" [--k 10] [--rerank 64]
                [--out DIR] [--index DIR] [--batch-size 32]
  xmodal search bench --bundle BUNDLE [--gallery-size 512] [--queries 32] [--k 10] [--rerank 64]   (or --bench)

Prints the ranked list (rank, ITC score, ITM score, path); --out writes DIR/results.html and DIR/results.png.
--index reuses an index saved there (embedding only images it lacks) or saves the new one there.
Imports only `xmodal.inference`: no model or training code, no TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence

from xmodal.inference import BundleError, Index, Retriever, bench as bench_lib, contact_sheet
from xmodal.inference.index import list_images


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='xmodal search', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--bundle', required=True, help='a bundle written by `xmodal export`')
  parser.add_argument('--images', help='folder of gallery images (searched recursively)')
  parser.add_argument('--query', help='the text to search for')
  parser.add_argument('--k', type=int, default=10, help='results to show')
  parser.add_argument('--rerank', type=int, default=64, help='ITC candidates re-ranked by ITM (0 = ITC only)')
  parser.add_argument('--out', help='folder for the contact sheet (results.html, results.png)')
  parser.add_argument('--index', help='index folder: loaded and extended if present, else written')
  parser.add_argument('--batch-size', type=int, default=32)
  parser.add_argument('--no-progress', action='store_true', help='no tqdm bar while indexing')
  parser.add_argument('--ann', choices=('flat', 'hnsw', 'ivf'),
                      help='FAISS candidates: loaded from --index if saved there with this kind, else built (and saved)')
  parser.add_argument('--milvus', metavar='URI',
                      help='search through Milvus: a .db file (Milvus Lite) or a server URI; needs --index as its folder')
  parser.add_argument('--bench', action='store_true', help='measure index and query throughput instead')
  parser.add_argument('--gallery-size', type=int, default=512, help='bench: synthetic gallery images')
  parser.add_argument('--queries', type=int, default=32, help='bench: timed queries per setting')
  return parser


def _index(retriever: Retriever, images: str, index_dir: str | None, progress: bool) -> Index:
  if index_dir and (pathlib.Path(index_dir) / 'index.json').exists():
    index = retriever.load_index(index_dir)
    known = set(index.names)
    retriever.add(index, [p for p in list_images(images) if p not in known], progress=progress)
  else:
    index = retriever.index(images, progress=progress)
  if index_dir:
    index.save(index_dir)
  return index


def _ann(args: argparse.Namespace, index: Index):
  """The candidate generator --ann / --milvus ask for (None: exact search), kept beside the index in --index."""
  if args.milvus:
    from xmodal.inference import milvus_store  # pylint: disable=g-import-not-at-top
    if not args.index:
      raise SystemExit('xmodal search: --milvus needs --index DIR for its side store (tokens, names)')
    folder = pathlib.Path(args.index) / 'milvus'
    return milvus_store.save_gallery(folder, index, uri=args.milvus)
  if not args.ann:
    return None
  from xmodal.inference.faiss_index import FaissIndex, META_FILE  # pylint: disable=g-import-not-at-top
  if args.index and (pathlib.Path(args.index) / META_FILE).exists():
    try:
      ann = FaissIndex.load(args.index, count=len(index))
      if ann.kind == args.ann:
        return ann
    except ValueError:
      pass  # built over another gallery (images added since): rebuilt below
  ann = FaissIndex.build(index.embeddings, args.ann)
  if args.index:
    ann.save(args.index)
  return ann


def main(argv: Sequence[str]) -> int:
  argv = list(argv)
  if argv and argv[0] == 'bench':
    argv = ['--bench', *argv[1:]]
  args = _parser().parse_args(argv)
  try:
    retriever = Retriever.load(args.bundle, batch_size=args.batch_size)
  except BundleError as e:
    print(f'xmodal search: bad bundle: {e}', file=sys.stderr)
    return 2
  if args.bench:
    results = bench_lib.run(retriever, gallery_size=args.gallery_size, queries=args.queries, k=args.k,
                            rerank=args.rerank, batch_size=args.batch_size)
    print(f'index {results["index_images_per_s"]:.1f} images/s; queries {results["queries_per_s_itc"]:.1f}/s '
          f'(ITC), {results["queries_per_s_itc+itm"]:.1f}/s (ITC + ITM re-rank of {args.rerank})')
    print(json.dumps(results))
    return 0
  if not args.images or args.query is None:
    print('xmodal search: --images and --query are required (or use --bench)', file=sys.stderr)
    return 2
  index = _index(retriever, args.images, args.index, progress=not args.no_progress)
  hits = retriever.search(args.query, index, k=args.k, rerank=args.rerank, ann=_ann(args, index))
  print(f'{len(index)} images, query {args.query!r}, top {len(hits)} (re-ranked: {min(args.rerank, len(index))})')
  print(f'{"rank":>4}  {"ITC":>7}  {"ITM":>7}  path')
  for rank, hit in enumerate(hits, 1):
    itm = '      —' if hit.itm is None else f'{hit.itm:7.3f}'
    print(f'{rank:4d}  {hit.itc:7.4f}  {itm}  {hit.name}')
  if args.out:
    page, png = contact_sheet.write(args.query, hits, args.out)
    print(f'contact sheet: {page} {png}')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
