"""xmodal's jitted train step side by side with eager PyTorch on the same model (issue 16: changes are judged by it).

  .venv/bin/python benchmarks/compare.py --config configs/bench_cpu.py --rounds 3 --steps 5 [--config.a.b=value ...]

One process runs both: xmodal's step as `xmodal bench` builds it (xmodal.train.bench.compile_step: the config's
model, optimizer, shardings, donated state, compiler options) and benchmarks/torch_reference.py's step on the same
batch (bench's synthetic batch, converted), both starting from xmodal's initial weights. After a warm-up it
alternates them, A B A B: each round one untimed step per side, then --steps timed ones. Printed: each round's
median per side, then each side's median examples/s over all timed steps and the ratio xmodal / torch; the last line
is one JSON object.

Threads: torch.set_num_threads(the cores this process may use); XLA:CPU sizes its own intra-op pool to the machine's
cores (no flag is set here). Both pools live in the one process, but each waits parked while the other side runs
(every step ends in a barrier: block_until_ready, or eager torch returning), so they do not compete for the cores;
one process makes both sides see the same load and the same memory state, which separate processes one after the
other would not. What they share is the heap (glibc malloc) and the caches, one side's step after the other's. The
process re-executes itself with transparent huge pages for the heap, as the `xmodal` command does
(xmodal/cli/huge_pages.py); torch's step takes the same time with or without them (docs/performance.md).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from collections.abc import Callable, Sequence

import jax
import numpy as np
import torch

import config_args  # this folder, which Python puts on the path for a script
import timing
import torch_reference
from xmodal.cli import huge_pages
from xmodal.train import bench, optim


def compare(config, rounds: int, steps: int) -> dict:
  load_before = os.getloadavg()[0]
  threads = len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)
  total_steps = 2 + rounds * (steps + 1)  # both optimizers' schedules span the run (the values do not matter)
  ours = bench.compile_step(config, total_steps)
  reference = torch_reference.ReferenceStep(config, total_steps)
  params = jax.device_get(ours.state.params)  # before the first step: the state is donated
  torch_reference.load_xmodal_params(reference.model, dict(zip(optim.param_paths(params), jax.tree.leaves(params))))
  batch = torch_reference.to_torch_batch(jax.device_get(ours.batch))
  batch_size = ours.batch_size

  spec = ours.built.model.spec
  reference_flops = torch_reference.train_flops(reference.model, batch_size, spec.max_text_len, ours.weights.itm_pairs)
  reference_params = torch_reference.num_params(reference.model)
  if (reference_flops, reference_params) != (ours.flops_per_step, ours.built.num_params):
    raise SystemExit(f'not the same model: xmodal {ours.built.num_params} parameters, {ours.flops_per_step} FLOPs '
                     f'per step; torch {reference_params}, {reference_flops}')
  print(f'batch {batch_size}, {ours.built.num_params:,} parameters, {ours.flops_per_step / 1e9:.1f} GFLOP per step; '
        f'xmodal compiled in {ours.compile_seconds:.1f} s; torch threads {torch.get_num_threads()}, XLA:CPU its '
        f'default pool ({os.cpu_count()} cores)', flush=True)

  losses = {'xmodal': [], 'torch': []}
  sides = {'xmodal': lambda: losses['xmodal'].append(float(ours.run_one()['loss'])),
           'torch': lambda: losses['torch'].append(reference(batch)['loss'])}
  times = {name: [] for name in sides}
  with ours.context():
    for run_one in sides.values():
      run_one()  # warm-up: xmodal's first run of the compiled step, torch's first allocations
    for round_index in range(rounds):
      for name, run_one in sides.items():
        run_one()
        round_times = timing.timed(run_one, steps)
        times[name] += round_times
        median = statistics.median(round_times)
        print(f'round {round_index + 1} {name:>6}: {median:.3f} s/step, {batch_size / median:.1f} examples/s',
              flush=True)

  rates = {name: batch_size / statistics.median(t) for name, t in times.items()}
  for name, rate in rates.items():
    print(f'{name:>6}: median {statistics.median(times[name]):.3f} s/step, {rate:.1f} examples/s, '
          f'{ours.flops_per_step * rate / batch_size / 1e9:.1f} GFLOP/s; loss {losses[name][0]:.4f} -> '
          f'{losses[name][-1]:.4f}')
  print(f'ratio xmodal / torch: {rates["xmodal"] / rates["torch"]:.3f}')
  load = (round(load_before, 2), round(os.getloadavg()[0], 2))
  if max(load) > threads:
    # At load 7 on 2 cores the reference's step (batch 8) took 8.1 s on 2 threads, 0.5-0.8 s on 1: torch's OpenMP
    # threads wait for each other at every parallel region (docs/performance.md).
    print(f'load average {load[0]} -> {load[1]} on {threads} cores: more runnable threads than cores, so the '
          'ratio says more about the co-tenants than about either step')
  return {'xmodal_examples_per_s': rates['xmodal'], 'torch_examples_per_s': rates['torch'],
          'ratio': rates['xmodal'] / rates['torch'], 'rounds': rounds, 'steps': steps,
          'flops_per_step': ours.flops_per_step, 'params': ours.built.num_params, 'batch': batch_size,
          'xmodal_step_s': statistics.median(times['xmodal']), 'torch_step_s': statistics.median(times['torch']),
          'torch_threads': torch.get_num_threads(), 'load_average': load}


def main(argv: Sequence[str] | None = None) -> int:
  parser = config_args.parser(__doc__.split('\n')[0], 'configs/bench_cpu.py')
  parser.add_argument('--rounds', type=int, default=3, help='A B rounds')
  parser.add_argument('--steps', type=int, default=5, help='timed steps per side and round')
  args, config = config_args.parse(parser, argv)
  print(json.dumps(compare(config, args.rounds, args.steps)))
  return 0


if __name__ == '__main__':
  huge_pages.reexec_with_huge_pages()  # as the `xmodal` command does, so that the step runs as users run it
  sys.exit(main())
