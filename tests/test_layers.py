"""The house's import contract (pyproject.toml, [tool.importlinter]): the layers point one way and nothing imports
in a circle, annotation-only and in-function imports included. Checked with import-linter, the field's tool, and by
a walk of our own over every import statement (so a circle of two modules of one folder is caught too)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pfedmoap"


def test_import_linter_contracts_are_kept() -> None:
    cli = pytest.importorskip("importlinter.cli", reason="pip install import-linter (the test extra has it)")
    assert cli.lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == cli.EXIT_STATUS_SUCCESS


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every pfedmoap module ``name`` imports, wherever the statement stands (TYPE_CHECKING, a function)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                full = f"{target}.{alias.name}"
                out.add(full if full in modules else target)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return {m for m in out if m in modules and m != name}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_in_a_circle() -> None:
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert _circles(graph) == []
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the walk finds one


def test_no_module_imports_a_layer_above_its_own() -> None:
    """The same rule as the layers contract, read from pyproject.toml and checked by our walk: a module of layer i
    imports no module of a layer above i, nor a neighbour of its own layer (``|``)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    contract = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    layer_of = {}
    for height, layer in enumerate(reversed(contract["layers"])):
        for neighbour in layer.split("|"):
            layer_of["pfedmoap." + neighbour.strip()] = (height, neighbour.strip())
    modules = _modules()

    def where(module: str) -> tuple[int, str] | None:
        for prefix, place in layer_of.items():
            if module == prefix or module.startswith(prefix + "."):
                return place
        return None

    unplaced = sorted(m for m in modules if m != "pfedmoap" and where(m) is None)
    assert unplaced == [], "every module belongs to a layer"
    wrong = []
    for name, path in modules.items():
        own = where(name)
        if own is None:
            continue  # the package's face, pfedmoap/__init__.py, hands names on lazily
        for target in _imports(name, path, modules):
            theirs = where(target)
            if theirs is None or theirs[0] > own[0] or (theirs[0] == own[0] and theirs[1] != own[1]):
                wrong.append(f"{name} -> {target}")
    assert wrong == []


def test_the_public_names_stay_importable() -> None:
    """Every name pfedmoap/__init__.py hands on resolves (they are loaded lazily, so a moved module would only
    show when the name is first used)."""
    import pfedmoap

    assert all(getattr(pfedmoap, name) is not None for name in pfedmoap.__all__)
    assert {"run", "resume", "make_config", "Setting", "register_method", "Federation", "History"} <= set(
        pfedmoap.__all__
    )


def test_the_config_imports_no_plugin_and_no_torch() -> None:
    """A config can be built, read and written without torch or any plug-in (what the issue of settings owned by
    their plug-ins asked of config.py's successor)."""
    code = (
        "import sys\n"
        "import pfedmoap.config, pfedmoap.config.settings\n"
        "cfg = pfedmoap.config.Config.from_dict({'rounds': 3, 'fedprox_mu': 0.5})\n"
        "assert cfg.settings == {'fedprox_mu': 0.5} and cfg.to_dict()['fedprox_mu'] == 0.5\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('pfedmoap.'))\n"
        "assert 'torch' not in sys.modules, 'torch'\n"
        "print(' '.join(loaded))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert set(done.stdout.split()) <= {
        "pfedmoap._lazy", "pfedmoap._version", "pfedmoap.base", "pfedmoap.base.errors", "pfedmoap.base.files",
        "pfedmoap.config", "pfedmoap.config.settings",
    }  # fmt: skip
