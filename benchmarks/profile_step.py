"""Where the jitted train step spends its time: a jax.profiler trace, summed per XLA operation (issue 16).

  .venv/bin/python benchmarks/profile_step.py --config configs/shapes.py [--steps 2] [--top 25] [--config.a.b=value ...]

Compiles the step as `xmodal bench` does (xmodal.train.bench.compile_step: the config's model, optimizer, shardings,
compiler options, a synthetic batch of its shapes), runs a few warm-up steps, times --timed steps, then traces --steps
steps and sums the time of each executed XLA operation (the trace's per-thunk events). Each operation is put in a
class by what it does (matmul, broadcast, copy or transpose, slicing, gather or scatter, elementwise) and in a model
part by the operation it came from (the optimised HLO's op_name: vision, text, fusion, regions, the rest), forward or
backward. Printed: three tables (by class, by part, the top operations with their shapes); the last line is JSON.

On a CPU the sums are thread time: XLA:CPU runs independent operations side by side, so they can exceed the step's
wall time. On a GPU they are kernel time on the device (the trace's /device:GPU events, each kernel attributed to its
HLO operation as `_gpu_operation` says), and what the step's wall time holds beyond them is the device idle.
Shares, not sums, are what to compare between variants; the step's own time comes from the untraced --timed steps.
--trace-out DIR keeps the perfetto trace (gzipped JSON) and the optimised HLO for a closer look.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import pathlib
import re
import shutil
import statistics
import sys
import tempfile
from collections.abc import Iterable, Sequence

import jax

import config_args  # this folder, which Python puts on the path for a script
import timing
from xmodal.cli import huge_pages
from xmodal.train import bench

# Operations that only contain others (their bodies' operations are traced on their own).
_CONTAINERS = ('while', 'conditional', 'call')
# (class, what an operation's name starts with or contains); the first match wins.
_CLASSES = (
    # cuDNN's fused attention: its custom call, or its kernels by name (cuDNN's flash SDPA).
    ('attention (cuDNN)', re.compile(r'cudnn\$fmha|_sdpa_|flash_[fb]prop|cudnn::fusion')),  # + its helper kernels
    # ynn: XNNPACK's matmul fusions; on GPUs cuBLAS / cuBLASLt gemm custom calls, Triton gemm fusions, and the
    # library's kernels by name (nvjet, xmma, cutlass).
    ('matmul or convolution',
     re.compile(r'^(ynn_fusion|dot|convolution)|cublas|gemm|cudnn\$conv|cudnn-conv|nvjet|xmma|cutlass')),
    ('broadcast', re.compile(r'^(wrapped_broadcast|broadcast$)')),  # not elementwise fusions named broadcast_*
    ('slicing', re.compile(r'dynamic-update-slice|dynamic-slice|^slice')),
    ('gather or scatter', re.compile(r'gather|scatter')),
    ('copy or transpose', re.compile(r'^copy|transpose|concatenate|^memcpy|^Memset')),
)
# What a GPU kernel that no operation of the module names is (a library kernel inside a CUDA graph, whose event
# gives only the graph's name as `hlo_op`): its class is read from the kernel's name, its model part is unknown.
_KERNEL = 'kernel'
_UNATTRIBUTED = 'unattributed (library kernels in CUDA graphs)'
# (part, what the op_name holds): model methods, as XModal names them.
_PARTS = (('vision', 'encode_image'), ('text', 'encode_text'), ('fusion', 'match'), ('regions', 'embed_regions'))


@dataclasses.dataclass(frozen=True)
class Operation:
  """One instruction of the optimised HLO: its result shape and the JAX operation it came from."""
  name: str
  opcode: str
  shape: str
  op_name: str
  target: str = ''  # a custom call's target (a GPU library kernel: cuBLAS gemm, cuDNN attention)


def hlo_operations(hlo_text: str) -> dict[str, Operation]:
  """Every named instruction of an optimised HLO module's text (`compiled.as_text()`), by name."""
  operations = {}
  for line in hlo_text.splitlines():
    match = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = (\(.*?\)|\S+) ([\w\-]+)\(', line)  # tuple shapes hold spaces
    if match:
      op_name = re.search(r'op_name="([^"]*)"', line)
      target = re.search(r'custom_call_target="([^"]*)"', line)
      operations[match.group(1)] = Operation(match.group(1), match.group(3), match.group(2),
                                             op_name.group(1) if op_name else '', target.group(1) if target else '')
  return operations


def op_class(operation: Operation) -> str:
  for name, pattern in _CLASSES:
    if any(pattern.search(text) for text in (operation.name, operation.opcode, operation.target)):
      return name
  return 'elementwise'


def model_part(operation: Operation) -> str:
  """'vision', 'text', 'fusion', 'regions' or 'losses and optimizer', with ' backward' where autodiff made it."""
  if operation.opcode == _KERNEL:
    return _UNATTRIBUTED
  part = next((label for label, method in _PARTS if method in operation.op_name), 'losses and optimizer')
  return part + (' backward' if 'transpose(' in operation.op_name else '')


def _device_processes(events: list[dict]) -> set:
  """The trace's GPU processes (named '/device:GPU:N ...'); empty for a CPU trace."""
  return {event.get('pid') for event in events if event.get('ph') == 'M' and event.get('name') == 'process_name'
          and str(event.get('args', {}).get('name', '')).startswith('/device:GPU')}


def _gpu_operation(event: dict, operations: dict[str, Operation]) -> Operation:
  """The operation a GPU kernel event ran: a fusion's kernel is named after it ('loop_add_fusion_3' for
  loop_add_fusion.3), a library call outside a CUDA graph gives it as `args.hlo_op`; any other kernel stands for
  itself (`_KERNEL`)."""
  name = event.get('name', '')
  for candidate in (name, re.sub(r'_(\d+)$', r'.\1', name), event.get('args', {}).get('hlo_op', '')):
    if candidate in operations and operations[candidate].opcode not in _CONTAINERS:
      return operations[candidate]
  return Operation(name, _KERNEL, '', '')


def traced_durations(trace: dict, operations: dict[str, Operation]) -> collections.Counter:
  """Microseconds per HLO operation (an `Operation`), summed over a perfetto trace's complete events.

  A CPU trace names each thunk's event after its operation; containers are left out. On a GPU only the device's
  kernels count (the host's launch events of the same operations would count them twice), each attributed by
  `_gpu_operation`.
  """
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  devices = _device_processes(events)
  totals = collections.Counter()
  for event in events:
    if event.get('ph') != 'X':
      continue
    if devices:
      if event.get('pid') in devices:
        totals[_gpu_operation(event, operations)] += event.get('dur', 0)
      continue
    operation = operations.get(event.get('name', ''))
    if operation is not None and operation.opcode not in _CONTAINERS:
      totals[operation] += event.get('dur', 0)
  return totals


def grouped(durations: collections.Counter, key) -> dict[str, float]:
  """Share of the traced operation time per group, largest first."""
  groups = collections.Counter()
  for operation, micros in durations.items():
    groups[key(operation)] += micros
  total = sum(groups.values())
  return {group: micros / total for group, micros in groups.most_common()}


def _trace_steps(step: bench.CompiledStep, steps: int, directory: pathlib.Path,
                 keep: pathlib.Path | None = None) -> dict:
  jax.profiler.start_trace(str(directory), create_perfetto_trace=True)
  try:
    for _ in range(steps):
      step.run_one()
  finally:
    jax.profiler.stop_trace()
  (path,) = directory.rglob('perfetto_trace.json.gz')
  if keep is not None:  # `profile` made the folder
    shutil.copy(path, keep / path.name)
  with gzip.open(path) as file:
    return json.load(file)


def profile(config, steps: int = 2, warmup: int = 3, timed: int = 4, trace_out: pathlib.Path | None = None) -> dict:
  step = bench.compile_step(config, warmup + timed + steps)
  hlo_text = step.compiled.as_text()
  operations = hlo_operations(hlo_text)
  if trace_out is not None:  # the program too, to read the kept trace against later
    trace_out.mkdir(parents=True, exist_ok=True)
    with gzip.open(trace_out / 'step.hlo.txt.gz', 'wt') as file:
      file.write(hlo_text)
  with step.context(), tempfile.TemporaryDirectory() as directory:
    for _ in range(warmup):
      step.run_one()
    times = timing.timed(step.run_one, timed)
    durations = traced_durations(_trace_steps(step, steps, pathlib.Path(directory), trace_out), operations)
  if not durations:
    raise SystemExit('the trace holds no operation of the compiled step (did the profiler record the CPU client?)')
  top = [{'operation': operation.name, 'ms_per_step': micros / steps / 1e3, 'class': op_class(operation),
          'shape': operation.shape, 'op_name': operation.op_name}
         for operation, micros in durations.most_common()]
  return {'step_s': statistics.median(times), 'flops_per_step': step.flops_per_step,
          'traced_ms_per_step': sum(durations.values()) / steps / 1e3,
          'by_class': grouped(durations, op_class), 'by_part': grouped(durations, model_part), 'top': top}


def _table(title: str, shares: dict[str, float], total_ms: float) -> Iterable[str]:
  yield title
  for group, share in shares.items():
    yield f'  {group:<32} {share * total_ms:8.1f} ms  {share:6.1%}'


def report(result: dict, top: int) -> str:
  total = result['traced_ms_per_step']
  lines = [f'step {result["step_s"]:.3f} s (median of the untraced --timed steps), '
           f'{result["flops_per_step"] / 1e9:.1f} GFLOP, {result["flops_per_step"] / result["step_s"] / 1e9:.1f} '
           f'GFLOP/s; traced operation time {total:.1f} ms per step (thread time on a CPU, kernel time on a GPU)']
  lines += _table('by class', result['by_class'], total)
  lines += _table('by model part', result['by_part'], total)
  lines.append(f'top {top} operations')
  for row in result['top'][:top]:
    origin = re.sub(r'^jit\([^)]*\)/', '', row['op_name'])[-90:] or row['operation'][:90]  # a kernel: its name
    lines.append(f'  {row["ms_per_step"]:7.1f} ms  {row["class"]:<18} {row["shape"]:<30} {origin}')
  return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = config_args.parser(__doc__.split('\n')[0], 'configs/shapes.py')
  parser.add_argument('--steps', type=int, default=2, help='traced steps')
  parser.add_argument('--warmup', type=int, default=3, help='untimed steps first')
  parser.add_argument('--timed', type=int, default=4, help='timed (untraced) steps')
  parser.add_argument('--top', type=int, default=25, help='operations listed')
  parser.add_argument('--trace-out', type=pathlib.Path, help='keep the perfetto trace and the HLO in this folder')
  args, config = config_args.parse(parser, argv)
  result = profile(config, args.steps, args.warmup, args.timed, args.trace_out)
  print(report(result, args.top))
  print(json.dumps({**result, 'top': result['top'][:args.top]}))
  return 0


if __name__ == '__main__':
  huge_pages.reexec_with_huge_pages()  # as the `xmodal` command does, so that the step runs as users run it
  sys.exit(main())
