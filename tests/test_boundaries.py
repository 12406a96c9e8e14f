"""The package's module boundaries, read from the source: no import cycles, configs as leaf
data, the analysis apart from the trainer, no hidden (function-level) imports."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "sae_jax"

# Function-level imports of sae_jax modules that are there on purpose, with the reason.
_COMMAND_WHY = ("a console command: distributed.initialize (or a bad path's one line) comes "
                "before JAX and the library load, and `sae-jax --help` loads nothing")
DEFERRED_OK: dict[tuple[str, str], str] = {
    (f"sae_jax.commands.{m}", "main"): _COMMAND_WHY
    for m in ("trace", "analyze", "train_sae", "collect", "label_examples", "plan")}


def _module_name(path: Path) -> str:
  parts = path.relative_to(PKG.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
  return {_module_name(p): ast.parse(p.read_text()) for p in sorted(PKG.rglob("*.py"))}


def _targets(node, module: str, is_package: bool, known: set[str]) -> list[str]:
  """sae_jax modules an import statement loads (``from pkg import mod`` loads ``pkg.mod``)."""
  if isinstance(node, ast.Import):
    return [a.name for a in node.names if a.name.startswith("sae_jax")]
  base = node.module or ""
  if node.level:
    anchor = module.split(".")
    anchor = anchor if is_package else anchor[:-1]
    anchor = anchor[:len(anchor) - node.level + 1]
    base = ".".join(anchor + ([base] if base else []))
  if not base.startswith("sae_jax"):
    return []
  # ``from pkg import mod`` depends on mod (pkg's __init__ runs first by Python's rules, which
  # is not a design dependency); ``from mod import name`` depends on mod.
  subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
  return subs or [base]


def _top_level_imports(node) -> list:
  """Import statements that run at import time (not inside functions; TYPE_CHECKING skipped)."""
  out = []
  for child in ast.iter_child_nodes(node):
    if isinstance(child, (ast.Import, ast.ImportFrom)):
      out.append(child)
    elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
      continue
    elif isinstance(child, (ast.If, ast.Try, ast.With, ast.ClassDef)):
      out += _top_level_imports(child)
  return out


def _graph() -> dict[str, set[str]]:
  mods = _modules()
  known = set(mods)
  graph = {}
  for name, tree in mods.items():
    is_pkg = (PKG.parent / Path(*name.split("."), "__init__.py")).exists()
    deps = set()
    for node in _top_level_imports(tree):
      deps.update(t for t in _targets(node, name, is_pkg, known) if t in known and t != name)
    graph[name] = deps
  return graph


def _is_package(name: str) -> bool:
  return (PKG.parent / Path(*name.split("."), "__init__.py")).exists()


def test_no_import_cycles_between_modules():
  # A package __init__ that re-exports its modules is not a dependency of those modules: drop
  # edges into packages (importing ``sae_jax.x.y`` runs ``sae_jax.x`` first, by Python's rules,
  # which is not a design dependency).
  graph = {m: {d for d in deps if not _is_package(d)} for m, deps in _graph().items()
           if not _is_package(m)}
  state: dict[str, int] = {}
  cycles = []

  def visit(m, stack):
    state[m] = 1
    for d in sorted(graph.get(m, ())):
      if state.get(d) == 1:
        cycles.append(stack[stack.index(d):] + [d])
      elif d not in state:
        visit(d, stack + [d])
    state[m] = 2

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])
  assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_configs_are_leaf_data():
  graph = _graph()
  assert graph["sae_jax.config"] == {"sae_jax.errors"}
  assert graph["sae_jax.trace_config"] <= {"sae_jax.errors", "sae_jax.config"}


def test_analysis_needs_nothing_of_the_trainer_or_the_trace():
  graph = _graph()
  seen, todo = set(), [m for m in graph if m.startswith("sae_jax.analysis")]
  while todo:  # everything the analysis loads, transitively
    m = todo.pop()
    if m not in seen:
      seen.add(m)
      todo += sorted(graph[m])
  forbidden = sorted(m for m in seen if m == "sae_jax.trace" or m.startswith("sae_jax.train"))
  assert not forbidden, f"the analysis imports {forbidden}"


def test_no_hidden_function_level_imports_of_the_package():
  found = []
  for name, tree in _modules().items():
    for fn in ast.walk(tree):
      if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      for node in ast.walk(fn):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
          is_pkg = _is_package(name)
          if _targets(node, name, is_pkg, set()) and (name, fn.name) not in DEFERRED_OK:
            found.append(f"{name}.{fn.name} (line {node.lineno})")
  assert not found, "function-level imports of sae_jax modules: " + ", ".join(found)


@pytest.mark.parametrize("limit_lines, limit_fn", [(420, 60)])
def test_modules_and_functions_stay_small(limit_lines, limit_fn):
  long_modules, long_fns = [], []
  for path in sorted(PKG.rglob("*.py")):
    src = path.read_text()
    if len(src.splitlines()) > limit_lines:
      long_modules.append(f"{path.name} ({len(src.splitlines())})")
    for fn in ast.walk(ast.parse(src)):
      if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        n = fn.end_lineno - fn.lineno + 1
        if n > limit_fn:
          long_fns.append(f"{path.name}:{fn.name} ({n})")
  assert not long_modules and not long_fns, (long_modules, long_fns)
