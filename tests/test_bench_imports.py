"""Every benchmark script under bench/ imports, and every Babl name it imports (also inside its
functions, where most of them are: heavy imports wait for the run) exists, so a module moved in
babl_core or finetune cannot leave a benchmark naming the old place. Nothing is run."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys

import pytest

from tests.conftest import REPO_ROOT

BENCH = REPO_ROOT / "bench"
SCRIPTS = sorted(BENCH.glob("*.py"))


def babl_imports(path) -> list[tuple[str, str | None]]:
    """(module, name or None) for each import of babl_core or finetune in the file, anywhere in it."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found += [(node.module, alias.name) for alias in node.names]
    return [(module, name) for module, name in found if module.split(".")[0] in ("babl_core", "finetune")]


def test_there_are_benchmarks_and_they_name_babl_modules():
    assert len(SCRIPTS) >= 5
    assert sum(len(babl_imports(script)) for script in SCRIPTS) >= 10


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_the_script_imports_and_every_babl_name_it_imports_exists(script, monkeypatch):
    # The scripts import each other by bare name (they run as `python bench/x.py`); bench/ goes last on
    # the path so that bench/finetune.py does not hide the finetune package.
    monkeypatch.setattr(sys, "path", [*sys.path, str(BENCH)])
    spec = importlib.util.spec_from_file_location(f"bench_script_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # module level only: `if __name__ == "__main__"` does not run
    missing = []
    for module_name, name in babl_imports(script):
        imported = importlib.import_module(module_name)
        if name is not None and not hasattr(imported, name):
            try:
                importlib.import_module(f"{module_name}.{name}")
            except ModuleNotFoundError:
                missing.append(f"{module_name}.{name}")
    assert missing == []
