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

  def __init__(self, workdir: str | pathlib.Path, enabled: bool = True, resume_step: int | None = None):
    """`resume_step`: the step a resumed run restored; what an earlier run logged after it (steps whose state was
    lost: a run stopped between checkpoints, or a damaged checkpoint skipped) is dropped, as the resumed run logs
    those steps again."""
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    if enabled:
      workdir = pathlib.Path(workdir)
      workdir.mkdir(parents=True, exist_ok=True)
      path = workdir / 'metrics.jsonl'
      if resume_step is not None and path.exists():
        lines = path.read_text(encoding='utf-8').splitlines(keepends=True)
        kept = [line for line in lines if _step(line) <= resume_step]
        if len(kept) < len(lines):
          path.with_suffix('.tmp').write_text(''.join(kept), encoding='utf-8')
          path.with_suffix('.tmp').replace(path)
      self._jsonl = open(path, 'a', encoding='utf-8')
      from tensorboardX import SummaryWriter  # pure Python: no TensorFlow on the training host
      # purge_step: TensorBoard hides the events an earlier run wrote from that step on.
      self._tb = SummaryWriter(str(workdir / 'tensorboard'), flush_secs=30,
                               purge_step=None if resume_step is None else resume_step + 1)

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


def _step(line: str) -> float:
  """A metrics.jsonl line's step; infinite for a line cut short (a run killed while writing it)."""
  try:
    return json.loads(line)['step']
  except (ValueError, KeyError):
    return float('inf')
