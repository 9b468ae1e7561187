"""Input throughput: examples/s of a config's training pipeline, and per core, measured in the steady state."""

from __future__ import annotations

import os
import statistics
import time

import ml_collections


def cores() -> int:
  """CPU cores this process may run on (the affinity mask, not the machine's total)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def bench_pipeline(config: ml_collections.ConfigDict, *, batches: int = 50, warmup: int = 10, repeats: int = 3,
                   tokenizer=None) -> dict:
  """Times `repeats` runs of `batches` training batches after `warmup` (tf.data autotuning, thread start-up).

  Returns {'examples_per_s' (median), 'examples_per_s_per_core', 'runs' (each run's examples/s), 'cores',
  'batch_size', 'image_size', 'source'}.
  """
  from xmodal.data import pipeline  # pylint: disable=g-import-not-at-top  # imports TensorFlow
  iterator = pipeline.train_iterator(config, tokenizer=tokenizer)
  for _ in range(warmup):
    batch = next(iterator)
  local_batch = batch['images'].shape[0]
  runs = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(batches):
      next(iterator)
    runs.append(batches * local_batch / (time.perf_counter() - start))
  median = statistics.median(runs)
  return {'examples_per_s': median, 'examples_per_s_per_core': median / cores(), 'runs': runs, 'cores': cores(),
          'batch_size': local_batch, 'image_size': config.image_size, 'source': config.source,
          'skipped': iterator.stats()}


def format_result(result: dict) -> str:
  runs = ', '.join(f'{r:.0f}' for r in result['runs'])
  return (f"{result['source']} {result['image_size']}px batch {result['batch_size']}: "
          f"{result['examples_per_s']:.0f} examples/s (median of [{runs}]), "
          f"{result['examples_per_s_per_core']:.0f} examples/s per core on {result['cores']} cores; "
          f"records skipped: {result['skipped']}")


def write_synthetic_wds(out_dir: str, *, shards: int = 4, per_shard: int = 256, size: int = 256,
                        quality: int = 90) -> str:
  """Writes WebDataset shards of random-blob JPEGs (size × size) with captions; returns their glob."""
  import io  # pylint: disable=g-import-not-at-top
  import tarfile  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  rng = np.random.default_rng(0)
  for s in range(shards):
    with tarfile.open(os.path.join(out_dir, f'{s:05d}.tar'), 'w') as tar:
      for i in range(per_shard):
        # Smooth images (upsampled noise) compress like photos; pure noise would be unrealistically large.
        small = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((size, size), Image.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, 'JPEG', quality=quality)
        key = f'{s * per_shard + i:09d}'
        for ext, payload in (('jpg', buffer.getvalue()), ('txt', f'a photo number {key}'.encode())):
          info = tarfile.TarInfo(f'{key}.{ext}')
          info.size = len(payload)
          tar.addfile(info, io.BytesIO(payload))
  return os.path.join(out_dir, '*.tar')
