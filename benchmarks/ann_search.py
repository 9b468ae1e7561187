"""`Retriever.search` with a FAISS ANN index against exact search, at several gallery sizes (docs/search.md).

  nice -n 15 python benchmarks/ann_search.py [--bundle BUNDLE] [--sizes 20000,100000,500000] [--kinds ivf,hnsw]

The gallery is random unit vectors of the bundle's embedding size (the ANN part does not depend on the images; random
vectors are the hard case for an ANN, with no clusters to exploit). Queries are real text queries through the bundle's
text tower, one at a time, ITC only (rerank=0). Exact and ANN searches alternate query by query in one process, so
that a shared machine's load falls on both alike; the ratio is the number to read. Without --bundle a randomly
initialised `tiny` bundle is exported to a temporary folder (the weights do not change the cost of ITC search).
Prints one JSON line per (size, kind) and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np

from xmodal.inference import Index, Retriever
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


def random_index(retriever: Retriever, size: int, gallery: str = 'captions', seed: int = 0) -> Index:
  """An index of `size` random unit vectors (no tokens: ITC only).

  'uniform': uniform on the sphere, the worst case for an ANN (every point nearly equidistant, no structure).
  'captions': clustered, as a real collection's embeddings group by content, around the text embeddings of
  size/100 synthetic captions (other draws than the timed queries): each point at cosine ~0.7 from its centre, so that
  a query lands near images of what it says, as with a trained model.
  """
  rng = np.random.default_rng(seed)
  dim = int(retriever.manifest['embed_dim'])
  emb = rng.standard_normal((size, dim), np.float32)
  if gallery == 'captions':
    centres, _, _ = retriever.encode_texts(synthetic_queries(max(16, size // 100), seed=seed + 1))
    emb = emb / np.sqrt(dim) + centres[rng.integers(0, len(centres), size)]
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  return Index([f'array:{i}' for i in range(size)], emb, None, retriever.weights_sha256)


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
  return {'exact_qps': len(texts) / exact_s, 'ann_qps': len(texts) / ann_s, 'recall': float(np.mean(recalls))}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--bundle', help='an exported bundle (default: a random-weight tiny bundle)')
  parser.add_argument('--sizes', default='20000,100000,500000')
  parser.add_argument('--kinds', default='ivf,hnsw')
  parser.add_argument('--gallery', default='captions', choices=('captions', 'uniform'))
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
      start = time.perf_counter()
      ann = FaissIndex.build(index.embeddings, kind, nprobe=args.nprobe, ef_search=args.ef_search)
      row = {'gallery': size, 'vectors': args.gallery, 'kind': kind, **ann.params, 'build_s': time.perf_counter() - start,
             **measure(retriever, index, ann, texts, args.k)}
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
