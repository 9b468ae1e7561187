"""`xmodal serve`: the page's API refuses bad requests with a 4xx naming the problem and never serves a file from
outside the images folder; with a trained bundle it ranks as `Retriever.search` does, and the page works in a real
headless chromium: a typed query shows the expected top image, a click shows that image's word overlays.

The request checks run against a stub retriever over a small real folder (fast); the rest needs the bundle trained
by search_fixtures (slow, like test_search.py). The browser is Debian's chromium driven by Debian's chromedriver
through selenium: nothing is downloaded at run time.
"""

import base64
import contextlib
import http.client
import io
import os
import shutil
import socket
import threading
import time
import types

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

# Module fixtures, found by pytest under these names: the shapes build, gallery, trained bundle and its retriever.
from search_fixtures import bundle, gallery, retriever, shapes  # noqa: F401  # pylint: disable=unused-import
from helpers import image_bytes
from xmodal.inference import Hit
from xmodal.inference import index as index_lib
from xmodal.inference import server

INSTALL_BROWSER = 'apt-get update && apt-get install -y --no-install-recommends chromium chromium-driver'
# The micro model reads 10 tokens, as it was trained on: the gallery's captions are cut on purpose; not reported.
_CAPTIONS_CUT = pytest.mark.filterwarnings('ignore:query .* cut to the model')


@contextlib.contextmanager
def running(app):
  """Serves `app` with uvicorn on a free 127.0.0.1 port in a background thread; yields the base URL."""
  import uvicorn
  sock = socket.socket()
  sock.bind(('127.0.0.1', 0))  # bound here and handed over: no other process can take the port in between
  uv = uvicorn.Server(uvicorn.Config(app, log_level='warning'))
  thread = threading.Thread(target=uv.run, kwargs={'sockets': [sock]}, daemon=True)
  thread.start()
  deadline = time.monotonic() + 30
  while not uv.started:
    assert thread.is_alive() and time.monotonic() < deadline, 'uvicorn did not start'
    time.sleep(0.02)
  try:
    yield f'http://127.0.0.1:{sock.getsockname()[1]}'
  finally:
    uv.should_exit = True
    thread.join(timeout=10)
    sock.close()


def raw_get(base: str, path: str) -> tuple[int, bytes]:
  """GET with the path sent as written: http.client neither normalises `..` nor decodes `%2e`, unlike httpx."""
  host, port = base.removeprefix('http://').split(':')
  connection = http.client.HTTPConnection(host, int(port), timeout=10)
  try:
    connection.request('GET', path)
    response = connection.getresponse()
    return response.status, response.read()
  finally:
    connection.close()


# ---------------------------------------------------------------------------------------------------------------
# Requests: a stub retriever over a real folder with a secret beside it and a link to the secret inside it.
# ---------------------------------------------------------------------------------------------------------------

class StubRetriever:
  """Ranks the gallery in index order; what is under test here is the server's checks, not the model."""

  def search(self, query, index, k, rerank):
    assert query.strip()  # the server refuses empty queries before asking
    return [Hit(i, name, 1.0 - i / 100, None) for i, name in enumerate(index.names[:k])]


@pytest.fixture(scope='module')
def site(tmp_path_factory):
  """(images folder, secret file outside it): gallery/{a,b}.png, gallery/sub/c.png, and gallery/leak.png, a link
  to ../secret.png; the index lists all four (it follows links), the server must not serve the link."""
  root = tmp_path_factory.mktemp('site')
  folder = root / 'gallery'
  (folder / 'sub').mkdir(parents=True)
  for i, name in enumerate(('a.png', 'b.png', 'sub/c.png')):
    (folder / name).write_bytes(image_bytes(i))
  secret = root / 'secret.png'
  secret.write_bytes(image_bytes(99))
  (folder / 'leak.png').symlink_to(secret)
  return folder, secret


@pytest.fixture(scope='module')
def stub_app(site):
  folder, _ = site
  index = types.SimpleNamespace(names=index_lib.list_images(folder))
  assert len(index.names) == 4  # the link is indexed, so the refusal below is the server's own check
  return server.create_app(StubRetriever(), index, folder, max_k=20, max_rerank=50)


@pytest.fixture(scope='module')
def stub_client(stub_app):
  return TestClient(stub_app)


@pytest.fixture(scope='module')
def stub_server(stub_app):
  with running(stub_app) as base:
    yield base


