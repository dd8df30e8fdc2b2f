"""The package's modules import each other without a cycle (docs/DESIGN.md's layers).

Imports are read from the source with `ast`, at module level and inside functions alike: a lazy
import only moves a cycle from import time to call time, and a lower layer reaching up to a
higher one is the fault either way.
"""
import ast
import pathlib
import textwrap

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "amd135m"


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
  parts = path.relative_to(root.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _ancestors(name: str) -> list[str]:
  parts = name.split(".")
  return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(root: pathlib.Path) -> dict[str, set[str]]:
  """{module: the package's modules it imports} for the package at `root`.

  Importing `a.b.c` runs the packages `a` and `a.b` first, so they count too; but a module's own
  enclosing packages are already running when it runs, so `from a import b` inside `a.c` counts
  only `a.b`, unless it reads a name that `a/__init__.py` defines (then `a` itself counts).
  """
  files = {_module_name(path, root): path for path in sorted(root.rglob("*.py"))}
  graph = {}
  for name, path in files.items():
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    enclosing = set(_ancestors(name))
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        for alias in node.names:
          targets.update(m for m in (*_ancestors(alias.name), alias.name) if m not in enclosing)
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: `from . import x` in a.b.c is `from a.b import x`
          up = package.split(".")[:len(package.split(".")) - node.level + 1]
          base = ".".join(up + ([base] if base else []))
        targets.update(m for m in _ancestors(base) if m not in enclosing)
        submodules = [f"{base}.{alias.name}" for alias in node.names]
        targets.update(m for m in submodules if m in files)
        if base not in enclosing or any(m not in files for m in submodules):
          targets.add(base)
    graph[name] = {t for t in targets if t in files and t != name}
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan), each sorted."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(node):
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for succ in sorted(graph.get(node, ())):
      if succ not in index:
        visit(succ)
        low[node] = min(low[node], low[succ])
      elif succ in on_stack:
        low[node] = min(low[node], index[succ])
    if low[node] == index[node]:
      component = []
      while True:
        member = stack.pop()
        on_stack.discard(member)
        component.append(member)
        if member == node:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return sorted(found)


def test_the_package_has_no_import_cycle():
  graph = import_graph(PACKAGE)
  # The reader sees the package: known edges, module-level and lazy, are there.
  assert "amd135m.model" in graph["amd135m.sampling"]
  assert "amd135m.paths" in graph["amd135m.cpu_kernels"]
  assert "amd135m.data.builders" in graph["amd135m.training.data"]  # inside a function
  assert cycles(graph) == []


def _package(tmp_path: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
  for name, text in files.items():
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
  return tmp_path / "pkg"


def test_a_cycle_is_found_at_module_level_inside_a_function_and_through_a_package(tmp_path):
  root = _package(tmp_path, {
      "pkg/__init__.py": "",
      # a -> b at module level, b -> a inside a function: a cycle.
      "pkg/a.py": "from pkg import b\n",
      "pkg/b.py": "def f():\n  import pkg.a\n",
      # c -> d -> (the package sub, whose __init__ imports e) -> e -> c: a cycle.
      "pkg/c.py": "from pkg.d import g\n",
      "pkg/d.py": "from pkg.sub import x\n",
      "pkg/sub/__init__.py": "from pkg.sub import e\n",
      "pkg/sub/e.py": "from .. import c\n",
      "pkg/sub/x.py": "",
      # A name read from the enclosing package's own __init__ is a cycle with it.
      "pkg/loop/__init__.py": "from pkg.loop.y import Y\nNAME = 1\n",
      "pkg/loop/y.py": "from pkg.loop import NAME\nY = NAME\n",
  })
  assert cycles(import_graph(root)) == [
      ["pkg.a", "pkg.b"],
      ["pkg.c", "pkg.d", "pkg.sub", "pkg.sub.e"],
      ["pkg.loop", "pkg.loop.y"]]


def test_a_package_importing_its_own_submodules_is_no_cycle(tmp_path):
  root = _package(tmp_path, {
      "pkg/__init__.py": "from pkg import a\nfrom pkg.a import A\n",
      "pkg/a.py": "from pkg import b\nimport pkg.c\nA = 1\n",
      "pkg/b.py": "from pkg.c import C\n",
      "pkg/c.py": "import os\nC = 2\n",
  })
  graph = import_graph(root)
  assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b", "pkg.c"}, "pkg.b": {"pkg.c"},
                   "pkg.c": set()}
  assert cycles(graph) == []
