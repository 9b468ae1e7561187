"""`xmodal search`: text or image → images over a folder with an exported bundle; index sync; throughput benchmark.

  xmodal search --bundle BUNDLE --images FOLDER --query "a red circle left of a blue square" [--query TEXT ...]
                [--query-image PATH ...] [--k 10] [--rerank 64] [--json] [--out DIR [--explain]] [--index DIR]
                [--strict] [--batch-size 32] [--tokens-dtype float16] [--no-tokens] [--keys-values]
  xmodal search --bundle BUNDLE --index DIR --query TEXT                 (search a saved index as it is)
  xmodal search sync --bundle BUNDLE --images FOLDER --index DIR [--strict] [--json]
  xmodal search bench --bundle BUNDLE [--gallery-size 512] [--queries 32] [--k 10] [--rerank 64]   (or --bench)
                      [--compare [--rounds 3]]

Prints, per query, the ranked list (rank, ITC score, ITM score, path); --json prints one JSON document instead.
--index keeps the index in DIR and follows FOLDER: new files are embedded, changed ones re-embedded, deleted ones
dropped, and the counts printed (`sync` does only that). Unreadable images are skipped and listed (--strict: the first
one is an error). Bad arguments, bad files and unusable indexes end with one line `xmodal search: ...` and exit 2.
--out writes DIR/results.html and DIR/results.png (DIR/1/, DIR/2/, ... for several queries); with --explain, each
text query's results also get one overlay per content word of the query (a cross-attention map on the
image), written as DIR/explain/RANK_WORD.png and shown beside each result in the page.
bench --compare times re-ranking the way older bundles and indexes ran it (full text length, image tokens) against
today's (each query at its length, the index's kept keys and values), alternating, in one process.
Imports only `xmodal.inference`: no model or training code, no TensorFlow.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import warnings
from collections.abc import Sequence

from xmodal.inference import BundleError, Hit, Index, Retriever, bench as bench_lib, contact_sheet
from xmodal.inference import explain as explain_lib
from xmodal.inference.preprocess import load_rgb
from xmodal.inference.index import INDEX_FILE, TOKENS_DTYPES
from xmodal.inference.retriever import QueryWarning, check_count, check_texts


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='xmodal search', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--bundle', required=True, help='a bundle written by `xmodal export`')
  parser.add_argument('--images', help='folder of gallery images (searched recursively, links followed once)')
  parser.add_argument('--query', action='append', default=[], help='a text to search for (repeat for several)')
  parser.add_argument('--query-image', action='append', default=[], help='an image to find similar ones to (repeat)')
  parser.add_argument('--k', type=int, default=10, help='results to show per query')
  parser.add_argument('--rerank', type=int, default=64, help='ITC candidates re-ranked by ITM (0 = ITC only)')
  parser.add_argument('--json', action='store_true', help='print one JSON document: index counts, hits, warnings')
  parser.add_argument('--out', help='folder for the contact sheet (results.html, results.png)')
  parser.add_argument('--explain', action='store_true',
                      help='with --out: each text query\'s results get one overlay per content word (why it matched)')
  parser.add_argument('--index', help='index folder: loaded and synced with --images if present, else written')
  parser.add_argument('--strict', action='store_true', help='an unreadable image is an error instead of skipped')
  parser.add_argument('--tokens-dtype', choices=TOKENS_DTYPES, default='float32',
                      help='a new index stores image tokens in this dtype (float16: half the disk)')
  parser.add_argument('--no-tokens', action='store_true',
                      help='a new index keeps no image tokens (re-ranking recomputes the candidates\')')
  parser.add_argument('--keys-values', action='store_true',
                      help='a new index also keeps every fusion cross-attention\'s keys and values of each image, so '
                      'that re-ranking projects only the query: cross-attention layers x 2 x (1+N) x text width x 4 '
                      'bytes per image on disk, memory-mapped (the shapes model: 3 x 2 x 65 x 128 x 4 = 195 KiB, 6x '
                      'its tokens); needs a bundle exported with image_keys_values')
  parser.add_argument('--batch-size', type=int, default=32)
  parser.add_argument('--no-progress', action='store_true', help='no tqdm bar while indexing')
  parser.add_argument('--ann', choices=('flat', 'hnsw', 'ivf'),
                      help='FAISS candidates: loaded from --index if saved there with this kind, else built (and saved)')
  parser.add_argument('--milvus', metavar='URI',
                      help='search through Milvus: a .db file (Milvus Lite) or a server URI; needs --index (DIR/milvus)')
  parser.add_argument('--bench', action='store_true', help='measure index and query throughput instead')
  parser.add_argument('--gallery-size', type=int, default=512, help='bench: synthetic gallery images')
  parser.add_argument('--queries', type=int, default=32, help='bench: timed queries per setting')
  parser.add_argument('--compare', action='store_true',
                      help='bench: also time re-ranking the old way (full text length, image tokens), alternating')
  parser.add_argument('--rounds', type=int, default=3, help='bench --compare: timed rounds of each way')
  return parser


def _index(retriever: Retriever, args: argparse.Namespace) -> Index:
  """The index to search: DIR's synced with --images, DIR's as it is, or a new one (written to DIR if given)."""
  progress = not args.no_progress and not args.json
  if args.index and (pathlib.Path(args.index) / INDEX_FILE).exists():
    index = retriever.load_index(args.index)
    if args.images:
      retriever.sync(index, args.images, batch_size=args.batch_size, progress=progress, strict=args.strict)
    return index
  if not args.images:
    raise ValueError('--images is required (or --index with a saved index)')
  return retriever.index(args.images, batch_size=args.batch_size, progress=progress, keep_tokens=not args.no_tokens,
                         tokens_dtype=args.tokens_dtype, path=args.index, strict=args.strict,
                         keep_keys_values=args.keys_values)


def _report_json(index: Index) -> dict:
  report = index.report
  return {'images': len(index), **report.counts(), 'unreadable_files': [{'path': p, 'reason': r} for p, r in
                                                                         report.unreadable],
          'duplicate_groups': report.duplicates, 'skipped_link_list': [{'link': l, 'reason': r} for l, r in
                                                                        report.skipped_links]}


def _print_report(index: Index) -> None:
  report = index.report
  print(f'index: {len(index)} images ({report.summary()})')
  for path, reason in report.unreadable:
    print(f'  skipped (unreadable): {path}: {reason}')
  for group in report.duplicates:
    print(f'  same content: {" = ".join(group)}')
  for link, reason in report.skipped_links:
    print(f'  link not followed: {link}: {reason}')


def _search(retriever: Retriever, index: Index, args: argparse.Namespace) -> list[tuple[str, str, list[Hit]]]:
  """(kind, query, hits) for every --query, then every --query-image."""
  results, ann = [], _ann(args, index)
  try:
    if args.query:
      hits = retriever.search(args.query, index, k=args.k, rerank=args.rerank, ann=ann)
      results += [('text', q, h) for q, h in zip(args.query, hits)]
    if args.query_image:
      hits = retriever.search_images(args.query_image, index, k=args.k, ann=ann)
      results += [('image', q, h) for q, h in zip(args.query_image, hits)]
  finally:
    if hasattr(ann, 'close'):  # a Milvus connection (Milvus Lite: its embedded server, which holds the .db file)
      ann.close()
  return results


def _print_hits(kind: str, query: str, hits: list[Hit], rerank: int) -> None:
  reranked = f're-ranked: {min(rerank, len(hits))}' if kind == 'text' else 'image similarity, ITC only'
  print(f'\n{kind} query {query!r}, top {len(hits)} ({reranked})')
  print(f'{"rank":>4}  {"ITC":>7}  {"ITM":>7}  path')
  for rank, hit in enumerate(hits, 1):
    itm = '      —' if hit.itm is None else f'{hit.itm:7.3f}'
    print(f'{rank:4d}  {hit.itc:7.4f}  {itm}  {hit.name}')


def _run(retriever: Retriever, args: argparse.Namespace, sync_only: bool) -> None:
  """Indexes, searches and prints; input errors propagate as ValueError / OSError for main to print."""
  if not sync_only:  # before indexing, which may take long: a bad argument should not wait for it
    check_count('k', args.k, 1), check_count('rerank', args.rerank, 0)
    if args.explain and not (args.out and args.query):
      raise ValueError('--explain draws word overlays into the contact sheet: give --out DIR and a --query')
    if args.query:
      check_texts('query', args.query)
  index = _index(retriever, args)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always', QueryWarning)
    results = [] if sync_only else _search(retriever, index, args)
  notes = [str(w.message) for w in caught if issubclass(w.category, QueryWarning)]
  for note in notes:
    print(f'xmodal search: warning: {note}', file=sys.stderr)
  if args.json:
    document = {'index': _report_json(index), 'warnings': notes,
                'results': [{'kind': kind, 'query': query, 'hits': [{'rank': rank, **dataclasses.asdict(hit)}
                                                                    for rank, hit in enumerate(hits, 1)]}
                            for kind, query, hits in results]}
    print(json.dumps(document, indent=1))
    return
  _print_report(index)
  for number, (kind, query, hits) in enumerate(results, 1):
    _print_hits(kind, query, hits, args.rerank)
    if args.out:
      out = pathlib.Path(args.out) / (str(number) if len(results) > 1 else '')
      overlays = _write_overlays(retriever, query, hits, out / 'explain') if args.explain and kind == 'text' else None
      page, png = contact_sheet.write(query, hits, out, overlays)
      print(f'contact sheet: {page} {png}')


def _write_overlays(retriever: Retriever, query: str, hits: list[Hit], out: pathlib.Path
                    ) -> list[list[tuple[str, pathlib.Path]]]:
  """Each hit's image lit by each content word's heatmap, written as out/RANK_WORD.png: [(word, path)] per hit."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  out.mkdir(parents=True, exist_ok=True)
  overlays = []
  for rank, hit in enumerate(hits, 1):
    rgb = load_rgb(hit.name)
    written = []
    for number, (word, heat) in enumerate(retriever.explain(query, rgb).words()):
      path = out / f'{rank:02d}_{number}_{_file_safe(word)}.png'
      Image.fromarray(explain_lib.overlay(rgb, heat)).save(path)
      written.append((word, path))
    overlays.append(written)
  return overlays


