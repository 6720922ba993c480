"""`python -m finetune data stdlib-instruct`: a code-instruction set mined from the Python standard library.

No registry ships python_code_instructions_18k_alpaca (or any code-instruction set) to a machine without
the Hugging Face hub, but every machine that runs Babl has real, human-written Python: the standard
library of the interpreter itself. This builder turns its short documented functions into rows in that
set's columns:

- `instruction`: the docstring's first paragraph (what the function does, in its authors' words);
- `input`: the function's signature (its `def` line or lines, decorators included), so the task is
  well posed: the name and the parameters to use;
- `output`: the function's source without its docstring (comments kept), dedented.

Extra columns say where each row came from: `module` (dotted name), `package` (its top-level package
or module), `name` (qualified name) and `lines`.

The split is by top-level package: `email.utils` and `email.parser` fall on the same side, so held-out
functions come from packages (and so modules) training never saw. A package's side is decided by a hash
of its name, not by the order or number of packages, so it does not move when a Python release adds or
removes modules. Functions whose code (without docstring) appears twice are kept once, and a held-out
row is dropped when its code is also among the training rows.

The rows are deterministic for a given Python version: files are read in sorted order and nothing
depends on time, randomness or the file system's listing order. The licence is the Python Software
Foundation License (the interpreter's own LICENSE file is named in the manifest).
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import platform
import re
import sys
import sysconfig
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("finetune")

NAME = "stdlib-instruct"
DEFAULT_OUTPUT = f"models/datasets/{NAME}"
TRAIN_FILE, EVAL_FILE, MANIFEST_FILE = "train.jsonl", "eval.jsonl", "manifest.json"
LICENCE = "PSF-2.0 (Python Software Foundation License Version 2)"
DEFAULT_MAX_LINES = 25
DEFAULT_EVAL_PERCENT = 10.0
# Not library code: tests (some in Python 2 syntax), IDLE's and turtledemo's demos, bundled third-party
# packages, build configuration, and modules that only print or open something when imported.
SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib-dynload"}
SKIPPED_TOP = {"antigravity", "this", "__hello__", "__phello__", "turtledemo", "ensurepip", "venv"}
MIN_INSTRUCTION_CHARS = 20
MAX_INSTRUCTION_CHARS = 400
# Docstrings that restate a C signature ("f(x, y) -> int") or only point elsewhere teach no task.
_SIGNATURE_DOC = re.compile(r"^[\w.]+\(.*\)\s*(->.*)?$")


@dataclass
class BuildResult:
    """What `build` wrote, and the facts the manifest records."""

    output_dir: Path
    train_rows: int
    eval_rows: int
    train_packages: list[str]
    eval_packages: list[str]
    skipped: dict[str, int] = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)


def stdlib_dir() -> Path:
    """The running interpreter's standard library (e.g. /usr/lib/python3.11)."""
    return Path(sysconfig.get_paths()["stdlib"])


def module_files(root: Path) -> list[tuple[str, Path]]:
    """(dotted module name, file) for every library module under `root`, sorted by name."""
    found = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        parts = relative.parts
        if any(part in SKIPPED_DIRS or part.startswith("config-") for part in parts[:-1]):
            continue
        stem = relative.with_suffix("").parts
        if stem[-1] == "__init__":
            stem = stem[:-1]
        if not stem or stem[0] in SKIPPED_TOP or stem[0].startswith("_sysconfigdata"):
            continue
        if "-" in "".join(stem):  # not importable as a module name (scripts, data)
            continue
        found.append((".".join(stem), path))
    return sorted(found)


