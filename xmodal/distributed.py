"""Multi-process setup: one `initialize()` call at the top of every entry point, a no-op for a single process.

Where the process layout comes from, first match wins:
  1. explicit arguments, else the environment variables XMODAL_COORDINATOR (host:port of process 0),
     XMODAL_NUM_PROCESSES and XMODAL_PROCESS_ID (launch/local.sh and launch/k8s_indexed_job.yaml set them);
  2. XMODAL_DISTRIBUTED=auto: jax's own cluster detection decides (Cloud TPU VM pods, GKE TPU, Kubernetes with the
     `kubernetes` package, SLURM, Open MPI; launch/tpu_pod.sh sets it);
  3. detected without asking: a SLURM step with more than one task (srun), or an Open MPI job of more than one rank;
  4. otherwise a single process: nothing to do.

Must run before anything touches a jax backend (creating an array, `jax.devices()`).
"""

from __future__ import annotations

import logging
import os
import sys
import types

import jax

ENV_COORDINATOR = 'XMODAL_COORDINATOR'
ENV_NUM_PROCESSES = 'XMODAL_NUM_PROCESSES'
ENV_PROCESS_ID = 'XMODAL_PROCESS_ID'
ENV_DISTRIBUTED = 'XMODAL_DISTRIBUTED'


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ''):
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f'{name} must be an integer, got {value!r}.') from None


def detect_cluster() -> str | None:
  """The cluster environment that launched several processes of this run, or None for a single process.

  Returns the `cluster_detection_method` to hand to `jax.distributed.initialize` ('slurm', 'ompi'), or 'auto' to
  let jax choose.
  """
  if os.environ.get(ENV_DISTRIBUTED, '').lower() == 'auto':
    return 'auto'
  if 'SLURM_JOB_ID' in os.environ and (_env_int('SLURM_STEP_NUM_TASKS') or _env_int('SLURM_NTASKS') or 1) > 1:
    if 'SLURM_STEP_NODELIST' not in os.environ or 'SLURM_PROCID' not in os.environ:
      # The batch script itself sees SLURM_NTASKS but is one process; only srun starts the tasks.
      raise RuntimeError('SLURM allocation of several tasks, but this process is not a job step: start the '
                         'training with `srun`, one task per GPU (see launch/slurm.sbatch).')
    return 'slurm'
  if (_env_int('OMPI_COMM_WORLD_SIZE') or 1) > 1:
    return 'ompi'
  return None


def _enable_cpu_collectives() -> None:
  # Cross-process collectives on CPU need an implementation; gloo is jax 0.10's default, but a run that set
  # it to None (or another jax without a default) would fail only at the first collective, cryptically.
  if not jax.config.jax_cpu_collectives_implementation:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')


def _exit_at_once_on_uncaught_exception() -> None:
  """Makes an uncaught exception end this process now, with status 1, after printing its traceback.

  Without this, a failing process waits at exit in jax's shutdown barrier for peers that are themselves waiting for
  it inside a collective: the whole run hangs for minutes instead of failing, and the launcher cannot tell.
  """
  previous = sys.excepthook

  def hook(kind: type[BaseException], error: BaseException, traceback: types.TracebackType | None) -> None:
    previous(kind, error, traceback)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)

  sys.excepthook = hook


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Joins the processes of a multi-process run (`jax.distributed.initialize`); a no-op for one process.

  In a multi-process run, an uncaught exception then ends its process at once (see
  `_exit_at_once_on_uncaught_exception`); `sys.exit(nonzero)` does not, so entry points should let errors raise.
  SIGTERM no longer kills the process either: jax's preemption notifier takes it over (a `PreemptionGuard` from
  xmodal.train.checkpoint turns it into a stop request; launchers follow SIGTERM with SIGKILL after a grace period).

  Args:
    coordinator_address: 'host:port' of process 0, reachable from every process; default XMODAL_COORDINATOR.
    num_processes: the number of processes; default XMODAL_NUM_PROCESSES.
    process_id: this process's index in [0, num_processes); default XMODAL_PROCESS_ID.

  Raises:
    ValueError: the process layout is given only in part (e.g. a count without a coordinator).
  """
  if jax.distributed.is_initialized():
    return
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
  num_processes = _env_int(ENV_NUM_PROCESSES) if num_processes is None else num_processes
  process_id = _env_int(ENV_PROCESS_ID) if process_id is None else process_id

  if (coordinator_address, num_processes, process_id) != (None, None, None):
    if num_processes == 1:
      return
    missing = [name for name, value in ((ENV_COORDINATOR, coordinator_address), (ENV_NUM_PROCESSES, num_processes),
                                        (ENV_PROCESS_ID, process_id)) if value is None]
    if missing:
      raise ValueError(f'Multi-process layout given in part: set {", ".join(missing)} as well (or the matching '
                       'arguments of xmodal.distributed.initialize).')
    _enable_cpu_collectives()
    logging.info('Joining %s as process %d of %d.', coordinator_address, process_id, num_processes)
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    _exit_at_once_on_uncaught_exception()
    return

  cluster = detect_cluster()
  if cluster is None:
    return
  _enable_cpu_collectives()
  logging.info('Joining a multi-process run detected by %s.', cluster)
  jax.distributed.initialize(cluster_detection_method=None if cluster == 'auto' else cluster)
  _exit_at_once_on_uncaught_exception()


def is_primary() -> bool:
  """True in process 0, the one that writes logs, metrics and configs."""
  return jax.process_index() == 0
