"""Helpers shared by the tests (no test here): the repository root, the micro model and `xmodal train` runs of it,
paired embeddings for the loss tests, and tiny on-disk datasets with a stand-in tokenizer for the data tests.

Fixtures live in conftest.py; this module holds plain functions and constants, imported as `from helpers import ...`.
"""

import io
import json
import os
import pathlib
import subprocess
import sys
import tarfile

import numpy as np
from PIL import Image

from xmodal.config.data import data_config
from xmodal.config.defaults import base_config
from xmodal.config.model import model_config

ROOT = pathlib.Path(__file__).resolve().parents[1]  # the repository root: configs/, launch/, README.md


def xla_flags(devices: int) -> str:
  """XLA_FLAGS of the test process and of its `xmodal` subprocesses: `devices` fake CPU devices, and XLA:CPU's own
  kernels built by LLVM at -O1 rather than -O3. The suite mostly compiles small programs: -O1 ran it 20 % faster
  (test_buckets + test_models on 2 workers, 279 -> 223 s). Not the framework's default: on the shapes step it saved
  6 s of a 45 s compile and cost about 1.5 % per step; the matmuls are library calls either way."""
  return f'--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=1'


XMODAL = (sys.executable, '-m', 'xmodal.cli')  # the command line, run from ROOT, of the xmodal under test


def one_device_env(compile_cache: bool = True) -> dict:
  """The environment of an `xmodal` subprocess: one device, since on a 2-core machine the 8 fake devices of the test
  process would split each step eight ways. The suite's compilation cache comes with it (conftest.py) unless
  `compile_cache` is False, e.g. for a child under a file-size limit that a cache write would exceed."""
  env = dict(os.environ, XLA_FLAGS=xla_flags(1))
  if not compile_cache:
    env.pop('JAX_COMPILATION_CACHE_DIR', None)
  return env


def xmodal_command(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
  """`xmodal ARGS` on one device, its output captured; killed after `timeout` seconds (subprocess.TimeoutExpired), so
  that a hang fails its test instead of stalling the suite."""
  return subprocess.run([*XMODAL, *args], cwd=ROOT, env=one_device_env(), capture_output=True, text=True,
                        timeout=timeout)


# ---------------------------------------------------------------------------------------------------------------
# The micro model.
# ---------------------------------------------------------------------------------------------------------------

def micro_model_config():
  """The tiny preset shrunk further, so that compiling its training step stays cheap on a 2-core CPU: 32 px images,
  width 32, two layers per tower."""
  cfg = model_config('tiny')
  cfg.image_size, cfg.max_text_len, cfg.embed_dim, cfg.fusion_depth = 32, 12, 16, 2
  cfg.vision.update(width=32, depth=2, heads=2, mlp_dim=64)
  cfg.text.update(width=32, depth=2, heads=2, mlp_dim=64, vocab_size=64, max_positions=16)
  return cfg


def micro_config(batch_size: int = 16):
  """A full experiment config around the micro model."""
  config = base_config('tiny')
  config.model = micro_model_config()
  config.data.image_size, config.data.max_text_len, config.data.batch_size = 32, 12, batch_size
  config.optim.warmup_steps = 2
  config.train.steps = 4
  return config


def train_command(workdir, shapes_dir, steps, extra=()):
  """`xmodal train`'s arguments for the micro model on a prepared shapes dataset (tests/micro_config.py); `extra`
  overrides come last and win."""
  overrides = [f'--config.data.tfds_name={shapes_dir}', '--config.data.image_size=32', '--config.data.batch_size=8',
               '--config.data.eval_batch_size=8', '--config.data.eval_split=test', '--config.train.log_every=1',
               f'--config.train.steps={steps}', '--config.train.checkpoint_every=1000', '--config.train.progress=false',
               '--config.eval.k=4', *extra]
  return ['--config', str(ROOT / 'tests' / 'micro_config.py'), '--workdir', str(workdir), *overrides]


def logged_losses(workdir):
  """The training-step lines of a run's metrics.jsonl (those with a loss), in order."""
  lines = (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()
  return [json.loads(l) for l in lines if '"loss"' in l]


# ---------------------------------------------------------------------------------------------------------------
# Paired unit embeddings for the loss tests: texts are noisy copies of their images.
# ---------------------------------------------------------------------------------------------------------------

def unit(x: np.ndarray) -> np.ndarray:
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def embedding_batch(seed: int, size: int = 8, dim: int = 16, ids: bool = True, id_groups: int = 2):
  """(image (size, dim), text (size, dim)) float32 unit rows, and image ids drawn from size // id_groups values."""
  rng = np.random.default_rng(seed)
  image = unit(rng.normal(size=(size, dim))).astype(np.float32)
  text = unit(image + 0.7 * rng.normal(size=(size, dim))).astype(np.float32)
  image_ids = rng.integers(0, size // id_groups, size=size) if ids else None
  return image, text, image_ids


# ---------------------------------------------------------------------------------------------------------------
# Tiny on-disk datasets and a stand-in tokenizer for the data tests.
# ---------------------------------------------------------------------------------------------------------------

class WordTokenizer:
  """Stand-in for xmodal.tokenizer: ids are word hashes; [CLS]=1, padding 0."""
  vocab_size = 1000
  pad_id = 0

  def encode(self, texts, max_len):
    ids = np.zeros((len(texts), max_len), np.int32)
    for i, text in enumerate(texts):
      tokens = [1] + [2 + sum(map(ord, w)) % 990 for w in text.split()][:max_len - 1]
      ids[i, :len(tokens)] = tokens
    return ids, (ids > 0).astype(np.int32)


def image_bytes(seed: int, size=(40, 30), fmt='PNG') -> bytes:
  pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, fmt)
  return buffer.getvalue()


def caption(i: int, k: int = 0) -> str:
  return f'image {i} caption {k}'


def write_wds(path, ids, bad=(), empty=(), json_captions=0):
  """A WebDataset shard: {id:06d}.png + .txt (or .json with `json_captions` captions)."""
  with tarfile.open(path, 'w') as tar:
    for i in ids:
      image = b'not an image' if i in bad else image_bytes(i)
      if json_captions:
        text = ('json', json.dumps({'captions': [caption(i, k) for k in range(json_captions)]}).encode())
      else:
        text = ('txt', b'' if i in empty else caption(i).encode())
      for ext, payload in (('png', image), text):
        info = tarfile.TarInfo(f'{i:06d}.{ext}')
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))


