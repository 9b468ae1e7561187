"""Bad data in real `xmodal train` runs (the micro model, a subprocess with a hard timeout each): every fault of
docs/data.md's "Bad data" that a run meets is named, counted or refused, and none hangs.

The readers' own behaviour, fault by fault, is tested in-process in test_data_sources.py.
"""

import json
import os
import signal
import subprocess
import time

import pytest

from helpers import ROOT, XMODAL, one_device_env, write_folder, write_tfrecord, write_wds, xmodal_command

# Every test starts `xmodal train` (imports, model set-up) in a subprocess; most fail before the first step.
pytestmark = pytest.mark.slow

MICRO = ('--config', str(ROOT / 'tests' / 'micro_config.py'))
QUICK = ('--config.train.steps=2', '--config.train.log_every=1', '--config.train.progress=false',
         '--config.data.eval_batch_size=8', '--config.eval.k=0')


def _train(workdir, *overrides, timeout=300) -> subprocess.CompletedProcess:
  return xmodal_command('train', *MICRO, '--workdir', str(workdir), *QUICK, *overrides, timeout=timeout)


def _tfrecords(folder, count=2):
  for s in range(count):
    write_tfrecord(folder / f'part{s}.tfrecord', range(s * 20, s * 20 + 20))
  return str(folder / 'part*.tfrecord')


def _shards(pattern) -> tuple[str, ...]:
  return (f'--config.data.train_shards={pattern}', f'--config.data.eval_shards={pattern}')


def test_a_wrong_key_ends_train_and_data_bench_with_an_error_naming_the_keys(tmp_path):
  pattern = _tfrecords(tmp_path)
  wrong = ('--config.data.source=tfrecord', *_shards(pattern), '--config.data.tfrecord_caption_key=captionz')
  run = _train(tmp_path / 'run', *wrong)
  assert run.returncode == 1, run.stderr[-3000:]
  expected = (f"xmodal: data error: {tmp_path / 'part0.tfrecord'}: in its first 16 records, "
              "data.tfrecord_caption_key='captionz' is in none of them; their features: caption (bytes_list), "
              "image/encoded (bytes_list), image/id (int64_list)")
  assert expected in run.stderr
  assert not (tmp_path / 'run' / 'metrics.jsonl').exists()  # before the first step
  bench = xmodal_command('data', 'bench', *MICRO, *wrong, timeout=180)
  assert bench.returncode == 1 and "tfrecord_caption_key='captionz'" in bench.stderr, bench.stderr[-3000:]


def test_a_reader_error_exits_nonzero_naming_the_shard_the_record_and_its_offset(tmp_path):
  pattern = _tfrecords(tmp_path)
  shard = tmp_path / 'part1.tfrecord'
  from xmodal.data import sources
  offset, _ = sources.tfrecord_frames(str(shard))[0][13]
  data = bytearray(shard.read_bytes())
  data[offset + 40] ^= 0xFF  # inside record 13's payload: its checksum fails ("DataLossError: corrupted record")
  shard.write_bytes(bytes(data))
  run = _train(tmp_path / 'run', '--config.data.source=tfrecord', *_shards(pattern), '--config.train.steps=50')
  assert run.returncode == 1, run.stderr[-3000:]
  assert f'xmodal: data error: {shard}: record 13 (byte {offset}): DataLossError: corrupted record at' in run.stderr


def _empty_source(tmp_path) -> tuple[str, ...]:
  """Images whose every caption is empty: nothing usable ever comes (the limit that would stop it set out of reach)."""
  path = write_folder(tmp_path / 'images', 10, captions_per_image=1, empty=set(range(10)))
  eval_path = write_folder(tmp_path / 'eval', 4, captions_per_image=1)
  return ('--config.data.source=folder', f'--config.data.folder={tmp_path / "images"}',
          f'--config.data.train_captions={path}', f'--config.data.eval_captions={eval_path}',
          '--config.data.unusable_limit=1000000000000')


def _stalled_source(tmp_path) -> tuple[str, ...]:
  """Two WebDataset shards, the second a named pipe that no one writes: its read never returns."""
  write_wds(tmp_path / 'a.tar', range(12))
  os.mkfifo(tmp_path / 'b.tar')
  return ('--config.data.source=wds', f'--config.data.train_shards={tmp_path / "*.tar"}',
          f'--config.data.eval_shards={tmp_path / "a.tar"}')


