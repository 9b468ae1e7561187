"""Metric sinks of the training loop: a JSON-lines file and TensorBoard event files, written by process 0 only."""

from __future__ import annotations

import json
import pathlib
import re
import time
from collections.abc import Mapping

import numpy as np


class MetricWriter:
  """Appends `{"step": s, "time": t, **scalars}` lines to workdir/metrics.jsonl and scalars to TensorBoard."""

  def __init__(self, workdir: str | pathlib.Path, enabled: bool = True):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    if enabled:
      workdir = pathlib.Path(workdir)
      workdir.mkdir(parents=True, exist_ok=True)
      self._jsonl = open(workdir / 'metrics.jsonl', 'a', encoding='utf-8')
      from tensorboardX import SummaryWriter  # pure Python: no TensorFlow on the training host
      self._tb = SummaryWriter(str(workdir / 'tensorboard'), flush_secs=30)

  def write(self, step: int, scalars: Mapping[str, float], prefix: str = '') -> None:
    if not self.enabled:
      return
    clean = {f'{prefix}{k}': float(v) for k, v in scalars.items() if np.ndim(v) == 0}
    self._jsonl.write(json.dumps({'step': int(step), 'time': time.time(), **clean}) + '\n')
    self._jsonl.flush()
    for key, value in clean.items():
      # TensorBoard tags allow [A-Za-z0-9_./-]: 'eval/itc+itm/t2i_r1' is written as 'eval/itc_itm/t2i_r1'.
      self._tb.add_scalar(re.sub(r'[^A-Za-z0-9_./-]', '_', key), value, int(step))

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
