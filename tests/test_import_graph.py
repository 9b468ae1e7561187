"""The layout's import rules (DESIGN.md, "Layout"), read from the source with `ast`: nothing is imported to check them.

  - only xmodal/data/ imports tensorflow or tensorflow_datasets, and importing any module outside it loads neither;
  - xmodal/inference/ reaches none of xmodal/train, xmodal/models, xmodal/data;
  - xmodal/models/ reaches none of xmodal/train, xmodal/evaluation, xmodal/cli;
  - xmodal/losses/ reaches no xmodal/models;
  - no two modules import each other, directly or through others;
  - every `xmodal` import names a module that exists;
  - nothing in xmodal imports benchmarks/ (its PyTorch reference is a test-extra dependency).

Every import statement is an edge: at the top of a module, inside a function (it runs when the function is called)
and under `if TYPE_CHECKING:` (the circle is there for a reader even if not at run time). "Reaches" follows edges
from module to module, and from a module to the packages above it, whose `__init__` runs first. A cycle is looked
for along the import statements alone: a package's `__init__` importing its own modules is how packages work.
"""

import ast
import collections
import dataclasses
import pathlib

from helpers import ROOT

TENSORFLOW = ('tensorflow', 'tensorflow_datasets')


@dataclasses.dataclass
class Graph:
  """xmodal's modules and their imports.

  modules: every module, packages by their own name ('xmodal.data' is xmodal/data/__init__.py).
  edges: module -> the xmodal modules its import statements name (all of them).
  eager: the same, only the statements that run when the module is imported (not in functions, not TYPE_CHECKING).
  external: module -> (top-level package, eager) of every import from outside xmodal.
  missing: (module, the xmodal name it imports that does not exist).
  """
  modules: set[str]
  edges: dict[str, set[str]]
  eager: dict[str, set[str]]
  external: dict[str, set[tuple[str, bool]]]
  missing: list[tuple[str, str]]


def _is_type_checking(test: ast.expr) -> bool:
  return (isinstance(test, ast.Name) and test.id == 'TYPE_CHECKING') or (
      isinstance(test, ast.Attribute) and test.attr == 'TYPE_CHECKING')


class _Imports(ast.NodeVisitor):
  """Collects (dotted name, imported name or None, eager) for every import statement of a module."""

  def __init__(self, package: str):
    self.package = package  # what a relative import is relative to
    self.found: list[tuple[str, str | None, bool]] = []
    self._lazy = 0

  def _deferred(self, nodes) -> None:
    self._lazy += 1
    for node in nodes:
      self.visit(node)
    self._lazy -= 1

  def visit_FunctionDef(self, node):
    self._deferred(node.body)

  visit_AsyncFunctionDef = visit_FunctionDef

  def visit_If(self, node):
    if _is_type_checking(node.test):
      self._deferred(node.body)
      for child in node.orelse:
        self.visit(child)
    else:
      self.generic_visit(node)

  def visit_Import(self, node):
    for alias in node.names:
      self.found.append((alias.name, None, not self._lazy))

  def visit_ImportFrom(self, node):
    base = node.module or ''
    if node.level:
      parts = self.package.split('.')[:len(self.package.split('.')) - node.level + 1]
      base = '.'.join(parts + ([node.module] if node.module else []))
    for alias in node.names:
      self.found.append((base, alias.name, not self._lazy))


