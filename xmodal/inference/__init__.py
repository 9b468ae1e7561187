"""Inference from an exported bundle: no model code, no training code, no TensorFlow.

  from xmodal.inference import Retriever
  retriever = Retriever.load('bundle/')            # verifies the manifest's checksums and format version
  index = retriever.index('photos/')                # or retriever.load_index('photos.index')
  for hit in retriever.search('a red circle left of a blue square', index, k=10, rerank=64):
    print(hit.name, hit.itc, hit.itm)

Modules: `retriever` (the exported functions, batching, search), `index` (gallery embeddings on disk), `ranking`
(pure top-k and ITM re-ranking), `faiss_index` (optional FAISS candidates), `preprocess` (PIL version of the
evaluation preprocessing), `contact_sheet` (HTML + PNG of results), `bench` (throughput). The bundle's files are
read with `xmodal.bundle.format`.
"""

from xmodal.bundle.format import BundleError
from xmodal.inference.index import Index
from xmodal.inference.ranking import Hit
from xmodal.inference.retriever import Retriever

__all__ = ['BundleError', 'Hit', 'Index', 'Retriever']
