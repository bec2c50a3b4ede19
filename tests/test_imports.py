"""The package's import graph: no cycles, and nothing outside llavamod_jax.demo imports the demo."""

import ast
import pkgutil
from pathlib import Path

import llavamod_jax

ROOT = Path(llavamod_jax.__file__).parent


def _modules() -> dict[str, Path]:
  out = {"llavamod_jax": ROOT / "__init__.py"}
  for info in pkgutil.walk_packages([str(ROOT)], prefix="llavamod_jax."):
    base = ROOT.joinpath(*info.name.split(".")[1:])
    out[info.name] = base / "__init__.py" if info.ispkg else base.with_suffix(".py")
  return out


def _imports(name: str, path: Path, modules) -> set[str]:
  """llavamod_jax modules `name` imports anywhere in its file (module level or inside functions);
  `from a import b` counts as importing a.b when that is a module, else a."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name in modules}
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for a in node.names:
        sub = f"{node.module}.{a.name}"
        out.add(sub if sub in modules else node.module)
  return {m for m in out if m in modules and m != name}


def _graph():
  modules = _modules()
  return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_the_walk_sees_the_package():
  graph = _graph()
  assert {"llavamod_jax.train.loop", "llavamod_jax.demo.assets", "llavamod_jax.sharding"} <= set(graph)
  assert "llavamod_jax.train.build" in graph["llavamod_jax.train.loop"]


def _cycle(graph) -> list[str] | None:
  """One import cycle of `graph` (module -> imported modules), or None."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done

  def visit(node, path):
    state[node] = 1
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state and (found := visit(nxt, path + [nxt])):
        return found
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state and (found := visit(node, [node])):
      return found
  return None


def test_cycle_finder_finds_a_planted_cycle():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle():
  cycle = _cycle(_graph())
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_only_the_demo_imports_the_demo():
  offenders = {name: sorted(m for m in deps if m.startswith("llavamod_jax.demo"))
               for name, deps in _graph().items() if not name.startswith("llavamod_jax.demo")}
  assert not {k: v for k, v in offenders.items() if v}