def import_graph(root: pathlib.Path, package: str = 'xmodal') -> Graph:
  """Parses every module of `package` under `root` (the folder that holds it)."""
  files = {}
  for path in sorted((root / package).rglob('*.py')):
    parts = path.relative_to(root).with_suffix('').parts
    files['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = path
  modules = set(files)
  graph = Graph(modules, {m: set() for m in modules}, {m: set() for m in modules},
                {m: set() for m in modules}, [])
  for module, path in files.items():
    visitor = _Imports(module if path.name == '__init__.py' else module.rpartition('.')[0])
    visitor.visit(ast.parse(path.read_text(), str(path)))
    for name, member, eager in visitor.found:
      if name.split('.')[0] != package:
        graph.external[module].add((name.split('.')[0], eager))
        continue
      # `from a.b import c` names the module a.b.c when there is one, else a name defined in a.b.
      target = f'{name}.{member}' if member and f'{name}.{member}' in modules else name
      if target not in modules:
        graph.missing.append((module, f'{name}.{member}' if member else name))
        continue
      graph.edges[module].add(target)
      if eager:
        graph.eager[module].add(target)
  return graph


def _with_packages(edges: dict[str, set[str]], modules: set[str]):
  """Successors of a module: what it imports, and the packages above it (whose __init__ runs before it)."""

  def successors(module: str) -> set[str]:
    parts = module.split('.')
    above = {'.'.join(parts[:i]) for i in range(1, len(parts))} & modules
    return edges.get(module, set()) | above

  return successors


def _path(start: str, successors, reached) -> list[str] | None:
  """The shortest import chain from `start` to a module for which `reached` is true, or None."""
  parent = {start: None}
  queue = collections.deque([start])
  while queue:
    module = queue.popleft()
    if module != start and reached(module):
      chain = [module]
      while parent[chain[-1]] is not None:
        chain.append(parent[chain[-1]])
      return chain[::-1]
    for successor in sorted(successors(module)):
      if successor not in parent:
        parent[successor] = module
        queue.append(successor)
  return None


def _under(module: str, package: str) -> bool:
  return module == package or module.startswith(package + '.')


def forbidden_reach(graph: Graph, importers: str, forbidden: tuple[str, ...]) -> list[str]:
  """Each module under `importers` that reaches a module under one of `forbidden`, with the chain."""
  successors = _with_packages(graph.edges, graph.modules)
  found = []
  for module in sorted(m for m in graph.modules if _under(m, importers)):
    chain = _path(module, successors, lambda m: any(_under(m, f) for f in forbidden))
    if chain:
      found.append(' -> '.join(chain))
  return found


def tensorflow_outside_data(graph: Graph, data: str = 'xmodal.data') -> list[str]:
  """Modules outside `data` that import TensorFlow, or whose import loads a module that does."""
  loads_tf = {m for m, names in graph.external.items() if any(n in TENSORFLOW and eager for n, eager in names)}
  successors = _with_packages(graph.eager, graph.modules)
  found = []
  for module in sorted(m for m in graph.modules if not _under(m, data)):
    direct = sorted(n for n, _ in graph.external[module] if n in TENSORFLOW)
    if direct:
      found.append(f'{module} imports {", ".join(direct)}')
    chain = _path(module, successors, lambda m: m in loads_tf)
    if chain:
      found.append(' -> '.join(chain) + ' (imports TensorFlow when imported)')
  return found


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
  """The import circles: every strongly connected set of more than one module (or a module importing itself)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(module: str) -> None:  # Tarjan's algorithm
    index[module] = low[module] = len(index)
    stack.append(module)
    on_stack.add(module)
    for successor in sorted(edges.get(module, ())):
      if successor not in index:
        visit(successor)
        low[module] = min(low[module], low[successor])
      elif successor in on_stack:
        low[module] = min(low[module], index[successor])
    if low[module] == index[module]:
      component = []
      while not component or component[-1] != module:
        component.append(stack.pop())
        on_stack.discard(component[-1])
      if len(component) > 1 or module in edges.get(module, ()):
        found.append(sorted(component))

  for module in sorted(edges):
    if module not in index:
      visit(module)
  return found


RULES = (('xmodal.inference', ('xmodal.train', 'xmodal.models', 'xmodal.data')),
         ('xmodal.models', ('xmodal.train', 'xmodal.evaluation', 'xmodal.cli')),
         ('xmodal.losses', ('xmodal.models',)))


def violations(graph: Graph) -> list[str]:
  """Every broken rule of the module docstring, one line each."""
  found = [f'{module} imports {name}, which does not exist' for module, name in graph.missing]
  found += tensorflow_outside_data(graph)
  for importers, forbidden in RULES:
    found += forbidden_reach(graph, importers, forbidden)
  found += ['import cycle: ' + ' <-> '.join(cycle) for cycle in cycles(graph.edges)]
  return found


# ---------------------------------------------------------------------------------------------------------------
# The rules hold for xmodal.
# ---------------------------------------------------------------------------------------------------------------

def test_xmodal_keeps_the_layout_import_rules():
  graph = import_graph(ROOT)
  assert len(graph.modules) > 60 and sum(map(len, graph.edges.values())) > 120  # the whole package was read
  assert violations(graph) == []


def test_xmodal_imports_nothing_from_benchmarks():
  # benchmarks/ (the PyTorch reference and the side-by-side comparison) stands outside the package and above it.
  graph = import_graph(ROOT)
  found = [f'{module} imports {name}' for module, names in sorted(graph.external.items())
           for name, _ in names
           if name in ('benchmarks', 'torch_reference', 'compare', 'profile_step', 'config_args', 'timing')]
  assert found == []


# ---------------------------------------------------------------------------------------------------------------
# The checker finds what it is for: a small package with one planted violation of each rule.
# ---------------------------------------------------------------------------------------------------------------

PLANTED = {
    'xmodal/__init__.py': '',
    'xmodal/data/__init__.py': '',
    'xmodal/data/pipeline.py': 'import tensorflow as tf\n',
    'xmodal/models/__init__.py': 'from xmodal.models.model import XModal\n',
    'xmodal/models/model.py': 'XModal = object\n',
    # A TYPE_CHECKING import, for the cycle with index.py.
    'xmodal/inference/__init__.py': '',
    'xmodal/inference/retriever.py': ('from typing import TYPE_CHECKING\nfrom xmodal.inference import index\n'
                                      'if TYPE_CHECKING:\n  from xmodal import tokenizer\n'),
    'xmodal/inference/index.py': 'from . import retriever\n',
    # Inference reaches the models through the tokenizer, lazily; the tokenizer loads TensorFlow when imported.
    'xmodal/tokenizer/__init__.py': 'import xmodal.data.pipeline\n\ndef load():\n  from xmodal.models import XModal\n',
    # A losses module reaching the models through a package __init__, and a TensorFlow import of its own.
    'xmodal/losses/__init__.py': 'from xmodal.models import model\n',
    'xmodal/losses/ring.py': 'import tensorflow_datasets\n',
    'xmodal/train/__init__.py': 'from xmodal.gone import thing\n',
}


def test_the_checker_reports_each_planted_violation(tmp_path):
  for name, source in PLANTED.items():
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(source)
  found = violations(import_graph(tmp_path))
  assert 'xmodal.train imports xmodal.gone.thing, which does not exist' in found
  assert 'xmodal.losses.ring imports tensorflow_datasets' in found
  assert 'xmodal.tokenizer -> xmodal.data.pipeline (imports TensorFlow when imported)' in found
  assert 'xmodal.inference.retriever -> xmodal.tokenizer -> xmodal.data.pipeline (imports TensorFlow when imported)' \
      not in found  # only under TYPE_CHECKING: not loaded when retriever is imported
  assert 'xmodal.inference.retriever -> xmodal.tokenizer -> xmodal.data.pipeline' in found  # but reached
  assert 'xmodal.losses.ring -> xmodal.losses -> xmodal.models.model' in found  # through the package's __init__
  assert 'import cycle: xmodal.inference.index <-> xmodal.inference.retriever' in found
  assert not any(line.startswith('xmodal.models') for line in found)  # the models keep the rules here
  assert cycles({'a': {'a'}}) == [['a']] and cycles({'a': {'b'}, 'b': {'c'}, 'c': set()}) == []
