"""XLA's temporary memory of the compiled train step: one batch (grad_accum 1) against 'micro' and 'exact'
accumulation (docs/training.md's table).

  .venv/bin/python benchmarks/gradcache_memory.py --size tiny --batch 64 --accum 4

Compiles only (no step runs): `compiled.memory_analysis().temp_size_in_bytes` of the step `xmodal bench` builds
(xmodal.train.bench.compile_step) on one device, with the default losses (ITC + ITM).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=1')

from xmodal.config.defaults import base_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from xmodal.train.bench import compile_step  # pylint: disable=g-import-not-at-top,wrong-import-position


def temp_bytes(size: str, batch: int, accum: int, mode: str) -> int:
  config = base_config(size)
  config.mesh.shape = (1, 1, 1)
  config.data.batch_size = batch
  config.train.update(grad_accum=accum, grad_accum_mode=mode)
  return int(compile_step(config, 10).compiled.memory_analysis().temp_size_in_bytes)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--size', default='tiny')
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--accum', type=int, default=4)
  args = parser.parse_args()
  for accum, mode in ((1, 'micro'), (args.accum, 'micro'), (args.accum, 'exact')):
    mib = temp_bytes(args.size, args.batch, accum, mode) / 2**20
    print(f'{args.size} batch {args.batch} grad_accum {accum} {mode}: {mib:,.1f} MiB temp', flush=True)


if __name__ == '__main__':
  main()
