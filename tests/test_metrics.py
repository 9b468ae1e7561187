"""The metric writer: JSON lines and TensorBoard, and what a resumed run keeps of an earlier run's lines."""

import json

from xmodal.train.metrics import MetricWriter


def test_a_resumed_writer_drops_the_lines_past_the_resumed_step(tmp_path):
  writer = MetricWriter(tmp_path)
  for step in (1, 2, 3, 4):
    writer.write(step, {'loss': float(step)})
  writer.close()
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 5, "lo')  # a run killed while writing
  writer = MetricWriter(tmp_path, resume_step=2)  # the checkpoint of step 4 was lost: the run goes on from 2
  writer.write(3, {'loss': 30.0})
  writer.close()
  lines = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [(l['step'], l['loss']) for l in lines] == [(1, 1.0), (2, 2.0), (3, 30.0)]
