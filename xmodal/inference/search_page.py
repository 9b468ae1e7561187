"""The page that `xmodal.inference.server` serves at `/`: plain HTML, CSS and a little JavaScript in one string.

No framework and nothing fetched from elsewhere: the page works on a machine without a network. It talks to the
server's JSON API only: /api/search for the grid, /api/explain when a result is clicked. Names and words are put into
the page as text (`textContent`), never as HTML, since file names come from the disk.

Ids and classes the browser test relies on: #query, #search, #k, #rerank, #method, #status, #results,
.result[data-name] (each with its <img> and .scores), #overlays with one figure.word <img> per content word.
"""

from __future__ import annotations

import html
from collections.abc import Sequence


def render(methods: Sequence[str]) -> str:
  """The page, its explanation menu offering the retriever's default and then `methods` (explain.METHODS)."""
  options = '<option value="">default</option>' + ''.join(f'<option>{html.escape(m)}</option>' for m in methods)
  return _HTML.replace('<!--methods-->', options)


_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>xmodal search</title>
<style>
  body { font: 15px system-ui, sans-serif; margin: 1.5em; color: #222; }
  form { display: flex; gap: .5em; align-items: center; flex-wrap: wrap; }
  #query { flex: 1; min-width: 20em; font-size: 1.1em; padding: .3em; }
  input[type=number] { width: 4.5em; }
  #status { min-height: 1.4em; margin: .6em 0; color: #555; }
  #status.error { color: #b00; }
  #results, #overlays { display: flex; flex-wrap: wrap; gap: .8em; }
  figure { margin: 0; text-align: center; font-size: .8em; }
  .result { cursor: pointer; padding: 4px; border: 2px solid transparent; border-radius: 4px; }
  .result.selected { border-color: #2a6df4; }
  .result img, .word img { width: 128px; height: 128px; object-fit: contain; image-rendering: pixelated;
                           background: #eee; display: block; }
  .word img { width: 160px; height: 160px; }
  .name { max-width: 128px; overflow-wrap: anywhere; }
  h2 { font-size: 1em; margin: 1.2em 0 .5em; }
</style>
</head>
<body>
<form id="form">
  <input id="query" type="search" placeholder="a red circle left of a blue square" autofocus>
  <label>k <input id="k" type="number" value="10" min="1"></label>
  <label>re-rank <input id="rerank" type="number" value="64" min="0"></label>
  <button id="search" type="submit">Search</button>
  <label>explain by <select id="method"><!--methods--></select></label>
</form>
<div id="status"></div>
<div id="results"></div>
<h2 id="explained"></h2>
<div id="overlays"></div>
<script>
const $ = (selector) => document.querySelector(selector);
let latest = 0;  // each request's number: an answer that arrives after a newer request was made is dropped
let explained = null;  // the clicked result, explained again when the method changes

function show(message, error = false) {
  $('#status').textContent = message;
  $('#status').className = error ? 'error' : '';
}

async function getJSON(path, params) {
  const response = await fetch(path + '?' + new URLSearchParams(params));
  const body = await response.json();
  if (!response.ok) throw new Error(body.detail || response.statusText);
  return body;
}

function figure(className, src, lines) {
  const fig = document.createElement('figure');
  fig.className = className;
  const img = document.createElement('img');
  img.src = src;
  img.alt = lines[0];
  fig.append(img);
  const caption = document.createElement('figcaption');
  for (const [cls, text] of lines.slice(1)) {
    const line = document.createElement('div');
    line.className = cls;
    line.textContent = text;
    caption.append(line);
  }
  fig.append(caption);
  return fig;
}

const score = (value) => value === null ? '—' : value.toFixed(3);

async function search() {
  const q = $('#query').value;
  const ticket = ++latest;
  show('searching…');
  try {
    const data = await getJSON('/api/search', {q, k: $('#k').value, rerank: $('#rerank').value});
    if (ticket !== latest) return;
    $('#results').replaceChildren(...data.results.map((hit, i) => {
      const fig = figure('result', hit.image_url || '', [hit.name, ['name', `#${i + 1} ${hit.name}`],
                         ['scores', `ITC ${score(hit.itc)} · ITM ${score(hit.itm)}`]]);
      fig.dataset.name = hit.name;
      fig.addEventListener('click', () => explain(q, hit.name, fig));
      return fig;
    }));
    $('#overlays').replaceChildren();
    $('#explained').textContent = '';
    explained = null;
    const notes = data.warnings.length ? ' — ' + data.warnings.join('; ') : '';
    show(`${data.results.length} results for “${data.query}” (re-ranked: ${data.rerank})${notes}`);
  } catch (error) {
    if (ticket === latest) show(error.message, true);
  }
}

async function explain(q, name, fig) {
  explained = [q, name, fig];
  const ticket = ++latest;
  document.querySelectorAll('.result.selected').forEach((el) => el.classList.remove('selected'));
  fig.classList.add('selected');
  show(`explaining ${name}…`);
  try {
    const data = await getJSON('/api/explain', {q, name, method: $('#method').value});
    if (ticket !== latest) return;
    $('#explained').textContent =
        `Where each word of “${q}” looks in ${name} (ITM ${score(data.itm)}, ${data.method})`;
    $('#overlays').replaceChildren(...data.words.map((w) => figure('word', w.overlay, [w.word, ['label', w.word]])));
    show(data.words.length ? '' : 'no content words in the query to explain');
  } catch (error) {
    if (ticket === latest) show(error.message, true);
  }
}

$('#form').addEventListener('submit', (event) => { event.preventDefault(); search(); });
$('#method').addEventListener('change', () => { if (explained) explain(...explained); });
</script>
</body>
</html>
"""