def _file_safe(word: str) -> str:
  return ''.join(c if c.isalnum() else '_' for c in word)[:32]


def _ann(args: argparse.Namespace, index: Index):
  """The candidate generator --ann / --milvus ask for (None: exact search), kept beside the index in --index."""
  if args.milvus:
    from xmodal.inference import milvus_store  # pylint: disable=g-import-not-at-top
    if not args.index:
      raise ValueError('--milvus needs --index DIR: the gallery reads names and tokens from the index folder')
    # Reused while it holds the index's vectors; updated or rebuilt after a sync changed them.
    return milvus_store.save_gallery(pathlib.Path(args.index) / 'milvus', index, uri=args.milvus)
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


def _print_comparison(compare: dict) -> None:
  for name in ('old', 'new'):
    way = compare[name]
    what = (f'{"each query at its length" if way["query_length"] else "full text length"}, '
            f'{"kept keys and values" if way["keys_values"] else "image tokens"}')
    rates = ', '.join(f'{r:.1f}' for r in way['queries_per_s'])
    print(f're-ranking {name} ({what}): median {way["median"]:.1f} queries/s of {rates}')
  print(f'ratio new/old {compare["ratio"]:.2f}x; largest ITM score difference {compare["max_itm_difference"]:.2e}; '
        f'same rankings: {"yes" if compare["same_rankings"] else "no"}')