@pytest.mark.parametrize('url, status, named', [
    ('/api/search', 422, 'q: Field required'),
    ('/api/search?q=', 422, 'empty'),
    ('/api/search?q=%20%20%09', 422, 'empty'),
    ('/api/search?q=red&k=0', 422, 'k:'),
    ('/api/search?q=red&k=21', 422, 'k:'),
    ('/api/search?q=red&k=ten', 422, 'k:'),
    ('/api/search?q=red&rerank=-1', 422, 'rerank:'),
    ('/api/search?q=red&rerank=51', 422, 'rerank:'),
    ('/api/search?q=' + 'red%20' * 300, 422, 'q:'),
    ('/api/explain?q=red', 422, 'name: Field required'),
    ('/api/explain?q=%20&name=a.png', 422, 'empty'),
    ('/api/explain?q=red&name=nothere.png', 404, "'nothere.png' is not an image"),
    ('/api/explain?q=red&name=a.png&method=magic', 422, "method: 'magic' is not one of"),
    ('/images/nothere.png', 404, "'nothere.png' is not an image"),
])
def test_bad_requests_get_a_4xx_whose_message_names_the_problem(stub_client, url, status, named):
  response = stub_client.get(url)
  assert response.status_code == status, response.text
  assert named in response.json()['detail']


def test_search_answers_with_names_relative_to_the_folder_and_their_image_urls(stub_client, site):
  folder, _ = site
  response = stub_client.get('/api/search', params={'q': 'a red circle', 'k': 3})
  assert response.status_code == 200, response.text
  results = response.json()['results']
  assert [r['name'] for r in results] == ['a.png', 'b.png', 'leak.png']
  assert stub_client.get(results[1]['image_url']).content == (folder / 'b.png').read_bytes()
  assert stub_client.get('/images/sub/c.png').content == (folder / 'sub' / 'c.png').read_bytes()
  page = stub_client.get('/')
  assert page.status_code == 200 and 'id="query"' in page.text and '<script' in page.text


@pytest.mark.parametrize('path', [
    '/images/../secret.png',
    '/images/%2e%2e/secret.png',
    '/images/%2E%2E%2Fsecret.png',
    '/images/sub/../../secret.png',
    '/images/sub/%2e%2e/%2e%2e/secret.png',
    '/images/leak.png',  # indexed, but a link to a file outside the folder
    '/images/{secret}',  # absolute
    '/api/explain?q=red&name=leak.png',
    '/api/explain?q=red&name=../secret.png',
    '/api/explain?q=red&name={secret}',
])
def test_no_path_leaves_the_images_folder(stub_server, stub_client, site, path):
  _, secret = site
  path = path.format(secret=secret)
  through_client = stub_client.get(path)  # httpx resolves `..` itself: the raw request is the real test
  answers = [raw_get(stub_server, path), (through_client.status_code, through_client.content)]
  for status, body in answers:
    assert 400 <= status < 500, (status, body[:200])
    assert secret.read_bytes() not in body
  if 'leak.png' in path:
    assert b'leads outside the images folder' in answers[0][1]


def test_serve_without_fastapi_names_the_serve_extra(monkeypatch, capsys):
  import importlib.util
  from xmodal.cli import serve
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'fastapi' else real(name, *a))
  assert serve.main(['--bundle', 'b', '--images', 'i']) == 2
  assert "needs fastapi; install the serve extra: pip install -e '.[serve]'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# The trained bundle: the API ranks as the retriever does, the CLI wires it up, and the page works in chromium.
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def index(retriever, gallery):
  return retriever.index(gallery[0], progress=False)


@pytest.fixture(scope='module')
def findable(retriever, index, gallery):
  """(caption, image name) where the page's search (its defaults: k 10, re-rank 64) puts that caption's own image
  first, so that the page's top result is known in advance."""
  folder, captions = gallery
  for i, texts in enumerate(captions):
    for text in texts:
      hit = retriever.search(text, index, k=1, rerank=server.DEFAULT_RERANK)[0]
      if hit.name == str(folder / f'test{i:03d}.png'):
        return text, f'test{i:03d}.png'
  pytest.fail('no caption of the gallery finds its own image first: the trained bundle has not learnt to search')


@pytest.fixture(scope='module')
def app(retriever, index, gallery):
  return server.create_app(retriever, index, gallery[0])


@pytest.mark.slow
@_CAPTIONS_CUT
def test_search_api_ranks_as_the_retriever_does(app, retriever, index, gallery):
  folder, captions = gallery
  client = TestClient(app)
  for query, k, rerank in ((captions[3][0], 10, 10), ('a red circle', 5, 0), (captions[7][1], 40, 64)):
    response = client.get('/api/search', params={'q': query, 'k': k, 'rerank': rerank})
    assert response.status_code == 200, response.text
    expected = [(str(folder / r['name']), r['position'], r['itc'], r['itm']) for r in response.json()['results']]
    assert expected == [(h.name, h.index, h.itc, h.itm) for h in retriever.search(query, index, k=k, rerank=rerank)]


