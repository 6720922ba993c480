"""The layout's dependency rule (DESIGN.md "Folder layout"), read from the source with `ast`:

    web -> engine, storage (and finetune);  storage -> settings;  engine -> settings;  finetune -> engine, settings

(`EXCEPTIONS` names the edges kept against it, each with why)

and no import cycle anywhere in babl_core/ or finetune/. Every import counts, also one inside a
function (a lazy import still ties the two modules together), except those under
`if TYPE_CHECKING:`, which never run. The engine (and finetune) import no chainlit, fastapi, starlette
or sqlalchemy. The checker is tested on a small tree of its own, so it is known to fail when it should.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

PACKAGES = ("babl_core", "finetune")
# What each part may import (besides itself); babl_core's __main__, demo and __init__ are the top: the
# CLI may reach anything.
ALLOWED = {
    "settings": set(),
    "engine": {"settings"},
    "storage": {"settings"},
    "web": {"engine", "storage", "settings", "finetune"},  # training from the chat runs finetune's CLI
    "finetune": {"engine", "settings"},
    "top": {"engine", "storage", "web", "settings", "finetune"},
}
# Edges the rule would refuse, each with why it is kept.
EXCEPTIONS = {
    ("finetune.evaluation", "babl_core.web.render"): "html answers are scored on the document the chat "
    "previews (`extract_html`, plain text functions that import no web framework)",
}
FORBIDDEN_LIBRARIES = {
    "engine": {"chainlit", "fastapi", "starlette", "sqlalchemy"},
    "finetune": {"chainlit", "fastapi", "starlette", "sqlalchemy"},
}


def modules(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the packages (a package is its __init__)."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imported_names(path: Path, module: str, is_package: bool) -> list[tuple[str, list[str]]]:
    """Every import of the file as (module, names): `import a.b` gives ("a.b", []), `from a import b, c`
    ("a", ["b", "c"]); relative ones resolved, those under `if TYPE_CHECKING:` left out."""
    found: list[tuple[str, list[str]]] = []

    def visit(node: ast.AST) -> None:
        if _type_checking_only(node):
            for other in node.orelse:
                visit(other)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((base, [alias.name for alias in node.names]))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return found


def import_graph(root: Path, packages=PACKAGES) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> the project modules it imports, module -> the top-level libraries it imports).

    `from a.b import c` is an edge to a.b.c when that is a module, else to a.b (the longest prefix
    that is one); the package __init__ files Python runs on the way hold docstrings only.
    """
    known = modules(root, packages)

    def resolve(name: str) -> str | None:
        parts = name.split(".")
        while parts and ".".join(parts) not in known:
            parts.pop()
        return ".".join(parts) or None

    graph: dict[str, set[str]] = {}
    libraries: dict[str, set[str]] = {}
    for module, path in known.items():
        edges, libs = set(), set()
        for base, names in imported_names(path, module, path.name == "__init__.py"):
            if base.split(".")[0] not in packages:
                libs.add(base.split(".")[0])
                continue
            targets = [f"{base}.{n}" if f"{base}.{n}" in known else base for n in names] or [base]
            edges.update(t for t in map(resolve, targets) if t and t != module)
        graph[module], libraries[module] = edges, libs
    return graph, libraries


def part_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "finetune":
        return "finetune"
    if len(parts) > 1 and parts[1] in ("engine", "storage", "web", "settings"):
        return parts[1]
    return "top"


