"""A search's results as a contact sheet: an HTML page (<img> tags + scores) and a PNG grid with scores drawn on."""

from __future__ import annotations

import html
import os
import pathlib
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from xmodal.inference.preprocess import load_rgb
from xmodal.inference.ranking import Hit

THUMB = 128
LABEL = 28  # pixels under each thumbnail for 'rank / ITC / ITM'


def _score(value: float | None) -> str:
  return '—' if value is None else f'{value:+.3f}'


# Per hit, (word, overlay PNG path) of each content word (xmodal search --explain).
Overlays = Sequence[Sequence[tuple[str, pathlib.Path]]]


def _figure(source: str, caption: str, alt: str) -> str:
  return (f'<figure><img src="{html.escape(source)}" width="{THUMB}" height="{THUMB}" alt="{html.escape(alt)}">'
          f'<figcaption>{caption}</figcaption></figure>')


def write_html(query: str, hits: Sequence[Hit], path: pathlib.Path, overlays: Overlays | None = None) -> pathlib.Path:
  """An HTML page of the hits; image links are relative to the page, so the folder can move with the images. With
  `overlays`, each hit's row also shows its image lit by each content word's heatmap."""
  rows = []
  relative = lambda p: os.path.relpath(os.path.abspath(p), path.parent.resolve())
  for rank, hit in enumerate(hits, 1):
    label = (f'#{rank} {html.escape(pathlib.Path(hit.name).name)}<br>ITC {_score(hit.itc)} · ITM '
             f'{_score(hit.itm)}')
    figures = [_figure(relative(hit.name), label, hit.name)]
    for word, png in (overlays[rank - 1] if overlays else ()):
      figures.append(_figure(relative(png), f'“{html.escape(word)}”', f'{hit.name}: {word}'))
    rows.append(f'<div class="hit">{"".join(figures)}</div>' if overlays else figures[0])
  page = (f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(query)}</title><style>'
          'body{font-family:sans-serif} figure{display:inline-block;margin:6px;text-align:center;font-size:12px}'
          'img{image-rendering:pixelated;border:1px solid #ccc}</style></head><body>'
          f'<h1>{html.escape(query)}</h1>{"".join(rows)}</body></html>\n')
  path.write_text(page, encoding='utf-8')
  return path


def grid(hits: Sequence[Hit], columns: int = 5) -> Image.Image:
  """A PNG-ready grid of the hits' images (THUMB px), each with its rank and scores drawn under it."""
  count = max(len(hits), 1)
  columns = min(columns, count)
  rows = -(-count // columns)
  sheet = Image.new('RGB', (columns * THUMB, rows * (THUMB + LABEL)), 'white')
  draw = ImageDraw.Draw(sheet)
  for i, hit in enumerate(hits):
    x, y = (i % columns) * THUMB, (i // columns) * (THUMB + LABEL)
    try:
      thumb = Image.fromarray(load_rgb(hit.name)).resize((THUMB, THUMB), Image.Resampling.NEAREST)
    except (OSError, ValueError):
      thumb = Image.fromarray(np.full((THUMB, THUMB, 3), 200, np.uint8))  # an array gallery item has no file
    sheet.paste(thumb, (x, y))
    draw.text((x + 3, y + THUMB + 1), f'#{i + 1} ITC {_score(hit.itc)}', fill='black')
    draw.text((x + 3, y + THUMB + 14), f'ITM {_score(hit.itm)}', fill='black')
  return sheet


def write(query: str, hits: Sequence[Hit], out_dir: str | os.PathLike,
          overlays: Overlays | None = None) -> tuple[pathlib.Path, pathlib.Path]:
  """Writes out_dir/results.html (with the word overlays if given) and out_dir/results.png; returns their paths."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  page = write_html(query, hits, out_dir / 'results.html', overlays)
  png = out_dir / 'results.png'
  grid(hits).save(png)
  return page, png
