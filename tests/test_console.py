"""The console of `xmodal train` and `xmodal eval`: xmodal's own lines, the progress bars and the table; the
libraries' INFO (absl, orbax, tfds, jax) goes to WORKDIR/log.txt, and back to the console with --verbose."""

import re

import pytest
from helpers import ROOT, xmodal_command

pytestmark = pytest.mark.slow  # two subprocesses: a 4-step training run with its evaluation, then `xmodal eval`

# Any INFO line of a logger other than xmodal's, as the console and log.txt format them ('... INFO absl: ...').
LIBRARY_INFO = re.compile(r' INFO (?!xmodal\b)[\w.]+: ')
# Lines orbax and tfds log at INFO on every run: a checkpoint manager is made, a dataset's info is read.
LIBRARY_MARKERS = ('CheckpointManager', 'Load dataset info')


def test_console_shows_xmodal_lines_and_bars_while_library_info_goes_to_log_txt_or_verbose(shapes_dir, tmp_path):
  workdir = tmp_path / 'run'
  train = xmodal_command('train', '--config', str(ROOT / 'tests' / 'micro_config.py'), '--workdir', str(workdir),
                  f'--config.data.tfds_name={shapes_dir}', '--config.data.image_size=32',
                  '--config.data.eval_batch_size=8', '--config.data.eval_split=test', '--config.train.steps=4',
                  '--config.train.checkpoint_every=2', '--config.eval.k=4')
  console = train.stdout + train.stderr
  assert train.returncode == 0, console[-3000:]
  assert 'INFO xmodal.train: mesh' in console
  assert not LIBRARY_INFO.findall(console), [line for line in console.splitlines() if LIBRARY_INFO.search(line)]
  for marker in LIBRARY_MARKERS:
    assert marker not in console
  # The evaluation has bars of its own, after the training bar's last update.
  assert console.rindex('train: 100%') < console.index('embed test:') < console.index('ITM re-rank:')
  assert 'R mean' in train.stdout

  log = (workdir / 'log.txt').read_text()
  assert 'INFO xmodal.train: mesh' in log
  for marker in LIBRARY_MARKERS:
    assert marker in log
  assert LIBRARY_INFO.search(log)

  # k=0: no ITM to compile
  evaluate = xmodal_command('eval', '--workdir', str(workdir), '--verbose', '--config.eval.k=0')
  console = evaluate.stdout + evaluate.stderr
  assert evaluate.returncode == 0, console[-3000:]
  assert LIBRARY_INFO.search(console)
  for marker in LIBRARY_MARKERS:
    assert marker in console
  assert (workdir / 'log.txt').read_text().startswith(log)  # appended, not overwritten
  assert len((workdir / 'log.txt').read_text()) > len(log)
