"""`python -m babl_core`: exit codes and messages, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from babl_core.__main__ import main
from tests.conftest import REPO_ROOT


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "babl_core", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO_ROOT,
    )


@pytest.mark.slow
def test_generate_streams_text_from_a_demo_model():
    result = run_cli(
        "generate", "--model", "demo-python", "hello", "--max-new-tokens", "20", "--temperature", "0"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "demo-python: float32 on cpu" in result.stderr and "tok/s" in result.stderr


@pytest.mark.slow
def test_unavailable_model_is_one_clear_line_and_exit_3():
    result = run_cli("generate", "--model", "html-codellama", "hi")
    assert result.returncode == 3
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "unavailable" in lines[0] and "offline" in lines[0]
    assert "Traceback" not in result.stderr


def test_models_table_lists_every_entry_with_availability(capsys):
    assert main(["models", "--wide"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["id", "task", "availability", "reason"]
    for model_id, word in (
        ("demo-python", "local"),
        ("html-codellama", "unavailable"),
        ("email-t5", "needs-training"),
    ):
        row = next(line for line in out.splitlines() if line.startswith(model_id + " "))
        assert word in row


def test_models_json(capsys):
    import json

    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["id"] for r in rows} >= {"demo-html", "demo-python", "demo-email", "demo-qa"}


def test_unknown_model_is_exit_2_with_a_suggestion(capsys):
    assert main(["generate", "--model", "demo-pyton", "hi"]) == 2
    assert "Did you mean 'demo-python'" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-1", "100", "inf", "nan", "hot"])
def test_bad_setting_is_exit_2_naming_it(capsys, value):
    # Refused while the arguments are read (argparse exits with 2), before anything loads.
    with pytest.raises(SystemExit) as info:
        main(["generate", "--model", "demo-python", "hi", "--temperature", value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "temperature" in err and "from 0 to 2" in err


def test_empty_prompt_is_exit_2(capsys):
    assert main(["generate", "--model", "demo-python", "  "]) == 2
    assert "empty" in capsys.readouterr().err


def test_generate_in_process_with_stop_and_seed(capsys):
    assert main(["generate", "--model", "demo-python", "x", "--max-new-tokens", "30", "--temperature", "0.8",
                 "--seed", "4", "--quiet"]) == 0  # fmt: skip
    first = capsys.readouterr().out
    assert main(["generate", "--model", "demo-python", "x", "--max-new-tokens", "30", "--temperature", "0.8",
                 "--seed", "4", "--quiet"]) == 0  # fmt: skip
    assert capsys.readouterr().out == first and first.strip()


def test_download_offline_is_a_clear_message(capsys):
    assert main(["download", "python-codegen"]) == 3
    err = capsys.readouterr().err
    assert "offline" in err and "HF_HUB_OFFLINE" in err


def test_download_of_a_local_entry_needs_nothing(capsys):
    assert main(["download", "demo-python"]) == 0
    assert "needs no download" in capsys.readouterr().out


def test_demo_if_missing_is_quick_when_up_to_date(session_models_dir, capsys):
    assert main(["demo", "--if-missing", "--out", str(session_models_dir / "demo")]) == 0
    assert "up to date" in capsys.readouterr().err


def test_every_command_has_help():
    for command in ("serve", "models", "generate", "demo", "download", "status", "adduser"):
        with pytest.raises(SystemExit) as info:
            main([command, "--help"])
        assert info.value.code == 0


def test_status_without_a_server_says_how_to_start_one(capsys):
    assert main(["status", "--url", "http://127.0.0.1:9"]) == 1
    assert "make run" in capsys.readouterr().err


def _narrow_terminal(monkeypatch, columns: int = 60) -> None:
    monkeypatch.setattr("shutil.get_terminal_size", lambda fallback=None: os.terminal_size((columns, 20)))


def test_models_piped_never_cuts_a_reason(capsys, monkeypatch):
    _narrow_terminal(monkeypatch)
    assert main(["models"]) == 0  # capsys' stdout is not a terminal, like `| less` or `> file`
    captured = capsys.readouterr()
    assert "…" not in captured.out
    assert max(len(line) for line in captured.out.splitlines()) > 60
    assert "python -m babl_core download html-codellama" in captured.out  # the end of a long reason
    assert "--wide" not in captured.err


def test_models_on_a_terminal_cuts_and_says_how_to_see_it_whole(capsys, monkeypatch):
    _narrow_terminal(monkeypatch)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(["models"]) == 0
    captured = capsys.readouterr()
    assert all(len(line) <= 60 for line in captured.out.splitlines())
    assert "…" in captured.out
    assert "--wide" in captured.err and "--json" in captured.err
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(["models", "--wide"]) == 0
    captured = capsys.readouterr()
    assert "…" not in captured.out and "--wide" not in captured.err


def test_needs_training_offline_says_both_what_to_train_and_that_the_base_is_missing(capsys):
    assert main(["models", "--json"]) == 0
    row = next(r for r in json.loads(capsys.readouterr().out) if r["id"] == "email-t5")
    assert row["availability"] == "needs-training"
    assert "train one: python -m finetune train --config configs/finetune/email-t5.yaml" in row["reason"]
    assert row["reason"].startswith(
        "no adapter at models/adapters/email-t5 yet, and its base t5-base is not downloaded (offline"
    )
    assert "python -m babl_core download email-t5" in row["reason"]
