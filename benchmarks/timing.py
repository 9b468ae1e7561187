"""Wall time of repeated calls, as the benchmark scripts time a step."""

from __future__ import annotations

import time
from collections.abc import Callable


def timed(run_one: Callable[[], object], calls: int) -> list[float]:
  """Seconds of each of `calls` calls of `run_one` (which must return only when its work is done)."""
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    run_one()
    times.append(time.perf_counter() - start)
  return times
