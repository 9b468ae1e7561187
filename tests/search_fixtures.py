"""Module fixtures of the tests that search with a trained bundle (test_search.py, test_serve.py): a tiny shapes
build, its test split as a folder of PNGs, a micro model trained on it and exported, and its `Retriever`.

Imported by name into each test module (`from search_fixtures import bundle, ...`), so that each module trains its
own bundle once and drops it when done; a session-wide bundle would stay in memory through the whole suite.
"""

import subprocess
import sys

import pytest

from helpers import ROOT, one_device_env

GALLERY = 40  # test images searched: top-10 of 40 is a quarter of the gallery, so chance alone rarely passes
TRAIN_STEPS = 200


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
  """(tfds data dir, config) of a 32 px shapes build: 512 train images, GALLERY test images."""
  from xmodal.data.shapes import builder as shapes_lib
  config = shapes_lib.shapes_config(seed=0, image_size=32, train_size=512, validation_size=16, test_size=GALLERY,
                                    test_hard_size=16, validation_hard_size=4)
  builder = shapes_lib.XmodalShapes(config=config, data_dir=str(tmp_path_factory.mktemp('tfds')))
  builder.download_and_prepare()
  return builder.data_dir, config


@pytest.fixture(scope='module')
def gallery(shapes, tmp_path_factory):
  """(folder of the test split as PNGs, their captions): made by the same pure function the builder uses."""
  from xmodal.data.shapes import builder as shapes_lib
  folder = tmp_path_factory.mktemp('gallery')
  captions = []
  for i in range(GALLERY):
    example = shapes_lib.make_example(shapes[1], 'test', i)
    (folder / f'test{i:03d}.png').write_bytes(example['image'])
    captions.append(list(example['captions']))
  return folder, captions


@pytest.fixture(scope='module')
def bundle(shapes, tmp_path_factory):
  """A micro model trained TRAIN_STEPS steps at batch 32 (one device, in a subprocess) and exported by the CLI.

  One device: on a 2-core machine the 8 fake devices of the test process would split each step eight ways.
  """
  from xmodal.cli.main import main
  workdir = tmp_path_factory.mktemp('run')
  overrides = [f'--config.data.tfds_name={shapes[0]}', '--config.data.image_size=32', '--config.data.batch_size=32',
               '--config.data.eval_batch_size=16', '--config.data.eval_split=validation', f'--config.train.steps='
               f'{TRAIN_STEPS}', '--config.train.checkpoint_every=100000', '--config.train.progress=false',
               '--config.train.log_every=20', '--config.eval.k=4', '--config.optim.lr=3e-3',
               '--config.optim.warmup_steps=10',
               # The shapes recipe's knobs that need no new data (configs/shapes.py): whole images, mean pooling,
               # and ITM's negatives easy at first, so that re-ranking helps rather than shuffles the top 16.
               '--config.data.crop_scale=(1.0, 1.0)', '--config.model.pool=mean',
               '--config.model.vision.posemb_init=sincos2d', f'--config.loss.itm_hard_warmup_steps={TRAIN_STEPS}']
  result = subprocess.run([sys.executable, '-m', 'xmodal.cli', 'train', '--config', str(ROOT / 'tests' /
                                                                                      'micro_config.py'),
                           '--workdir', str(workdir), *overrides], cwd=ROOT, env=one_device_env(),
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  out = tmp_path_factory.mktemp('bundle') / 'trained'
  assert main(['export', '--workdir', str(workdir), '--out', str(out)]) == 0
  return out


@pytest.fixture(scope='module')
def retriever(bundle):
  from xmodal.inference import Retriever
  return Retriever.load(bundle, batch_size=16)
