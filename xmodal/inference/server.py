"""A local search page over an exported bundle: JSON search and explain endpoints, the gallery's images, one page.

  app = create_app(Retriever.load('bundle/'), retriever.index('photos/'), 'photos/')   # `xmodal serve` runs it
  GET /api/search?q=a+red+circle&k=10&rerank=64  → {query, k, rerank, warnings, results: [{name, position, itc, itm,
                                                    image_url}]}, in `Retriever.search`'s order
  GET /api/explain?q=a+red+circle&name=x.png[&method=gradcam]
                                                 → {query, name, itm, method, warnings, words: [{word, overlay}]},
                                                    each overlay a PNG data URL of the image under that word's map
  GET /images/{name}                             → the gallery file
  GET /                                          → the page (xmodal.inference.search_page)

A name is an image's path relative to the images folder, '/'-separated. Only indexed names are served, and only when
the file they resolve to (links followed) lies inside the folder: the index follows links wherever they point, the
server does not, so that neither a crafted path (`..`, an absolute one, `%2e%2e`) nor a link inside the folder
publishes a file from outside it. Bad requests get a 4xx with {"detail": one line naming the parameter}.

The retriever runs under one lock: it is not known to be thread-safe, and FastAPI runs synchronous endpoints in a
thread pool. Its calls are CPU-bound, so serialising them costs no throughput on a local machine.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import pathlib
import threading
import urllib.parse
import warnings
from collections.abc import Iterator
from typing import Any

import fastapi
import numpy as np
from fastapi import Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from PIL import Image

from xmodal.inference import search_page
from xmodal.inference.explain import METHODS, overlay
from xmodal.inference.index import Index
from xmodal.inference.preprocess import UnreadableImage, load_rgb
from xmodal.inference.retriever import QueryWarning, Retriever

DEFAULT_K, DEFAULT_RERANK = 10, 64  # those of `xmodal search`
MAX_QUERY_CHARS = 1000  # far past any model's text length; bounds the work a request can ask for
OVERLAY_PIXELS = 192  # small gallery images are enlarged (nearest) to this before the heat is blended in


def create_app(retriever: Retriever, index: Index, images_dir: str | os.PathLike, *, max_k: int = 100,
               max_rerank: int = 256) -> fastapi.FastAPI:
  """The app serving `index` (built from `images_dir`) with `retriever`; run it with uvicorn.

  Args:
    retriever: the loaded bundle.
    index: its index of the images folder (`retriever.index(images_dir)` or a synced `load_index`).
    images_dir: the folder whose images are served; indexed files outside it are searched but not served.
    max_k: the most results one search may ask for.
    max_rerank: the most candidates one search may have re-ranked by ITM (each costs a fusion-encoder pass).
  """
  gallery = _Gallery(index, images_dir)
  lock = threading.Lock()
  app = fastapi.FastAPI(title='xmodal search', docs_url=None, redoc_url=None)

  @app.exception_handler(RequestValidationError)
  async def _one_line(request: fastapi.Request, error: RequestValidationError) -> JSONResponse:
    del request  # the handler's signature
    # FastAPI's default is a list of dicts; a page (or a person with curl) wants the parameter and what is wrong.
    problems = [f'{".".join(str(p) for p in e["loc"][1:]) or "request"}: {e["msg"]}' for e in error.errors()]
    return JSONResponse({'detail': '; '.join(problems)}, status_code=422)

  page_html = search_page.render(METHODS)

  @app.get('/', response_class=HTMLResponse)
  def page() -> str:
    return page_html

  @app.get('/api/search')
  def search(q: str = Query(max_length=MAX_QUERY_CHARS), k: int = Query(DEFAULT_K, ge=1, le=max_k),
             rerank: int = Query(DEFAULT_RERANK, ge=0, le=max_rerank)) -> dict[str, Any]:
    _check_query(q)
    with lock, _query_warnings() as notes:
      try:
        hits = retriever.search(q, index, k=k, rerank=rerank)
      except ValueError as e:
        raise fastapi.HTTPException(422, str(e)) from e
    results = [{'name': gallery.relative[hit.index], 'position': hit.index, 'itc': hit.itc, 'itm': hit.itm,
                'image_url': gallery.url(hit.index)} for hit in hits]
    return {'query': q, 'k': k, 'rerank': rerank, 'warnings': notes, 'results': results}

  @app.get('/api/explain')
  def explain(q: str = Query(max_length=MAX_QUERY_CHARS), name: str = Query(), method: str = '') -> dict[str, Any]:
    _check_query(q)
    if method and method not in METHODS:  # empty: the retriever's default
      raise fastapi.HTTPException(422, f'method: {method!r} is not one of {", ".join(METHODS)}')
    path = gallery.file(name)
    try:
      rgb = load_rgb(path)
    except UnreadableImage as e:
      raise fastapi.HTTPException(422, f'name: {e}') from e
    with lock, _query_warnings() as notes:
      try:
        explanation = retriever.explain(q, rgb, **({'method': method} if method else {}))
      except ValueError as e:  # a bundle exported without the explain function says so and how to re-export
        raise fastapi.HTTPException(422, str(e)) from e
    shown = _enlarged(rgb, OVERLAY_PIXELS)
    words = [{'word': word, 'overlay': _png_data_url(overlay(shown, heat))} for word, heat in explanation.words()]
    return {'query': q, 'name': name, 'itm': float(explanation.itm), 'method': explanation.method, 'warnings': notes,
            'words': words}

  @app.get('/images/{name:path}')
  def image(name: str) -> FileResponse:
    return FileResponse(gallery.file(name))

  return app


class _Gallery:
  """The index's names relative to the images folder, and the check that a name may be served."""

  def __init__(self, index: Index, images_dir: str | os.PathLike):
    listed_root = os.path.abspath(images_dir)  # how the index lists it: absolute, links not resolved
    self.root = pathlib.Path(images_dir).resolve()
    self.names = index.names
    self.relative: list[str | None] = []
    for name in index.names:
      relative = os.path.relpath(os.path.abspath(name), listed_root)
      inside = not (relative == os.pardir or relative.startswith(os.pardir + os.sep) or os.path.isabs(relative))
      self.relative.append(pathlib.Path(relative).as_posix() if inside else None)
    self.positions = {name: i for i, name in enumerate(self.relative) if name is not None}

  def url(self, position: int) -> str | None:
    name = self.relative[position]
    return None if name is None else '/images/' + urllib.parse.quote(name)

  def file(self, name: str) -> pathlib.Path:
    """The real file of an indexed `name`, or a 404 naming it: not indexed, gone, or resolving outside the folder."""
    position = self.positions.get(name)
    if position is None:
      raise fastapi.HTTPException(404, f'name: {name!r} is not an image of this gallery')
    path = pathlib.Path(self.names[position]).resolve()
    if not path.is_relative_to(self.root):
      raise fastapi.HTTPException(404, f'name: {name!r} leads outside the images folder; not served')
    if not path.is_file():
      raise fastapi.HTTPException(404, f'name: {name!r} is no longer on disk')
    return path


@contextlib.contextmanager
def _query_warnings() -> Iterator[list[str]]:
  """Collects the QueryWarnings raised inside (mostly unknown words, a cut query) as messages for the answer."""
  notes: list[str] = []
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always', QueryWarning)
    yield notes
  notes += [str(w.message) for w in caught if issubclass(w.category, QueryWarning)]


def _check_query(query: str) -> None:
  if not query.strip():
    raise fastapi.HTTPException(422, f'q: the query is empty ({query!r}); give words to search for')


def _enlarged(rgb: np.ndarray, pixels: int) -> np.ndarray:
  """uint8 (H, W, 3) repeated by the whole factor that brings its longer side nearest to `pixels` (at least 1)."""
  factor = max(1, round(pixels / max(rgb.shape[:2])))
  return rgb.repeat(factor, axis=0).repeat(factor, axis=1)


def _png_data_url(rgb: np.ndarray) -> str:
  buffer = io.BytesIO()
  Image.fromarray(rgb).save(buffer, 'PNG')
  return 'data:image/png;base64,' + base64.b64encode(buffer.getvalue()).decode('ascii')