def main(argv: Sequence[str]) -> int:
  argv = list(argv)
  sync_only = bool(argv) and argv[0] == 'sync'
  if argv and argv[0] in ('bench', 'sync'):
    argv = [*(['--bench'] if argv[0] == 'bench' else []), *argv[1:]]
  args = _parser().parse_args(argv)
  try:
    retriever = Retriever.load(args.bundle, batch_size=args.batch_size)
  except BundleError as e:
    print(f'xmodal search: bad bundle: {e}', file=sys.stderr)
    return 2
  if args.bench:
    results = bench_lib.run(retriever, gallery_size=args.gallery_size, queries=args.queries, k=args.k,
                            rerank=args.rerank, batch_size=args.batch_size, compare=args.compare, rounds=args.rounds)
    print(f'index {results["index_images_per_s"]:.1f} images/s; queries {results["queries_per_s_itc"]:.1f}/s '
          f'(ITC), {results["queries_per_s_itc+itm"]:.1f}/s (ITC + ITM re-rank of {args.rerank})')
    if args.compare:
      _print_comparison(results['compare'])
    print(json.dumps(results))
    return 0
  if sync_only and not (args.images and args.index):
    print('xmodal search sync: --images and --index are required', file=sys.stderr)
    return 2
  if not sync_only and not (args.query or args.query_image):
    print('xmodal search: give --query TEXT or --query-image PATH (or use sync / --bench)', file=sys.stderr)
    return 2
  try:
    _run(retriever, args, sync_only)
  # Bad input (a folder, an image, an index, an argument): its message names it, a traceback would add nothing.
  except (ValueError, OSError) as e:
    print(f'xmodal search: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
