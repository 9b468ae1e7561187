"""`Retriever.search` with a FAISS ANN index against exact search, at several gallery sizes (docs/search.md).

  nice -n 15 python benchmarks/ann_search.py [--bundle BUNDLE] [--sizes 20000,100000,500000] [--kinds ivf,hnsw]

The gallery is random unit vectors of the bundle's embedding size, clustered by default (--gallery uniform for the
structureless worst case). Speed: real text queries through the bundle's text tower, one at a time, ITC only
(rerank=0); exact and ANN searches alternate query by query in one process, so that a shared machine's load falls on
both alike, and the ratio is the number to read. Recall@k against exact: queries near gallery items (a random-weight
text tower maps every text to nearly one direction, so its queries cannot measure recall). Without --bundle a
randomly initialised `tiny` bundle is exported to a temporary folder (weights do not change the cost of ITC search).
Run with OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 on a shared machine: threads fighting over busy cores slow a
one-query matmul up to 60x and would flatter the ANN.
Prints one JSON line per (size, kind) and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np

from xmodal.inference import Index, Retriever, ranking
from xmodal.inference.bench import synthetic_queries
from xmodal.inference.faiss_index import FaissIndex


def export_random_tiny_bundle(out_dir: str) -> str:
  """A `tiny` bundle with random weights (models and export are imported only here: the search side needs neither)."""
  import flax.linen as nn
  import jax
  from xmodal.bundle import export
  from xmodal.config.defaults import base_config
  from xmodal.models import build
  from xmodal.models.model import ModelSpec, dummy_inputs
  config = base_config('tiny')
  model = build(config.model)
  params = nn.unbox(model.init(jax.random.key(0), *dummy_inputs(ModelSpec.from_config(config.model)))['params'])
  export.export_bundle(config, params, 'shapes', out_dir)
  return out_dir


def random_index(retriever: Retriever, size: int, gallery: str = 'clustered', seed: int = 0) -> Index:
  """An index of `size` random unit vectors (no tokens: ITC only).

  'uniform': uniform on the sphere, the worst case for an ANN (every point nearly equidistant, no structure).
  'clustered': around size/100 random centres, each point at cosine ~0.7 from its centre, as a real collection's
  embeddings group by content.
  """
  rng = np.random.default_rng(seed)
  dim = int(retriever.manifest['embed_dim'])
  emb = rng.standard_normal((size, dim), np.float32)
  if gallery == 'clustered':
    centres = rng.standard_normal((max(16, size // 100), dim), np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    emb = emb / np.sqrt(dim) + centres[rng.integers(0, len(centres), size)]
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  return Index.from_arrays([f'array:{i}' for i in range(size)], emb, None, retriever.weights_sha256)


def recall_near_items(index: Index, ann: FaissIndex, k: int, count: int = 200, seed: int = 1) -> float:
  """recall@k of `ann` against exact top-k for queries near gallery items (an item plus noise: a caption near its
  image). A random-weight text tower maps every text to nearly one direction, so its queries cannot measure recall."""
  rng = np.random.default_rng(seed)
  items = np.asarray(index.embeddings[rng.choice(len(index), count, replace=False)])
  queries = items + 0.5 * rng.standard_normal(items.shape, np.float32) / np.sqrt(items.shape[1])
  queries /= np.linalg.norm(queries, axis=1, keepdims=True)
  exact = ranking.top_k(queries @ index.embeddings.T, k)
  _, found = ann.search(queries, k)
  return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, exact)]))


def measure(retriever: Retriever, index: Index, ann: FaissIndex, texts: list[str], k: int) -> dict:
  """Alternating exact / ANN queries: (queries/s of each, recall@k of ANN against exact)."""
  for t in texts[:3]:  # compiles the query shape, warms caches
    retriever.search(t, index, k=k, rerank=0)
    retriever.search(t, index, k=k, rerank=0, ann=ann)
  exact_s = ann_s = 0.0
  recalls = []
  for t in texts:
    start = time.perf_counter()
    exact = retriever.search(t, index, k=k, rerank=0)
    middle = time.perf_counter()
    approx = retriever.search(t, index, k=k, rerank=0, ann=ann)
    ann_s += time.perf_counter() - middle
    exact_s += middle - start
    recalls.append(len({h.index for h in exact} & {h.index for h in approx}) / k)
  return {'exact_qps': len(texts) / exact_s, 'ann_qps': len(texts) / ann_s,
          'text_query_agreement': float(np.mean(recalls))}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--bundle', help='an exported bundle (default: a random-weight tiny bundle)')
  parser.add_argument('--sizes', default='20000,100000,500000')
  parser.add_argument('--kinds', default='ivf,hnsw')
  parser.add_argument('--hnsw-max', type=int, default=100000, help='largest gallery given an HNSW (its build is slow)')
  parser.add_argument('--gallery', default='clustered', choices=('clustered', 'uniform'))
  parser.add_argument('--queries', type=int, default=300)
  parser.add_argument('--k', type=int, default=10)
  parser.add_argument('--nprobe', type=int, default=16)
  parser.add_argument('--ef-search', type=int, default=64)
  args = parser.parse_args()
  bundle = args.bundle or export_random_tiny_bundle(tempfile.mkdtemp() + '/tiny')
  retriever = Retriever.load(bundle)
  texts = synthetic_queries(args.queries)
  rows = []
  for size in map(int, args.sizes.split(',')):
    index = random_index(retriever, size, args.gallery)
    for kind in args.kinds.split(','):
      if kind == 'hnsw' and size > args.hnsw_max:
        continue
      start = time.perf_counter()
      ann = FaissIndex.build(index.embeddings, kind, nprobe=args.nprobe, ef_search=args.ef_search)
      row = {'gallery': size, 'vectors': args.gallery, 'kind': kind, **ann.params, 'build_s': time.perf_counter() - start,
             **measure(retriever, index, ann, texts, args.k),
             'recall': recall_near_items(index, ann, args.k)}
      row['speedup'] = row['ann_qps'] / row['exact_qps']
      print(json.dumps(row), flush=True)
      rows.append(row)
  print(f'\n| gallery | ANN | settings | exact q/s | ANN q/s | speed-up | recall@{args.k} | build s |')
  print('|---:|---|---|---:|---:|---:|---:|---:|')
  for r in rows:
    settings = ', '.join(f'{key}={r[key]}' for key in ('nlist', 'nprobe', 'hnsw_m', 'ef_search') if key in r)
    print(f'| {r["gallery"]:,} | {r["kind"]} | {settings} | {r["exact_qps"]:.0f} | {r["ann_qps"]:.0f} | '
          f'{r["speedup"]:.1f}x | {r["recall"]:.3f} | {r["build_s"]:.0f} |')


if __name__ == '__main__':
  main()
