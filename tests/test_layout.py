"""The package layout: installed names under he_cnn, imports that point one way, no cycles.

Reads the source with ``ast`` (nothing is imported), maps each file to the name it is installed
under (``servers/s1.py`` -> ``he_cnn.servers.s1``, as ``pyproject.toml``'s package-dir says), and checks
the import graph: no cycle between modules, no cycle between sub-packages, the library never imports
the services or the parties' command-line packages, and the owner's and the user's packages never
import the services. ``docs/architecture.md`` draws this graph; this test is the command that checks it:
``python -m pytest tests/test_layout.py``.
"""
from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: repository folder -> installed package name (pyproject.toml's [tool.setuptools.package-dir])
PACKAGE_DIRS = {"he_cnn": "he_cnn", "servers": "he_cnn.servers", "owner": "he_cnn.owner", "user": "he_cnn.user"}
#: sub-packages that make up the application on top of the library
APPLICATION = {"servers", "owner", "user"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = [PACKAGE_DIRS[rel.parts[0]], *rel.parts[1:]]
    parts[-1] = parts[-1].removesuffix(".py")
    name = ".".join(parts)
    return name.removesuffix(".__init__")


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """The project modules ``path`` imports, anywhere but under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def resolve(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            return
        if isinstance(node, ast.Import):
            found.update(filter(None, (resolve(a.name) for a in node.names)))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            for alias in node.names:
                hit = resolve(f"{base}.{alias.name}") if f"{base}.{alias.name}" in modules else resolve(base)
                if hit:
                    found.add(hit)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(name)
    return {m for m in found if m != name}


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for folder in PACKAGE_DIRS for p in (ROOT / folder).rglob("*.py")}
    return {name: _imports(path, name, set(files)) for name, path in files.items()}


def _room(module: str) -> str:
    """The sub-package a module belongs to; modules directly in he_cnn are the foundation, ``base``."""
    parts = module.split(".")
    if module == "he_cnn.__main__":
        return "main"
    package = len(parts) == 2 and (parts[1] in APPLICATION or (ROOT / "he_cnn" / parts[1] / "__init__.py").is_file())
    return parts[1] if len(parts) > 2 or package else "base"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (a list of nodes), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = walk(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = walk(node)
            if found:
                return found
    return None


def room_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    rooms: dict[str, set[str]] = {}
    for module, deps in graph.items():
        rooms.setdefault(_room(module), set()).update(_room(d) for d in deps if _room(d) != _room(module))
    return rooms


def test_no_import_cycle_between_modules():
    assert _cycle(import_graph()) is None


def test_no_import_cycle_between_sub_packages():
    rooms = room_graph(import_graph())
    assert _cycle(rooms) is None, rooms
    assert {"base", "crypto", "graph", "parties", "protocols", "training", "transport"} <= set(rooms)


#: the levels of docs/architecture.md's picture, lowest first: a package imports only lower levels
LEVELS = [{"base"}, {"crypto"}, {"transport"}, {"protocols"}, {"graph"}, {"training", "parties", "compiler"}, {"owner", "user"},
          {"servers"}, {"main"}]


def test_packages_import_only_lower_levels():
    level = {room: i for i, rooms in enumerate(LEVELS) for room in rooms}
    rooms = room_graph(import_graph())
    assert set(rooms) == set(level), "a new package needs its level here and in docs/architecture.md"
    for room, deps in rooms.items():
        upward = {d for d in deps if level[d] >= level[room]}
        assert not upward, f"{room} imports {upward}, which are not below it"


def test_imports_point_one_way():
    rooms = room_graph(import_graph())
    library = set(rooms) - APPLICATION - {"main"}
    for room in library:
        assert not rooms[room] & APPLICATION, f"he_cnn.{room} imports the application: {rooms[room] & APPLICATION}"
    assert "servers" not in rooms["owner"] | rooms["user"], "owner/user import the services"
    assert rooms["base"] == set(), f"the foundation modules import {rooms['base']}"


def test_every_package_is_installed():
    """Every folder with an __init__.py is listed in pyproject.toml's packages (a new room must be)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {installed: folder for folder, installed in PACKAGE_DIRS.items()}
    found = {_module_name(p) for folder in PACKAGE_DIRS for p in (ROOT / folder).rglob("__init__.py")}
    assert found == set(config["packages"])


@pytest.mark.parametrize("name", ["servers", "owner", "user"])
def test_no_generic_top_level_name_is_installed(name):
    """Imported from outside the repository, the generic names do not exist."""
    import importlib.util
    import subprocess
    import sys

    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({name!r}) is not None)"
    done = subprocess.run([sys.executable, "-P", "-c", code], cwd=ROOT.parent, capture_output=True)
    assert done.returncode == 0, f"{name!r} is importable as a top-level package"
    assert importlib.util.find_spec(f"he_cnn.{name}") is not None