def forbidden_edges(graph: dict[str, set[str]], libraries: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, targets in sorted(graph.items()):
        mine = part_of(module)
        for target in sorted(targets):
            theirs = part_of(target)
            if theirs != mine and theirs not in ALLOWED[mine] and (module, target) not in EXCEPTIONS:
                problems.append(f"{module} ({mine}) imports {target} ({theirs})")
        for library in sorted(libraries[module] & FORBIDDEN_LIBRARIES.get(mine, set())):
            problems.append(f"{module} ({mine}) imports {library}")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:  # recursion depth = longest import chain: a few dozen at most
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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
            connect(node)
    return sorted(found)


# --------------------------------------------------------------------------------------------------
# The project


def test_every_import_follows_the_layout_rule():
    graph, libraries = import_graph(REPO_ROOT)
    assert forbidden_edges(graph, libraries) == []


def test_the_exceptions_are_still_needed():
    graph, _ = import_graph(REPO_ROOT)
    assert [edge for edge in EXCEPTIONS if edge[1] not in graph.get(edge[0], set())] == []


def test_no_import_cycles():
    graph, _ = import_graph(REPO_ROOT)
    assert cycles(graph) == []


def test_the_walk_sees_the_layout():
    """The walk finds the three parts and their edges (an empty graph would pass the two tests above)."""
    graph, libraries = import_graph(REPO_ROOT)
    assert {part_of(m) for m in graph} == {"top", "settings", "engine", "storage", "web", "finetune"}
    assert "babl_core.engine.service" in graph["babl_core.web.ui"]
    assert "babl_core.storage.conversations" in graph["babl_core.web.ui"]
    assert "sqlalchemy" in libraries["babl_core.storage.schema"]
    assert "finetune.recipes" in graph


# --------------------------------------------------------------------------------------------------
# The checker on a tree of its own


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return root


@pytest.fixture
def small_tree(tmp_path) -> Path:
    return _tree(
        tmp_path,
        {
            "babl_core/__init__.py": "",
            "babl_core/settings.py": "",
            "babl_core/engine/__init__.py": "",
            "babl_core/engine/a.py": "from babl_core.engine import b\n",
            "babl_core/engine/b.py": "def f():\n    from babl_core.engine.a import x  # a lazy import still counts\n",
            "babl_core/engine/c.py": "from babl_core.web import ui\nimport chainlit\n",
            "babl_core/engine/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from babl_core.web import ui\nelse:\n    from . import c\n",
            "babl_core/web/__init__.py": "",
            "babl_core/web/ui.py": "from babl_core.engine import c\nfrom babl_core.storage.files import F\n",
            "babl_core/storage/__init__.py": "",
            "babl_core/storage/files.py": "from ..settings import X\n",
            "finetune/__init__.py": "",
            "finetune/m.py": "from babl_core.storage import files\n",
        },
    )


def test_the_checker_finds_cycles_lazy_imports_included(small_tree):
    graph, _ = import_graph(small_tree)
    assert graph["babl_core.engine.d"] == {"babl_core.engine.c"}  # TYPE_CHECKING left out, relative resolved
    assert graph["babl_core.storage.files"] == {"babl_core.settings"}
    assert cycles(graph) == [
        ["babl_core.engine.a", "babl_core.engine.b"],
        ["babl_core.engine.c", "babl_core.web.ui"],
    ]


def test_the_checker_finds_forbidden_edges_and_libraries(small_tree):
    graph, libraries = import_graph(small_tree)
    assert forbidden_edges(graph, libraries) == [
        "babl_core.engine.c (engine) imports babl_core.web.ui (web)",
        "babl_core.engine.c (engine) imports chainlit",
        "finetune.m (finetune) imports babl_core.storage.files (storage)",
    ]


def test_the_build_finds_every_package_of_the_layout():
    """pyproject.toml lets setuptools find the packages: engine/, web/, web/api/, storage/ and
    finetune/recipes/ are in the wheel without being listed one by one."""
    import tomllib

    from setuptools import find_packages

    found = (REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8")
    rule = tomllib.loads(found)["tool"]["setuptools"]["packages"]["find"]
    packages = set(find_packages(str(REPO_ROOT), include=rule["include"]))
    on_disk = {
        ".".join(init.parent.relative_to(REPO_ROOT).parts)
        for package in PACKAGES
        for init in (REPO_ROOT / package).rglob("__init__.py")
    }
    assert packages == on_disk
    assert {"babl_core.engine", "babl_core.web.api", "babl_core.storage", "finetune.recipes"} <= packages
