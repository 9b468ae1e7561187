"""`xmodal train` end to end on a small shapes dataset: exact resume, preemption, NaN policy, multi-process."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import ROOT, logged_losses, micro_model_config, train_command, xla_flags
from xmodal.config.defaults import base_config

# Every test trains the micro model on shapes for a few steps, most of them in subprocesses.
pytestmark = pytest.mark.slow


def loop_config(shapes_dir, steps=4):
  config = base_config('tiny')
  config.model = micro_model_config()
  config.model.text.vocab_size = 256  # the shipped shapes vocabulary has 168 entries
  config.data.update(tfds_name=shapes_dir, image_size=32, max_text_len=12, batch_size=8, eval_batch_size=8,
                     eval_split='test')
  config.optim.warmup_steps = 2
  config.train.update(steps=steps, checkpoint_every=2, keep_checkpoints=5, log_every=1, progress=False)
  config.eval.update(k=4, chunk_size=16, binding_split='test_hard')
  return config


def _params(workdir, config):
  import jax
  from xmodal import sharding
  from xmodal.train.run import restore_state
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  _, state, data_state = restore_state(config, pathlib.Path(workdir), None, mesh)
  return jax.tree.map(np.asarray, state.params), data_state


def test_resume_after_a_stop_matches_an_uninterrupted_run(shapes_dir, tmp_path, monkeypatch):
  from xmodal.train import loop
  config = loop_config(shapes_dir, steps=4)
  results = loop.train(config, tmp_path / 'straight')
  assert 'itc' in results and 'binding' in results
  # A preemption request after step 3 (an odd step: no periodic checkpoint there), then a rerun of the same command.
  monkeypatch.setattr(loop.PreemptionGuard, 'should_stop', lambda self, step: step == 3)
  assert loop.train(config, tmp_path / 'resumed') == {}
  monkeypatch.undo()
  loop.train(config, tmp_path / 'resumed')  # same workdir: resumes from step 3
  straight, resumed = logged_losses(tmp_path / 'straight'), logged_losses(tmp_path / 'resumed')
  assert [m['step'] for m in resumed] == [1, 2, 3, 4]
  for a, b in zip(straight, resumed):
    np.testing.assert_allclose(a['loss'], b['loss'], rtol=1e-5)
  params_a, data_a = _params(tmp_path / 'straight', config)
  params_b, data_b = _params(tmp_path / 'resumed', config)
  import jax
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params_a, params_b)
  assert data_a == data_b

  # `xmodal eval` restores the latest checkpoint from the workdir's saved config and prints the same table.
  from xmodal.cli.main import main
  assert main(['eval', '--workdir', str(tmp_path / 'straight'), '--split', 'test']) == 0
  evaluated = json.loads((tmp_path / 'straight' / 'eval_test_4.json').read_text())
  assert evaluated['itc'] == pytest.approx(results['itc'])


def test_validation_curves_and_the_oracle_are_written(shapes_dir, tmp_path):
  from PIL import Image
  from xmodal.train import loop
  config = loop_config(shapes_dir, steps=4)
  config.train.eval_every = 2
  config.eval.update(validation_split='validation', validation_images=8, validation_binding_split='validation_hard',
                     validation_k=2)
  config.data.negatives_key = 'negative_captions'
  config.loss.itm_written_negatives = 'add'
  results = loop.train(config, tmp_path / 'run')
  lines = [json.loads(l) for l in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  validation = [l for l in lines if 'val/itc/t2i_r1' in l]
  assert [l['step'] for l in validation] == [2, 4]
  for line in validation:  # the slice's ranks, its binding pairs, re-ranking and the oracle's ceiling
    assert {'val/itc+itm/t2i_r1', 'val/binding/itm', 'val/oracle/t2i_r1'} <= line.keys()
    assert line['val/binding/count'] == 8
  assert validation[0]['val/oracle/t2i_r1'] == validation[1]['val/oracle/t2i_r1'] > 0
  assert any('itm_written_acc' in l for l in lines)
  # The final evaluation reads the test split once, with its oracle row.
  assert results['split'] == 'test' and results['oracle']['t2i_r1'] >= results['itc']['t2i_r1']
  assert 'oracle' in loop.evaluation.format_table(results)
  # Binding also per kind of negative, read from test_hard's captions, every pair counted once.
  kinds = results['binding']['kinds']
  assert set(kinds) <= {'colours', 'relation'} and sum(k['count'] for k in kinds.values()) == results['binding']['count']
  assert f'  {next(iter(kinds))} (' in loop.evaluation.format_table(results)
  with Image.open(tmp_path / 'run' / 'curves.png') as png:
    assert png.format == 'PNG' and png.size[0] > 500


def test_nonfinite_loss_stops_the_run_naming_the_step(shapes_dir, tmp_path):
  from xmodal.train import loop
  config = loop_config(shapes_dir, steps=4)
  config.model.temperature_init = 0.001
  config.optim.update(lr=1e30, warmup_steps=0, clip_norm=0.0)
  with pytest.raises(loop.NonFiniteLossError, match=r'step \d'):
    loop.train(config, tmp_path / 'nan')


def test_sigterm_mid_run_leaves_a_restorable_checkpoint(shapes_dir, tmp_path):
  workdir = tmp_path / 'preempted'
  process = subprocess.Popen([sys.executable, '-m', 'xmodal.cli', 'train',
                              *train_command(workdir, shapes_dir, steps=100000)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
  try:
    deadline = time.time() + 240
    metrics = workdir / 'metrics.jsonl'
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count('"loss"') >= 2):
      time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
  finally:
    process.kill()
  assert process.returncode == 0, output
  steps = [m['step'] for m in logged_losses(workdir)]
  from xmodal.train.checkpoint import Checkpointer
  with Checkpointer(workdir / 'checkpoints', save_every=1, keep=1) as ckpt:
    assert ckpt.latest_step() >= max(steps) >= 2


def test_two_processes_give_the_losses_of_one(shapes_dir, tmp_path):
  single = tmp_path / 'single'
  env = dict(os.environ, XLA_FLAGS=xla_flags(2))
  subprocess.run([sys.executable, '-m', 'xmodal.cli', 'train', *train_command(single, shapes_dir, 3)],
                 check=True, cwd=ROOT, env=env, timeout=600, capture_output=True)
  double = tmp_path / 'double'
  # local.sh starts `xmodal` from PATH: the one installed beside this interpreter.
  env1 = dict(os.environ, XLA_FLAGS=xla_flags(1),
              PATH=f'{pathlib.Path(sys.executable).parent}:{os.environ["PATH"]}')
  result = subprocess.run(['bash', str(ROOT / 'launch' / 'local.sh'), '-n', '2', '-l', str(tmp_path / 'logs'), '--',
                           *train_command(double, shapes_dir, 3)], cwd=ROOT, env=env1, timeout=600,
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr
  for a, b in zip(logged_losses(single), logged_losses(double), strict=True):
    np.testing.assert_allclose(a['loss'], b['loss'], rtol=1e-5)


def test_a_late_itm_start_runs_without_itm_until_its_step_and_resumes_across_it(shapes_dir, tmp_path, monkeypatch):
  from xmodal.train import loop
  config = loop_config(shapes_dir, steps=4)
  config.loss.itm_start_step = 2  # state.step 2 is loop step 3: the first with ITM
  loop.train(config, tmp_path / 'straight')
  straight = logged_losses(tmp_path / 'straight')
  assert [('itm_loss' in m) for m in straight] == [False, False, True, True]
  # Stopped after step 2, before the start; resumed, the run compiles its ITM step then and matches.
  monkeypatch.setattr(loop.PreemptionGuard, 'should_stop', lambda self, step: step == 2)
  loop.train(config, tmp_path / 'resumed')
  monkeypatch.undo()
  loop.train(config, tmp_path / 'resumed')
  for a, b in zip(straight, logged_losses(tmp_path / 'resumed'), strict=True):
    np.testing.assert_allclose(a['loss'], b['loss'], rtol=1e-5)
