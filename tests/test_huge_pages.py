"""The `xmodal` command's re-execution with transparent huge pages for the heap (xmodal/cli/huge_pages.py)."""

import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT
from xmodal.cli import huge_pages

_GLIBC = (2, 36)


@pytest.mark.parametrize('environ, expected', [
    ({}, 'glibc.malloc.hugetlb=1'),
    ({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'),
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, None),  # the user's choice, and the guard against a second exec
    ({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=2'}, None),
    ({'XMODAL_HUGE_PAGES': '0'}, None),
    ({'XMODAL_HUGE_PAGES': '1'}, 'glibc.malloc.hugetlb=1'),
])
def test_the_tunable_is_added_unless_the_user_chose(environ, expected):
  assert huge_pages.tunables_with_huge_pages(environ, 'madvise', _GLIBC) == expected


@pytest.mark.parametrize('mode, glibc', [('always', _GLIBC), ('never', _GLIBC), (None, _GLIBC), ('madvise', None),
                                         ('madvise', (2, 34))])
def test_nothing_changes_where_the_kernel_or_the_c_library_would_not_use_it(mode, glibc):
  assert huge_pages.tunables_with_huge_pages({}, mode, glibc) is None


def test_the_mode_is_the_bracketed_word(tmp_path, monkeypatch):
  mode_file = tmp_path / 'enabled'
  mode_file.write_text('always [madvise] never\n')
  monkeypatch.setattr(huge_pages, '_THP_MODE_FILE', mode_file)
  assert huge_pages.thp_mode() == 'madvise'
  monkeypatch.setattr(huge_pages, '_THP_MODE_FILE', tmp_path / 'absent')
  assert huge_pages.thp_mode() is None


def test_main_re_executes_only_as_the_process_entry(monkeypatch, capsys):
  from xmodal.cli import main as cli_main
  calls = []
  monkeypatch.setattr(huge_pages, 'reexec_with_huge_pages', lambda: calls.append(1))
  config = str(ROOT / 'configs' / 'bench_cpu.py')
  monkeypatch.setattr(sys, 'argv', ['xmodal', 'config', '--config', config])
  assert cli_main.main() == 0
  assert calls == [1]
  assert cli_main.main(['config', '--config', config]) == 0  # called in-process: a test, a notebook
  assert calls == [1]
  capsys.readouterr()


# Re-executes itself, then runs a jitted function whose 64 MB temporary is freed after every call, and reports the
# page faults of one call after warming up.
_CHILD = """
import json, os, resource, sys
from xmodal.cli import huge_pages
huge_pages.reexec_with_huge_pages()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sum(jnp.sin(jnp.outer(x, x)) ** 2))
x = jnp.linspace(0.0, 1.0, 4096)
for _ in range(3):
  f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
f(x).block_until_ready()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({'tunables': os.environ.get('GLIBC_TUNABLES'), 'faults': faults}))
"""


def _child(**env):
  environ = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', huge_pages.SWITCH)}
  out = subprocess.run([sys.executable, '-c', _CHILD], env={**environ, **env}, capture_output=True, text=True,
                       check=True, timeout=120)
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_re_executed_process_has_the_tunable_and_far_fewer_page_faults():
  applies = huge_pages.tunables_here({}) is not None
  with_pages, without = _child(), _child(XMODAL_HUGE_PAGES='0')
  assert without['tunables'] is None
  if not applies:  # another kernel mode or C library: the process runs as it was started
    assert with_pages['tunables'] is None
    return
  assert with_pages['tunables'] == 'glibc.malloc.hugetlb=1'
  # 64 MB in 4 KB pages is 16,384 faults; in 2 MB pages, 32.
  assert without['faults'] > 8000, without
  assert with_pages['faults'] < without['faults'] / 20, (with_pages, without)
