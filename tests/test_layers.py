"""The import layers of `har`, read from its source with `ast`: no import cycle between modules or between packages,
no import deferred into a function to dodge one, and the ground (errors, facts, config) importing nothing above it."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "har"
# The ground: what every other module may stand on; each imports at most the modules listed with it.
GROUND = {"har.errors": set(), "har.facts": set(), "har.config": {"har.errors", "har.facts"}}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _owner(name: str) -> str | None:
    """The module of `har` that importing `name` (a module, or a name in one) loads."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".")[: -node.level] if MODULES[module].name != "__init__.py" else \
                module.split(".")[: len(module.split(".")) - node.level + 1]
            base = ".".join(package + ([base] if base else []))
        names = [f"{base}.{a.name}" for a in node.names]
    found = {_owner(n) for n in names if n == "har" or n.startswith("har.")}
    return {t for t in found if t and t != module}


def _imports() -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """Each module's imports at load time (with the packages whose __init__ they run) and the deferred ones."""
    top: dict[str, set[str]] = {m: set() for m in MODULES}
    deferred = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        inside = {id(n) for f in functions for n in ast.walk(f)}
        typing_only = {id(n) for b in ast.walk(tree) if isinstance(b, ast.If) and "TYPE_CHECKING" in ast.unparse(b.test)
                       for n in ast.walk(b)}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in typing_only:
                continue
            for target in _targets(module, node):
                if id(node) in inside:
                    deferred.append((module, target, node.lineno))
                else:
                    top[module].add(target)
    for module, targets in top.items():  # importing a.b.c runs a/__init__ and a/b/__init__ first
        for target in list(targets):
            parts = target.split(".")
            for i in range(2, len(parts)):
                package = ".".join(parts[:i])
                if package in MODULES and not module.startswith(package + ".") and package != module:
                    targets.add(package)
    return top, deferred


TOP, DEFERRED = _imports()


def _package(module: str) -> str:
    """The package of `har` that holds `module` (`har.run.assembly` -> `har.run`); a top-level module is its own."""
    return ".".join(module.split(".")[:2])


def _package_imports() -> dict[tuple[str, str], set[str]]:
    """For each package importing another at load time, the module imports that make it do so (a package's
    __init__ only where nothing inside it is imported)."""
    found: dict[tuple[str, str], set[str]] = defaultdict(set)
    for module, targets in TOP.items():
        for target in targets:
            inside = any(other.startswith(target + ".") for other in targets)
            if _package(module) != _package(target) and not inside:
                found[_package(module), _package(target)].add(f"{module} -> {target}")
    return found


PACKAGE_IMPORTS = _package_imports()
PACKAGES = {a: {b for importer, b in PACKAGE_IMPORTS if importer == a} for a, _ in PACKAGE_IMPORTS}


def _reaches(start: str, goal: str, graph: dict[str, set[str]] = TOP) -> bool:
    seen, todo = {start}, [start]
    while todo:
        here = todo.pop()
        if here == goal:
            return True
        for nxt in graph.get(here, set()) - seen:
            seen.add(nxt)
            todo.append(nxt)
    return False


def test_no_import_cycle():
    cycles = sorted({tuple(sorted((m, t))) for m, targets in TOP.items() for t in targets if _reaches(t, m)})
    assert not cycles, f"import cycles through: {cycles}"


def test_no_package_import_cycle():
    """Each package imports only packages below it (../DESIGN.md, "package map"): a package that another imports,
    directly or through others, does not import it back, even where no single module closes the circle."""
    cycles = sorted(f"{a} -> {b} ({', '.join(sorted(PACKAGE_IMPORTS[a, b]))})"
                    for a, b in PACKAGE_IMPORTS if _reaches(b, a, PACKAGES))
    assert not cycles, "package import cycles, each package import on one with the module imports behind it:\n" + \
        "\n".join(cycles)


def test_no_deferred_import_dodges_a_cycle():
    dodges = [f"{m}:{line} imports {t}" for m, t, line in DEFERRED if _reaches(t, m)]
    assert not dodges, f"imports deferred into a function to dodge a cycle: {dodges}"


def test_deferred_imports_say_why():
    """A module that defers imports into functions says why (start-up cost of heavy libraries) in its docstring."""
    silent = sorted({m for m, _, _ in DEFERRED if "start-up" not in (ast.get_docstring(ast.parse(
        MODULES[m].read_text(encoding="utf-8"))) or "")})
    assert not silent, f"modules deferring imports without saying why: {silent}"


def test_ground_imports_nothing_above_it():
    for module, allowed in GROUND.items():
        assert TOP[module] <= allowed, f"{module} imports {sorted(TOP[module] - allowed)}"
        assert not [t for m, t, _ in DEFERRED if m == module], f"{module} defers imports"
