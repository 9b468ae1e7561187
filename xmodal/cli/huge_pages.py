"""Transparent huge pages for the heap: XLA:CPU's step buffers come in 2 MB pages instead of 4 KB ones.

XLA:CPU takes a step's buffers from malloc, and glibc maps large blocks afresh and unmaps them when they are freed, so
every step touched its temporaries as new memory: on the bench_cpu step, about 170,000 page faults (0.7 GB of 4 KB
pages, each zeroed by the kernel on first touch), and matmuls that ran on small pages' TLB. glibc can ask the kernel
for transparent huge pages on what it maps (the tunable glibc.malloc.hugetlb=1, glibc 2.35 or later; the kernel's THP
mode must be `madvise`, since `always` gives them anyway and `never` refuses), which leaves a few hundred faults per
step. glibc reads GLIBC_TUNABLES only when the process starts, so the `xmodal` command re-executes itself once with
the tunable added. Measured in docs/performance.md ("Huge pages"): the bench_cpu step 1.61 → 1.39 s, the shapes step
0.91 → 0.76 s.

XMODAL_HUGE_PAGES=0 turns this off. A GLIBC_TUNABLES that already sets glibc.malloc.hugetlb is left as it is (that is
also what stops a second re-execution).
"""

from __future__ import annotations

import os
import pathlib
import platform
import sys
from collections.abc import Mapping

TUNABLE = 'glibc.malloc.hugetlb'
SWITCH = 'XMODAL_HUGE_PAGES'  # '0' turns the re-execution off
_THP_MODE_FILE = pathlib.Path('/sys/kernel/mm/transparent_hugepage/enabled')
_GLIBC_WITH_TUNABLE = (2, 35)


def thp_mode() -> str | None:
  """The kernel's transparent huge page mode ('always', 'madvise' or 'never'), or None where it has none."""
  try:
    text = _THP_MODE_FILE.read_text()
  except OSError:
    return None
  selected = [word for word in text.split() if word.startswith('[')]
  return selected[0].strip('[]') if selected else None


def glibc_version() -> tuple[int, ...] | None:
  """The C library's version where it is glibc, else None (musl, macOS)."""
  name, version = platform.libc_ver()
  if name != 'glibc' or not version:
    return None
  return tuple(int(part) for part in version.split('.') if part.isdigit())


def tunables_with_huge_pages(environ: Mapping[str, str], mode: str | None,
                             glibc: tuple[int, ...] | None) -> str | None:
  """GLIBC_TUNABLES with glibc.malloc.hugetlb=1 added; None where adding it would change nothing (no glibc that
  knows it, a kernel mode other than madvise), or where the user chose (XMODAL_HUGE_PAGES=0, the tunable set)."""
  if environ.get(SWITCH, '1') == '0' or mode != 'madvise' or glibc is None or glibc < _GLIBC_WITH_TUNABLE:
    return None
  current = environ.get('GLIBC_TUNABLES', '')
  if any(item.split('=', 1)[0] == TUNABLE for item in current.split(':')):
    return None
  return ':'.join(filter(None, (current, f'{TUNABLE}=1')))


def tunables_here(environ: Mapping[str, str]) -> str | None:
  """`tunables_with_huge_pages` for this machine's kernel and C library."""
  if sys.platform != 'linux':
    return None
  return tunables_with_huge_pages(environ, thp_mode(), glibc_version())


def reexec_with_huge_pages() -> None:
  """Replaces this process by the same command line with the tunable set; returns where it does not apply.

  Call it first thing in a program's entry point, before any thread starts or any output is written: the process
  image is replaced (same PID, same open files), so nothing done before survives.
  """
  tunables = tunables_here(os.environ)
  if tunables is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, 'GLIBC_TUNABLES': tunables})