def write_tfrecord(path, ids, bad=(), empty=(), captions=2):
  import tensorflow as tf  # here, not at the top: the model and loss tests import this module without TensorFlow
  with tf.io.TFRecordWriter(str(path)) as writer:
    for i in ids:
      texts = [] if i in empty else [caption(i, k).encode() for k in range(captions)]
      feature = {
          'image/encoded': tf.train.Feature(bytes_list=tf.train.BytesList(
              value=[b'garbage' if i in bad else image_bytes(i)])),
          'caption': tf.train.Feature(bytes_list=tf.train.BytesList(value=texts)),
          'image/id': tf.train.Feature(int64_list=tf.train.Int64List(value=[i])),
      }
      writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())


def write_folder(root, n, captions_per_image=3, fmt='csv', bad=(), empty=()):
  """n images img{i}.png and a captions file with `captions_per_image` rows each (rows interleaved)."""
  os.makedirs(root, exist_ok=True)
  for i in range(n):
    with open(os.path.join(root, f'img{i}.png'), 'wb') as f:
      f.write(b'\x89PNG broken' if i in bad else image_bytes(i))
  rows = [(f'img{i}.png', '' if i in empty else caption(i, k)) for k in range(captions_per_image) for i in range(n)]
  path = os.path.join(root, f'captions.{fmt}')
  with open(path, 'w', newline='') as f:
    if fmt == 'csv':
      f.write('image,caption\n')
      for image, text in rows:
        f.write(f'{image},"{text}"\n')
    else:
      for image, text in rows:
        f.write(json.dumps({'image': image, 'caption': text}) + '\n')
  return path


def small_config(**overrides):
  fields = dict(image_size=16, batch_size=4, eval_batch_size=4, shuffle_buffer=4, cycle_length=2,
                num_parallel_calls=2, max_text_len=8, tfrecord_id_key='image/id')
  fields.update(overrides)
  return data_config(**fields)
