"""The source tree's structure, read with ``ast`` (nothing is imported or run).

* No module uses another module's private name: ``from m import _x``,
  ``import m._x`` or ``m._x`` on an imported module ``m`` (dunder names are
  public). This holds inside a package too: a private submodule
  (``isometry.experiments._training``) is private to the package's
  ``__init__``, and what sibling modules share is public.
* No import cycle among the modules of ``isometry/``, ``experiments/`` and
  ``paper_figures/``: imports at the top and inside functions both count; a
  package ``__init__`` importing its own submodules (to re-export them) is no
  cycle with them.
* No function (or method) in ``isometry/`` is longer than 80 lines, and no
  module there is longer than 1,000 lines (a module that grows past it has
  more than one concern: make it a subpackage).
* No module imports by name at run time (``importlib``, ``__import__``) but
  the ones in ``IMPORTLIB_ALLOWED``: the discovery of the studies and of the
  figures, and the probe's loading of a user's factory. Everything else
  imports the project's modules with ``import`` statements, which these
  checks (and readers) can follow; the experiment harness imports no
  experiment (a figure hands it the one it runs).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Source folders and the package each is installed as (see pyproject.toml).
PACKAGES = {
    "isometry": "isometry",
    "experiments": "isometry.experiments",
    "paper_figures": "isometry.paper_figures",
}
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 1000
# Modules that may import by name at run time, and why.
IMPORTLIB_ALLOWED = {
    "isometry.experiments": "discovers the studies by name",
    "isometry.paper_figures.core": "discovers the figures by number",
    "isometry.probe.files": "load_factory imports the user's module, not the project's",
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = [PACKAGES[rel.parts[0]], *rel.parts[1:]]
    parts[-1] = parts[-1].removesuffix(".py")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, tuple[Path, ast.Module]]:
    """``{module name: (path, syntax tree)}`` of every module of the three folders."""
    out = {}
    for folder in PACKAGES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            out[_module_name(path)] = (path, ast.parse(path.read_text(), str(path)))
    return out


SOURCES = _sources()
IS_PACKAGE = {name for name, (path, _) in SOURCES.items() if path.name == "__init__.py"}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _absolute(module: str, node: ast.ImportFrom) -> str:
    """The absolute module name of ``from <node.module> import ...`` inside ``module``."""
    if not node.level:
        return node.module or ""
    package = module if module in IS_PACKAGE else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _may_use(importer: str, owner: str) -> bool:
    """Whether ``importer`` may use a private name of ``owner``: only ``owner`` itself."""
    return importer == owner


def _first_private(dotted: str) -> tuple[str, str] | None:
    """``(owner, name)`` of the first private component of a dotted name, if any."""
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if _private(part) and i > 0:
            return ".".join(parts[:i]), part
    return None


def _module_aliases(tree: ast.Module, module: str) -> dict[str, str]:
    """Local names bound to modules by imports anywhere in ``tree``: ``{alias: module}``."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.partition(".")[0]] = (
                    a.name if a.asname else a.name.partition(".")[0]
                )
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node)
            for a in node.names:
                full = f"{base}.{a.name}"
                if full in SOURCES or not base.startswith("isometry"):
                    aliases[a.asname or a.name] = full
    return aliases


def _dotted(node: ast.AST) -> str | None:
    """``a.b.c`` of an attribute chain on a plain name, else ``None``."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(names)])


def _private_uses(module: str, tree: ast.Module) -> list[str]:
    """Uses of other modules' private names in ``module``, as readable strings."""
    found = []

    def check(dotted: str, line: int) -> None:
        hit = _first_private(dotted)
        if hit and not _may_use(module, hit[0]):
            found.append(f"{module}:{line} uses {hit[0]}.{hit[1]}")

    aliases = _module_aliases(tree, module)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                check(a.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node)
            check(base, node.lineno)
            for a in node.names:
                check(f"{base}.{a.name}", node.lineno)
        elif isinstance(node, ast.Attribute) and not isinstance(node.value, ast.Attribute):
            dotted = _dotted(node)
            head, _, rest = (dotted or "").partition(".")
            if head in aliases and rest:
                check(f"{aliases[head]}.{rest}", node.lineno)
    return sorted(set(found), key=lambda f: int(f.split(":")[1].split()[0]))