def is_eval_package(package: str, eval_percent: float) -> bool:
    """Whether `package` is held out: a stable hash of its name, independent of every other package."""
    digest = hashlib.sha256(f"{NAME}:{package}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10_000 < eval_percent * 100


def _instruction(docstring: str) -> str | None:
    """The docstring's first paragraph on one line, or None when it does not describe a task."""
    paragraph = docstring.strip().split("\n\n", 1)[0]
    text = " ".join(line.strip() for line in paragraph.splitlines()).strip()
    if len(text) < MIN_INSTRUCTION_CHARS or len(text) > MAX_INSTRUCTION_CHARS:
        return None
    if text.startswith((">>>", "..")) or _SIGNATURE_DOC.match(text) or not any(c.isalpha() for c in text):
        return None
    return text


def _functions(tree: ast.Module):
    """(qualified name, node) for module-level functions and the methods of module-level classes."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield f"{node.name}.{item.name}", item


def rows_of_module(module: str, source: str, *, max_lines: int, skipped: dict[str, int]) -> list[dict]:
    """The rows of one module's source (see the module docstring); `skipped` counts what was left out."""

    def skip(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        skip("module does not parse")
        return []
    lines = source.splitlines()
    rows = []
    for name, node in _functions(tree):
        docstring = ast.get_docstring(node, clean=True)
        if not docstring:
            skip("no docstring")
            continue
        instruction = _instruction(docstring)
        if instruction is None:
            skip("docstring describes no task")
            continue
        doc_node = node.body[0]
        if len(node.body) == 1:
            skip("docstring only")
            continue
        first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
        # The docstring must stand on lines of its own, between the header and the body.
        if doc_node.lineno <= node.lineno or node.body[1].lineno <= doc_node.end_lineno:
            skip("docstring shares a line with code")
            continue
        header = lines[first - 1 : doc_node.lineno - 1]
        body = lines[doc_node.end_lineno : node.end_lineno]
        code = textwrap.dedent("\n".join(header + body)).strip("\n")
        if len(code.splitlines()) > max_lines:
            skip(f"longer than {max_lines} lines")
            continue
        signature = textwrap.dedent("\n".join(header)).strip("\n")
        if not signature.rstrip().endswith(":"):
            skip("header has trailing code")
            continue
        rows.append(
            {
                "instruction": instruction,
                "input": signature,
                "output": code + "\n",
                "module": module,
                "package": module.split(".", 1)[0],
                "name": name,
                "lines": len(code.splitlines()),
            }
        )
    return rows


def build(
    output_dir: Path, *, root: Path | None = None, eval_percent: float = DEFAULT_EVAL_PERCENT,
    max_lines: int = DEFAULT_MAX_LINES,
) -> BuildResult:  # fmt: skip
    """Mine the standard library under `root` (default: this interpreter's) into train/eval JSONL files.

    Args:
        output_dir: where `train.jsonl`, `eval.jsonl` and `manifest.json` go (created; each file replaced
            whole, the manifest last).
        root: the library to read (tests pass a small tree).
        eval_percent: the share of top-level packages held out, by a hash of their names.
        max_lines: the longest function kept, counted without its docstring.
    """
    from babl_core import settings
    from finetune.files import write_text_atomic

    root = root or stdlib_dir()
    skipped: dict[str, int] = {}
    seen: set[str] = set()
    sides: dict[str, list[dict]] = {"train": [], "eval": []}
    modules = module_files(root)
    # Training rows first, so a held-out duplicate of a training function is the one dropped.
    for side in ("train", "eval"):
        for module, path in modules:
            held_out = is_eval_package(module.split(".", 1)[0], eval_percent)
            if held_out != (side == "eval"):
                continue
            try:
                source = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                skipped["file not readable as UTF-8"] = skipped.get("file not readable as UTF-8", 0) + 1
                continue
            for row in rows_of_module(module, source, max_lines=max_lines, skipped=skipped):
                if row["output"] in seen:
                    skipped["same code as an earlier row"] = skipped.get("same code as an earlier row", 0) + 1
                    continue
                seen.add(row["output"])
                sides[side].append(row)

    output_dir.mkdir(parents=True, exist_ok=True)
    for side, file_name in (("train", TRAIN_FILE), ("eval", EVAL_FILE)):
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in sides[side])
        write_text_atomic(output_dir / file_name, text)
    packages = {side: sorted({row["package"] for row in rows}) for side, rows in sides.items()}
    licence_file = root / "LICENSE.txt"
    manifest = {
        "name": NAME,
        "description": "Documented functions of the Python standard library as code instructions, in the "
        "columns of python_code_instructions_18k_alpaca (instruction, input, output)",
        "licence": LICENCE,
        "licence_file": str(licence_file) if licence_file.is_file() else None,
        "source": str(root),
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "rows": {"train": len(sides["train"]), "eval": len(sides["eval"])},
        "split": {
            "by": "top-level package (hash of its name)",
            "eval_percent": eval_percent,
            "train_packages": packages["train"],
            "eval_packages": packages["eval"],
        },
        "max_lines": max_lines,
        "skipped": dict(sorted(skipped.items())),
        "files": {
            file_name: hashlib.sha256((output_dir / file_name).read_bytes()).hexdigest()
            for file_name in (TRAIN_FILE, EVAL_FILE)
        },
    }
    write_text_atomic(
        output_dir / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n"
    )  # last: it hashes the others
    log.info("wrote %s", settings.portable_path(output_dir))
    return BuildResult(
        output_dir, len(sides["train"]), len(sides["eval"]), packages["train"], packages["eval"], skipped,
        manifest,
    )  # fmt: skip


def describe(result: BuildResult) -> str:
    """What the CLI prints: counts, the split, the licence and where the files are."""
    from babl_core import settings

    where = settings.portable_path(result.output_dir)
    m = result.manifest
    held_out = ", ".join(result.eval_packages)
    return "\n".join(
        [
            f"{NAME}: {result.train_rows + result.eval_rows} functions from the Python {m['python']} "
            f"standard library ({m['source']})",
            f"  train: {result.train_rows} rows from {len(result.train_packages)} packages -> {where}/{TRAIN_FILE}",
            f"  eval:  {result.eval_rows} rows from {len(result.eval_packages)} packages never trained on "
            f"-> {where}/{EVAL_FILE}",
            f"  held-out packages: {held_out}",
            f"  split by top-level package ({m['split']['eval_percent']:g}% of packages, by a hash of the name)",
            f"  left out: {', '.join(f'{n} ({r})' for r, n in m['skipped'].items()) or 'nothing'}",
            f"  licence: {m['licence']}" + (f", see {m['licence_file']}" if m["licence_file"] else ""),
            f"  manifest: {where}/{MANIFEST_FILE}",
        ]
    )
