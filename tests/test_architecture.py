"""The package's layout rules, enforced (docs/architecture.md says why).

- Imports run downward only: a module imports modules of its own package or
  of a package on a lower level (`LEVELS`), never one above or beside it.
- No import circle, counting imports inside functions too.
- No ``_private`` name crosses a module (``from m import _x`` or ``m._x``).
- No module over `MAX_LINES` lines.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "keras_mpq"
MAX_LINES = 800

# Level of each sub-package; "" is the top (keras_mpq/*.py). Packages on one
# level do not import each other.
LEVELS = {
    "base": 0,
    "model": 1,
    "synthesis": 2, "quantization": 2,
    "sensitivity": 3, "export": 3,
    "plan": 4,
    "": 5,
}


def _modules():
  found = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    found[".".join(parts)] = path
  return found


MODULES = _modules()


def _package(module: str) -> str:
  """'keras_mpq.plan.costs' -> 'plan'; 'keras_mpq.api' and 'keras_mpq' -> ''."""
  parts = module.split(".")
  if len(parts) >= 3 or (len(parts) == 2 and module in MODULES and
                         MODULES[module].name == "__init__.py"):
    return parts[1]
  return ""


def _imports(module: str):
  """(imported module, names taken from it, line) for every keras_mpq import in ``module``."""
  tree = ast.parse(MODULES[module].read_text())
  aliases = {}
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
        node.module == "keras_mpq" or node.module.startswith("keras_mpq.")):
      for a in node.names:
        full = f"{node.module}.{a.name}"
        if full in MODULES:  # a module: from keras_mpq.plan import costs
          found.append((full, (), node.lineno))
          aliases[a.asname or a.name] = full
        else:
          found.append((node.module, (a.name,), node.lineno))
    elif isinstance(node, ast.Import):
      for a in node.names:
        if a.name.startswith("keras_mpq.") and a.name in MODULES:
          found.append((a.name, (), node.lineno))
          if a.asname:
            aliases[a.asname] = a.name
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in aliases):
      found.append((aliases[node.value.id], (node.attr,), node.lineno))
  return found


def _graph():
  return {m: {t for t, _, _ in _imports(m) if t != m and t != "keras_mpq"} for m in MODULES}


def test_every_subpackage_has_a_level():
  packages = {_package(m) for m in MODULES}
  assert packages <= set(LEVELS), sorted(packages - set(LEVELS))


def test_imports_run_downward_only():
  bad = []
  for module in MODULES:
    here = _package(module)
    for target, _, line in _imports(module):
      if target == "keras_mpq":  # the package's lazy public names: top only
        if here != "" and module != "keras_mpq":
          bad.append(f"{module}:{line} imports keras_mpq itself")
        continue
      there = _package(target)
      if there == here:
        continue
      if LEVELS[there] >= LEVELS[here]:
        bad.append(f"{module}:{line} ({here or 'top'}, level {LEVELS[here]}) imports "
                   f"{target} ({there or 'top'}, level {LEVELS[there]})")
  assert not bad, "\n".join(bad)


def _cycles(graph):
  """Each circle in ``graph`` (module -> imported modules) as a list of modules."""
  state, cycles = {}, []

  def visit(node, path):
    state[node] = 1
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        cycles.append(path[path.index(nxt):] + [nxt])
      elif nxt not in state:
        visit(nxt, path + [nxt])
    state[node] = 2

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])
  return cycles


def test_no_import_circle():
  cycles = _cycles(_graph())
  assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_no_private_name_crosses_a_module():
  bad = []
  for module in MODULES:
    for target, names, line in _imports(module):
      for name in names:
        if name.startswith("_") and not name.startswith("__") and target != module:
          bad.append(f"{module}:{line} uses {target}.{name}")
  assert not bad, "\n".join(bad)


def test_no_module_is_too_long():
  long = {m: len(p.read_text().splitlines()) for m, p in MODULES.items()}
  assert all(n <= MAX_LINES for n in long.values()), {
      m: n for m, n in long.items() if n > MAX_LINES}


@pytest.mark.parametrize("source, problem", [
    ("from keras_mpq.plan import costs\n", "imports"),          # base importing plan
    ("from keras_mpq.base.types import _kind\n", "uses"),        # a private name
])
def test_the_checks_catch_what_they_forbid(tmp_path, monkeypatch, source, problem):
  # A fake base module that breaks one rule: the same checks must fail on it.
  fake = tmp_path / "fake.py"
  fake.write_text(source)
  monkeypatch.setitem(MODULES, "keras_mpq.base.fake", fake)
  check = (test_imports_run_downward_only if problem == "imports"
           else test_no_private_name_crosses_a_module)
  with pytest.raises(AssertionError, match=problem):
    check()


def test_the_circle_check_catches_a_circle():
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
  assert _cycles({"a": {"b"}, "b": set()}) == []