def _imports(module: str, tree: ast.Module) -> set[str]:
    """The project modules ``module`` imports (anywhere in it), most specific name first."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in SOURCES else base
                       for a in node.names]  # fmt: skip
        else:
            continue
        out.update(t for t in targets if t in SOURCES and t != module)
    if module in IS_PACKAGE:  # re-exporting its own submodules is no cycle
        out = {t for t in out if not t.startswith(f"{module}.")}
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _long_functions(prefix: str = "isometry.") -> list[str]:
    """Functions over the line limit in the ``isometry`` library modules named ``prefix...``."""
    found = []
    for module, (_, tree) in SOURCES.items():
        if not module.startswith(prefix) or module.startswith(
            ("isometry.experiments", "isometry.paper_figures")
        ):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    found.append(f"{module}.{node.name} ({n} lines)")
    return found


def _long_modules(prefix: str = "isometry") -> list[str]:
    """Modules over the line limit among the ``isometry`` library modules named ``prefix...``."""
    found = []
    for module, (path, _) in SOURCES.items():
        if not module.startswith(prefix) or module.startswith(
            ("isometry.experiments", "isometry.paper_figures")
        ):
            continue
        n = len(path.read_text().splitlines())
        if n > MAX_MODULE_LINES:
            found.append(f"{module} ({n} lines)")
    return found


def _dynamic_imports(module: str, tree: ast.Module) -> list[str]:
    """Where ``module`` imports by name at run time (``importlib`` imported, ``__import__``)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            names = [node.func.id] if node.func.id == "__import__" else []
        else:
            continue
        hits = [n for n in names if n in ("importlib", "__import__") or n.startswith("importlib.")]
        found += [f"{module}:{node.lineno} uses {n}" for n in hits]
    return found


def _all_dynamic_imports() -> list[str]:
    return [
        f
        for m, (_, t) in SOURCES.items()
        if m not in IMPORTLIB_ALLOWED
        for f in _dynamic_imports(m, t)
    ]


def _all_private_uses(prefixes: tuple[str, ...] = ("isometry",)) -> list[str]:
    return [
        f for m, (_, t) in SOURCES.items() if m.startswith(prefixes) for f in _private_uses(m, t)
    ]


def _all_cycles() -> list[list[str]]:
    return _cycles({m: _imports(m, tree) for m, (_, tree) in SOURCES.items()})


def test_sources_found():
    assert {"isometry", "isometry.sweep", "isometry.experiments", "isometry.paper_figures"} <= set(
        SOURCES
    )
    assert "isometry.paper_figures.core" in SOURCES


def test_checks_catch_what_they_should():
    tree = ast.parse("from isometry import atomic\nimport jax._src.x\natomic._jsonable(1)\n")
    found = _private_uses("isometry.sweep.grid", tree)
    assert found == [
        "isometry.sweep.grid:2 uses jax._src",
        "isometry.sweep.grid:3 uses isometry.atomic._jsonable",
    ]
    assert _private_uses("isometry.experiments.clipping", ast.parse(
        "from isometry.experiments import _training\n"
    )) == ["isometry.experiments.clipping:1 uses isometry.experiments._training"]  # fmt: skip
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    tree = ast.parse(
        "import importlib.util\nfrom importlib import import_module\n"
        "def f(name):\n    return __import__(name)\nimport json\n"
    )
    assert _dynamic_imports("isometry.sweep.grid", tree) == [
        "isometry.sweep.grid:1 uses importlib.util",
        "isometry.sweep.grid:2 uses importlib",
        "isometry.sweep.grid:4 uses __import__",
    ]


def test_importlib_allow_list_is_current():
    """Every entry of ``IMPORTLIB_ALLOWED`` is a module that imports by name: an entry that
    outlives its use (harness's, once it imports the studies directly) is deleted, not kept."""
    stale = [
        m for m in IMPORTLIB_ALLOWED if m not in SOURCES or not _dynamic_imports(m, SOURCES[m][1])
    ]
    assert not stale, f"delete these entries of IMPORTLIB_ALLOWED: {stale}"


RULES = {
    "private names used across modules": _all_private_uses,
    "import cycles": lambda: [" <-> ".join(c) for c in _all_cycles()],
    f"functions over {MAX_FUNCTION_LINES} lines": _long_functions,
    f"modules over {MAX_MODULE_LINES} lines": _long_modules,
    "imports by name at run time outside IMPORTLIB_ALLOWED": _all_dynamic_imports,
}


@pytest.mark.parametrize("rule", list(RULES), ids=[r.split()[0] for r in RULES])
def test_whole_tree(rule):
    found = RULES[rule]()
    assert not found, f"{rule}:\n" + "\n".join(found)


def test_the_harness_imports_no_experiment():
    """A figure hands the harness the experiment it runs (no run-time import loop)."""
    harness = _imports("isometry.experiments.harness", SOURCES["isometry.experiments.harness"][1])
    assert not {m for m in harness if m.startswith("isometry.experiments")}, harness
