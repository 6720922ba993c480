"""`python -m finetune data stdlib-instruct`: rows mined from a library tree, split by package, and the
recipe's held-out rows read from their own file (`eval_dataset`)."""

from __future__ import annotations

import ast
import hashlib
import json
import textwrap
from pathlib import Path

import pytest

from finetune import stdlib_instruct
from finetune.__main__ import EXIT_OK, EXIT_USAGE, main

MODULE = '''
"""A module."""


def add_all(values, start=0):
    """Return the sum of the values plus start.

    Longer notes that are not part of the instruction.
    """
    # a comment that stays
    total = start
    for value in values:
        total += value
    return total


def undocumented(x):
    return x


def tiny(x):
    """Too short."""
    return x


def only_doc():
    """This function has a docstring and nothing else at all."""


class Box:
    @property
    def size(self):
        """Return how many items the box holds right now."""
        return len(self.items)
'''


def side_names(eval_percent: float) -> tuple[str, str]:
    """A package name that the hash puts in training and one it holds out (found, not assumed)."""
    names = [f"pkg{i}" for i in range(200)]
    train = next(n for n in names if not stdlib_instruct.is_eval_package(n, eval_percent))
    held = next(n for n in names if stdlib_instruct.is_eval_package(n, eval_percent))
    return train, held


@pytest.fixture
def library(tmp_path) -> tuple[Path, str, str]:
    train, held = side_names(50)
    root = tmp_path / "lib"
    (root / held).mkdir(parents=True)
    (root / f"{train}.py").write_text(MODULE, encoding="utf-8")
    (root / held / "__init__.py").write_text("", encoding="utf-8")
    (root / held / "inner.py").write_text(MODULE.replace("add_all", "add_every"), encoding="utf-8")
    # The same function as in training, under another package: kept once, on the training side.
    (root / held / "copy.py").write_text(MODULE, encoding="utf-8")
    (root / "test").mkdir()
    (root / "test" / "test_all.py").write_text(MODULE.replace("add_all", "test_add"), encoding="utf-8")
    return root, train, held


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_rows_are_documented_functions_without_their_docstrings(library, tmp_path):
    root, train, held = library
    result = stdlib_instruct.build(tmp_path / "out", root=root, eval_percent=50)
    rows = read_rows(tmp_path / "out" / "train.jsonl")
    assert [row["name"] for row in rows] == ["add_all", "Box.size"]
    first = rows[0]
    assert first["instruction"] == "Return the sum of the values plus start."
    assert first["input"] == "def add_all(values, start=0):"
    assert first["output"] == textwrap.dedent(
        """\
        def add_all(values, start=0):
            # a comment that stays
            total = start
            for value in values:
                total += value
            return total
        """
    )
    assert (first["module"], first["package"], first["lines"]) == (train, train, 6)
    # A method keeps its decorator and loses its indentation.
    assert rows[1]["output"] == "@property\ndef size(self):\n    return len(self.items)\n"
    assert rows[1]["input"] == "@property\ndef size(self):"

    held_rows = read_rows(tmp_path / "out" / "eval.jsonl")
    # Functions repeating training's code (copy.py, and Box.size in inner.py) are dropped from the
    # held-out side; the tests directory is not read.
    assert [(r["module"], r["name"]) for r in held_rows] == [(f"{held}.inner", "add_every")]
    assert (result.train_rows, result.eval_rows) == (2, 1)
    assert result.skipped == {
        "no docstring": 3,
        "docstring describes no task": 3,
        "docstring only": 3,
        "same code as an earlier row": 3,
    }
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["rows"] == {"train": 2, "eval": 1}
    assert manifest["split"]["train_packages"] == [train] and manifest["split"]["eval_packages"] == [held]
    assert manifest["licence"].startswith("PSF")
    digest = hashlib.sha256((tmp_path / "out" / "eval.jsonl").read_bytes()).hexdigest()
    assert manifest["files"]["eval.jsonl"] == digest


def test_long_functions_are_left_out(library, tmp_path):
    root, _train, _held = library
    result = stdlib_instruct.build(tmp_path / "out", root=root, eval_percent=50, max_lines=3)
    assert result.train_rows == 1 and result.skipped["longer than 3 lines"] == 3  # add_all/add_every


def test_the_cli_prints_counts_split_and_licence(library, tmp_path, capsys, monkeypatch):
    root, _train, held = library
    monkeypatch.setattr(stdlib_instruct, "stdlib_dir", lambda: root)
    out = tmp_path / "cli"
    assert main(["data", "stdlib-instruct", "--output", str(out), "--eval-percent", "50"]) == EXIT_OK
    printed = capsys.readouterr().out
    assert (
        "train: 2 rows from 1 packages" in printed
        and "eval:  1 rows from 1 packages never trained on" in printed
    )
    assert f"held-out packages: {held}" in printed and "licence: PSF" in printed
    assert main(["data", "stdlib-instruct", "--eval-percent", "100"]) == EXIT_USAGE
    assert "must be above 0 and below 100" in capsys.readouterr().err


def test_recipes_read_held_out_rows_from_their_own_file(library, tmp_path, models_dir):
    """`eval_dataset`: nothing is cut from the training file; both files are sampled with the seed."""
    from finetune.config import ConfigError, load_config
    from finetune.data import load_split

    root, _train, _held = library
    out = models_dir / "datasets" / "stdlib-instruct"
    stdlib_instruct.build(out, root=root, eval_percent=50)
    config_file = tmp_path / "run.yaml"
    config_file.write_text(
        "run_name: from-files\ntask: python\nprompt_style: alpaca-code\nbase: models/demo/demo-python\n"
        "dataset: models/datasets/stdlib-instruct/train.jsonl\n"
        "eval_dataset: models/datasets/stdlib-instruct/eval.jsonl\n",
        encoding="utf-8",
    )
    split = load_split(load_config(config_file))
    assert sorted(split.train["name"]) == ["Box.size", "add_all"] and split.eval["name"] == ["add_every"]
    assert split.total_rows == 3

    # A missing file names the command that writes it.
    (out / "eval.jsonl").unlink()
    with pytest.raises(ConfigError, match="python -m finetune data stdlib-instruct"):
        load_config(config_file)


@pytest.mark.slow
def test_the_standard_library_split_has_no_module_on_both_sides(tmp_path):
    """The real build: thousands of rows, deterministic, and no module (or package) on both sides."""
    first = stdlib_instruct.build(tmp_path / "a")
    second = stdlib_instruct.build(tmp_path / "b")
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    train, held = read_rows(tmp_path / "a" / "train.jsonl"), read_rows(tmp_path / "a" / "eval.jsonl")
    assert (
        (len(train), len(held))
        == (first.train_rows, first.eval_rows)
        == (second.train_rows, second.eval_rows)
    )
    assert len(train) > 2000 and len(held) > 100
    assert not {r["module"] for r in train} & {r["module"] for r in held}
    assert not {r["package"] for r in train} & {r["package"] for r in held}
    assert not {r["output"] for r in train} & {r["output"] for r in held}
    for row in train[::50] + held[::20]:
        tree = ast.parse(row["output"])  # the code still parses once the docstring is gone
        function = tree.body[0]
        assert ast.get_docstring(function) is None and row["lines"] <= stdlib_instruct.DEFAULT_MAX_LINES
        assert row["output"].startswith(row["input"])