@pytest.mark.slow
@_CAPTIONS_CUT
def test_explain_api_gives_one_overlay_per_content_word(app, retriever, findable, gallery):
  query, name = findable
  response = TestClient(app).get('/api/explain', params={'q': query, 'name': name, 'method': 'attention'})
  assert response.status_code == 200, response.text
  body = response.json()
  rgb = np.asarray(Image.open(gallery[0] / name).convert('RGB'))
  explanation = retriever.explain(query, rgb, method='attention')
  assert [w['word'] for w in body['words']] == [word for word, _ in explanation.words()] != []
  assert body['itm'] == pytest.approx(explanation.itm, abs=1e-5) and body['method'] == 'attention'
  for word in body['words']:
    prefix = 'data:image/png;base64,'
    assert word['overlay'].startswith(prefix)
    with Image.open(io.BytesIO(base64.b64decode(word['overlay'][len(prefix):]))) as png:
      assert png.size == (rgb.shape[1] * 6, rgb.shape[0] * 6)  # 32 px enlarged to OVERLAY_PIXELS = 192


@pytest.mark.slow
def test_xmodal_serve_indexes_the_folder_and_binds_localhost(bundle, gallery, monkeypatch, tmp_path):
  import uvicorn
  from xmodal.cli.main import main
  calls = []
  monkeypatch.setattr(uvicorn, 'run', lambda app, **kw: calls.append((app, kw)))
  folder, _ = gallery
  for _ in range(2):  # the second run loads the index the first wrote, and syncs it
    assert main(['serve', '--bundle', str(bundle), '--images', str(folder), '--index', str(tmp_path / 'idx'),
                 '--no-progress']) == 0
  assert (tmp_path / 'idx' / index_lib.INDEX_FILE).exists()
  (app, options), _ = calls
  assert options['host'] == '127.0.0.1' and options['port'] == 8000
  response = TestClient(app).get('/api/search', params={'q': 'a red circle', 'k': 40, 'rerank': 0})
  assert sorted(r['name'] for r in response.json()['results']) == sorted(p.name for p in folder.glob('*.png'))


def chromium():
  """A headless Debian chromium under selenium, or a failure that says how to install it (CI does, in .ci/run)."""
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  browser, driver = shutil.which('chromium'), shutil.which('chromedriver')
  if not (browser and driver):
    pytest.fail(f'the browser test needs Debian\'s chromium and chromedriver (found: chromium={browser}, '
                f'chromedriver={driver}); install them as .ci/run does: {INSTALL_BROWSER}')
  options = webdriver.ChromeOptions()
  options.binary_location = browser  # with both paths given, selenium's manager downloads nothing
  for argument in ('--headless=new', '--no-sandbox', '--disable-gpu', '--window-size=1280,1000'):
    options.add_argument(argument)
  return webdriver.Chrome(service=Service(executable_path=driver), options=options)


@pytest.mark.slow
@_CAPTIONS_CUT
def test_the_page_finds_the_captions_image_and_shows_its_word_overlays(app, findable, tmp_path):
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import Select, WebDriverWait
  query, expected = findable
  with running(app) as base:
    api_top = TestClient(app).get('/api/search', params={'q': query}).json()['results'][0]['name']
    assert api_top == expected
    browser = chromium()
    try:
      browser.get(base + '/')
      wait = WebDriverWait(browser, 60)
      browser.find_element(By.ID, 'query').send_keys(query)
      browser.find_element(By.ID, 'search').click()
      results = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, '.result'))
      assert results[0].get_attribute('data-name') == expected
      assert 'ITC' in results[0].text and 'ITM' in results[0].text
      loaded = 'return [...document.querySelectorAll(arguments[0])].every(i => i.complete && i.naturalWidth > 0)'
      wait.until(lambda b: b.execute_script(loaded, '.result img'))
      results[0].click()
      overlays = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, '#overlays img'))
      wait.until(lambda b: b.execute_script(loaded, '#overlays img'))
      assert len(overlays) >= 1 and 'error' not in browser.find_element(By.ID, 'status').get_attribute('class')
      # Another method explains the same result again. Attention, for the screenshot: this micro model's ITM has
      # barely learnt, and Grad-CAM's positive gradients of it are all zero here.
      Select(browser.find_element(By.ID, 'method')).select_by_visible_text('attention')
      wait.until(lambda b: 'attention' in b.find_element(By.ID, 'explained').text)
      wait.until(lambda b: b.execute_script(loaded, '#overlays img'))
      assert len(browser.find_elements(By.CSS_SELECTOR, '#overlays img')) == len(overlays)
      shots = [tmp_path / 'serve.png', *([os.environ['XMODAL_SCREENSHOT']] if os.environ.get('XMODAL_SCREENSHOT')
                                         else [])]
      for shot in shots:
        assert browser.save_screenshot(str(shot)), shot
    finally:
      browser.quit()