@pytest.mark.parametrize('source', [_empty_source, _stalled_source], ids=['empty', 'stalled'])
def test_sigterm_ends_a_run_waiting_on_a_source_that_yields_nothing(tmp_path, source):
  workdir = tmp_path / 'run'
  # PYTHONFAULTHANDLER: a SIGABRT makes the process print every thread's stack, so that a hang says where it is.
  process = subprocess.Popen([*XMODAL, 'train', *MICRO, '--workdir', str(workdir), *QUICK, *source(tmp_path)],
                             cwd=ROOT, env=dict(one_device_env(), PYTHONFAULTHANDLER='1'), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
  log = workdir / 'log.txt'
  try:
    deadline = time.time() + 240
    # The last line before the loop; then the input pipeline is given time to be waited on.
    while time.time() < deadline and not (log.exists() and 'TFLOP per step' in log.read_text()):
      time.sleep(0.5)
    assert process.poll() is None, process.communicate()[0][-3000:]
    time.sleep(5)
    process.send_signal(signal.SIGTERM)
    try:
      output, _ = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
      process.send_signal(signal.SIGABRT)
      output, _ = process.communicate(timeout=60)
      pytest.fail(f'no exit 120 s after SIGTERM; the log ends:\n{log.read_text()[-2000:]}\nthe threads:\n'
                  f'{output[-6000:]}')
  finally:
    process.kill()
  assert process.returncode == 0, output[-3000:]
  assert 'stop requested while waiting for the batch of step 1; checkpointing step 0' in output
  assert (workdir / 'checkpoints' / '0').is_dir()


# ---------------------------------------------------------------------------------------------- one folder run
# Training captions in JSON lines with a Latin-1 byte, null captions and a malformed row; an evaluation CSV of 35
# rows of which 5 cannot be used. One run, several properties.

@pytest.fixture(scope='module')
def folder_run(tmp_path_factory):
  root = tmp_path_factory.mktemp('bad_folder')
  images = root / 'images'
  write_folder(images, 40, captions_per_image=1)
  train = [json.dumps({'image': f'img{i}.png', 'caption': f'image {i} caption 0'}).encode() for i in range(12)]
  train[0] = b'{"image": "img0.png", "caption": "caf\xe9 image 0"}'  # Latin-1, not UTF-8
  train += [b'{"image": "img1.png", "caption": null}',  # img1 keeps its first caption
            b'{"image": "img12.png", "captions": [null, 7]}',  # img12: no caption left, a skipped record
            b'{"caption": "a row without an image"}']
  (root / 'train.jsonl').write_bytes(b'\n'.join(train) + b'\n')
  rows = [f'img{i}.png,"image {i} caption 0"' for i in range(30)]
  rows += [f'img{i}.png,""' for i in (30, 31)] + [f'broken{i}.png,"caption"' for i in range(3)]
  for i in range(3):
    (images / f'broken{i}.png').write_bytes(b'\x89PNG broken')
  (root / 'eval.csv').write_bytes(('image,caption\n' + '\n'.join(rows) + '\n').encode())
  workdir = root / 'run'
  run = _train(workdir, '--config.data.source=folder', f'--config.data.folder={images}',
               f'--config.data.train_captions={root / "train.jsonl"}',
               f'--config.data.eval_captions={root / "eval.csv"}',
               timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  metrics = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return run, metrics, json.loads((workdir / 'eval.json').read_text())


def test_non_utf8_rows_and_null_captions_are_counted_not_trained_on(folder_run):
  run, metrics, _ = folder_run
  data = [m for m in metrics if 'data/consumed' in m][-1]
  assert (data['data/invalid_utf8'], data['data/bad_caption'], data['data/malformed_row']) == (1, 3, 1)
  assert data['data/empty_caption'] >= 1  # img12, whose only captions were null and 7
  assert "train.jsonl:13: caption null is not a string: dropped" in run.stderr


def test_skip_counters_reach_the_console_at_each_log_step(folder_run):
  run, _, _ = folder_run
  lines = {step: next(line for line in run.stderr.splitlines() if f'step {step} input:' in line) for step in (1, 2)}
  assert all('captions file: 1 malformed row skipped, 3 null or non-string caption' in line for line in lines.values())
  assert 'no usable caption' in lines[2]  # by step 2, 16 examples: img12 has been read and skipped


def test_evaluation_skips_reach_eval_json_and_the_table(folder_run):
  run, _, results = folder_run
  assert results['num_images'] == 30
  assert results['input'] == {'consumed': 35, 'yielded': 30, 'truncated': 0, 'empty_caption': 2, 'bad_image': 3,
                              'malformed_row': 0, 'bad_caption': 0, 'invalid_utf8': 0}
  header = 'skipped 5 of 35 records read (3 bad image, 2 no usable caption)'
  assert header in run.stdout and run.stdout.index(header) < run.stdout.index('R mean')


# -------------------------------------------------------------------------------------------------- refusals


def test_a_captions_file_giving_different_images_one_id_is_refused(tmp_path):
  write_folder(tmp_path / 'images', 4, captions_per_image=1)
  (tmp_path / 'ids.csv').write_text('image,caption,image_id\nimg0.png,a,1\nimg1.png,b,2\nimg2.png,c,2\nimg3.png,d,4\n')
  run = _train(tmp_path / 'run', '--config.data.source=folder', f'--config.data.folder={tmp_path / "images"}',
               f'--config.data.train_captions={tmp_path / "ids.csv"}',
               f'--config.data.eval_captions={tmp_path / "images" / "captions.csv"}')
  assert run.returncode == 1, run.stderr[-3000:]
  assert (f"xmodal: data error: {tmp_path / 'ids.csv'}: image_id 2 names 2 different images: 'img1.png' (line 3), "
          "'img2.png' (line 4)") in run.stderr


def test_a_missing_evaluation_file_fails_before_the_first_step(tmp_path):
  path = write_folder(tmp_path / 'images', 8, captions_per_image=1)
  run = _train(tmp_path / 'run', '--config.data.source=folder', f'--config.data.folder={tmp_path / "images"}',
               f'--config.data.train_captions={path}', f'--config.data.eval_captions={tmp_path / "no-eval.csv"}')
  assert run.returncode != 0 and f"captions file '{tmp_path / 'no-eval.csv'}' does not exist" in run.stderr
  assert not (tmp_path / 'run' / 'metrics.jsonl').exists()
