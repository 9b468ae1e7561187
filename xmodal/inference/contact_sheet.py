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


def write_html(query: str, hits: Sequence[Hit], path: pathlib.Path) -> pathlib.Path:
  """An HTML page of the hits; image links are relative to the page, so the folder can move with the images."""
  rows = []
  for rank, hit in enumerate(hits, 1):
    source = html.escape(os.path.relpath(os.path.abspath(hit.name), path.parent.resolve()))
    rows.append(f'<figure><img src="{source}" width="{THUMB}" height="{THUMB}" alt="{html.escape(hit.name)}">'
                f'<figcaption>#{rank} {html.escape(pathlib.Path(hit.name).name)}<br>ITC {_score(hit.itc)} · ITM '
                f'{_score(hit.itm)}</figcaption></figure>')
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


def write(query: str, hits: Sequence[Hit], out_dir: str | os.PathLike) -> tuple[pathlib.Path, pathlib.Path]:
  """Writes out_dir/results.html and out_dir/results.png; returns their paths."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  page = write_html(query, hits, out_dir / 'results.html')
  png = out_dir / 'results.png'
  grid(hits).save(png)
  return page, png
