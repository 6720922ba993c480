"""Words users read: no builder jargon in what the chat, the CLI, the API and the README show, and
counts with the right plural.

The denylist holds what the builders call things and users do not know: the seed projects' numbers
("seed 003"), prompt-style ids used as names ("t5-qa" for the Q&A model) and JSON paths
("metrics.eval.split"). A prompt-style id stays allowed as a bare value in code (`name = "t5-qa"`) and
as the value of the `prompt_style` setting a user writes.
"""

from __future__ import annotations

import argparse
import ast
import re

import pytest

from babl_core.engine.catalog import PROMPT_STYLES
from babl_core.engine.words import count
from tests.conftest import REPO_ROOT

DENYLIST = re.compile(
    r"\bseeds? ?0\d\d\b|\bseed-0\d\d\b|\b(?:t5-qa|t5-email|t5-code)\b|metrics\.eval\b", re.IGNORECASE
)
# Where strings shown to users are written: the chat (app.py, the presenter, the service and prompt
# errors), the API's messages, and the CLIs with the finetune outputs they print or write.
SHOWN_FROM = [
    "app.py",
    "babl_core/__main__.py",
    "babl_core/web/api/errors.py",
    "babl_core/web/api/protocol.py",
    "babl_core/web/api/routes.py",
    "babl_core/web/api/serving.py",
    "babl_core/engine/catalog.py",
    "babl_core/engine/service.py",
    "babl_core/web/ui.py",
    "babl_core/engine/prompts.py",
    "babl_core/web/render.py",
    "finetune/__main__.py",
    "finetune/config.py",
    "finetune/data.py",
    "finetune/evaluation.py",
    "finetune/experiment.py",
    "finetune/launch.py",
    "finetune/merge.py",
    "finetune/model_card.py",
    "finetune/outputs.py",
    "finetune/prediction.py",
]
USER_DOCS = ["README.md", "chainlit.md", "rest-api.http"]


def jargon(text: str) -> list[str]:
    return [match.group(0) for match in DENYLIST.finditer(text)]


def shown_strings(path) -> list[tuple[int, str]]:
    """Every string constant in a module except docstrings and bare prompt-style ids (code, not words)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        and id(node) not in docstrings and node.value not in PROMPT_STYLES
    ]  # fmt: skip


def test_the_denylist_catches_builder_words():
    for text in (
        "Seed 003's endpoint",
        "seed-004 clients",
        "t5-qa needs a question",
        "babl.json metrics.eval.split",
    ):
        assert jargon(text), text
    for text in (
        "seed: 42",
        "the same seed gives the same text",
        "prompt_style",
        "the Q&A model",
        "--eval_seed",
    ):
        assert not jargon(text), text


@pytest.mark.parametrize("module", SHOWN_FROM)
def test_no_builder_jargon_in_strings_the_chat_the_api_and_the_clis_show(module):
    found = [f"{module}:{line}: {text!r}" for line, text in shown_strings(REPO_ROOT / module) if jargon(text)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("name", USER_DOCS)
def test_no_builder_jargon_in_what_users_read_first(name):
    lines = (REPO_ROOT / name).read_text(encoding="utf-8").splitlines()
    found = [f"{name}:{number}: {line}" for number, line in enumerate(lines, 1) if jargon(line)]
    assert not found, "\n".join(found)


def every_help(parser: argparse.ArgumentParser) -> list[str]:
    texts = [parser.format_help()]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                texts += every_help(sub)
    return texts


def test_no_builder_jargon_in_any_help_or_the_model_list(capsys):
    from babl_core.__main__ import build_parser as babl_parser
    from babl_core.__main__ import main as babl_main
    from finetune.__main__ import build_parser as finetune_parser

    texts = every_help(babl_parser()) + every_help(finetune_parser())
    assert len(texts) >= 12  # both CLIs and every subcommand
    assert babl_main(["models", "--wide"]) == 0
    texts.append(capsys.readouterr().out)
    found = [word for text in texts for word in jargon(text)]
    assert not found, found


def test_chat_errors_for_an_empty_message_name_the_model_not_its_prompt_format():
    from babl_core.engine.prompts import code_prompt, email_prompt, qa_prompt

    for build, model in ((email_prompt, "email"), (qa_prompt, "Q&A"), (code_prompt, "code")):
        with pytest.raises(ValueError) as info:
            build("")
        assert str(info.value).startswith(f"This {model} model needs"), info.value
        assert not jargon(str(info.value))


def test_counts_are_singular_for_one():
    assert [count(n, "token") for n in (0, 1, 2)] == ["0 tokens", "1 token", "2 tokens"]
    assert count(1, "entry", "entries") == "1 entry" and count(3, "entry", "entries") == "3 entries"


def test_generate_reports_one_token_as_1_token(capsys):
    from babl_core.__main__ import main

    assert main(["generate", "--model", "demo-python", "--max-new-tokens", "1", "hi"]) == 0
    err = capsys.readouterr().err
    assert "; 1 token in " in err, err
