"""`python -m finetune`: instant help, YAML + CLI overrides, one error listing every config problem,
the dry run's loss-mask view, column errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from finetune.__main__ import EXIT_OK, EXIT_USAGE, main, parse_command
from finetune.config import ConfigError, load_config

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_HTML = "configs/finetune/demo-html.yaml"
DEMO_PYTHON = "configs/finetune/demo-python.yaml"


def test_help_is_instant_and_imports_no_torch():
    code = textwrap.dedent(
        """
        import sys
        from finetune.__main__ import main
        try:
            main(["train", "--help"])
        except SystemExit:
            pass
        print("torch imported:", "torch" in sys.modules)
        """
    )
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    elapsed = time.perf_counter() - start
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith("torch imported: False")
    # Every config key is an option with its help text, grouped as in the dataclasses.
    assert "--lora_r LORA_R, --lora-r LORA_R" in done.stdout
    assert "LoRA rank: higher learns more" in done.stdout
    assert "data settings:" in done.stdout and "adapter settings:" in done.stdout
    assert elapsed < 5, elapsed


def test_command_line_wins_over_the_yaml(models_dir):
    args, overrides, unknown = parse_command(
        ["train", "--config", DEMO_PYTHON, "--lora-r", "8", "--learning_rate", "1e-3", "--packing",
         "--target_modules", "qkv_proj,out_proj", "--columns", "{instruction: instruction, output: output}"]
    )  # fmt: skip
    assert unknown == [] and args.config == DEMO_PYTHON
    assert overrides["packing"] == "true"  # a bare boolean flag means true
    config = load_config(REPO_ROOT / DEMO_PYTHON, overrides)
    assert config.adapter.lora_r == 8  # the YAML says 64
    assert config.train.learning_rate == pytest.approx(1e-3)
    assert config.data.packing is True
    assert config.adapter.target_modules == ["qkv_proj", "out_proj"]
    assert config.data.columns == {"instruction": "instruction", "output": "output"}
    assert config.adapter.lora_alpha == 16  # untouched keys keep the YAML's values
    assert config.source == DEMO_PYTHON


def test_every_config_problem_in_one_error_with_fixes(tmp_path, capsys, models_dir):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        textwrap.dedent(
            """
            run_name: My Run
            task: poetry
            base: models/demo/demo-python
            lora_rank: 8
            learning_rate: fast
            eval_fraction: 1.5
            kind: causal
            prompt_style: t5-qa
            """
        )
    )
    code = main(["train", "--config", str(bad), "--max-step", "5", "--lora_dropout", "2"])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    expected = [
        "--max-step (command line): unknown option; did you mean --max_steps?",
        "'lora_rank' (config): unknown setting; did you mean 'lora_r'?",
        "learning_rate: 'fast' is not a number; write e.g. 0.0002 or 2e-4",
        "dataset: required; add `dataset: ...`",
        "task: 'poetry' is not allowed; use one of html, python, email, qa, code, chat",
        "run_name: 'My Run' is not a slug",
        "eval_fraction: 1.5 must be at least 0 and below 1",
        "lora_dropout: 2.0 must be at least 0 and below 1",
        "prompt_style: 't5-qa' does not fit a causal model",
    ]
    for line in expected:
        assert line in err, (line, err)
    assert f"has {len(expected)} problems" in err


def test_offline_real_recipe_names_both_missing_downloads_and_the_twin(models_dir):
    with pytest.raises(ConfigError) as info:
        load_config(REPO_ROOT / "configs" / "finetune" / "python-codegen-lora.yaml")
    text = str(info.value)
    assert "base: 'Salesforce/codegen-350M-mono' is a hub id, but the hub is offline" in text
    assert "offline twin (configs/finetune/demo-*.yaml)" in text
    assert "dataset: 'iamtarun/python_code_instructions_18k_alpaca' is a hub data set" in text


def test_missing_demo_base_says_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.setenv("BABL_MODELS_DIR", str(tmp_path / "empty-models"))
    with pytest.raises(ConfigError, match="build the demo models first: python -m babl_core demo"):
        load_config(REPO_ROOT / DEMO_PYTHON)


def test_dry_run_shows_the_masked_prompt_and_lengths(capsys, models_dir):
    code = main(["train", "--config", DEMO_HTML, "--dry-run"])
    out = capsys.readouterr().out
    assert code == EXIT_OK
    assert "nothing is trained" in out
    assert "rows: 40 -> 32 train, 8 eval" in out
    # The prompt, as the chat template renders it, is masked; the answer and its EOS are trained.
    first = out.split("--- example 1 of 32")[1].split("--- example 2")[0]
    prompt, _, answer = first.partition("[/INST]]]")
    assert prompt.splitlines()[1].startswith("[[<s>[INST] ")
    assert answer.lstrip().lower().startswith("<!doctype html>")
    assert "</s>" in answer or "more characters" in answer
    assert "token lengths, prompt + answer + EOS (max_length) (32 examples, limit 512)" in out
    assert "median" in out and "over the limit (cut):" in out
    # Nothing was written.
    assert not (models_dir / "adapters" / "demo-html-qlora").exists()
    assert not (models_dir / "checkpoints").exists()


def test_dry_run_ignores_output_clashes_but_training_does_not(capsys, models_dir):
    (models_dir / "adapters" / "demo-html-qlora").mkdir()
    assert main(["train", "--config", DEMO_HTML, "--dry-run"]) == EXIT_OK
    capsys.readouterr()
    assert main(["train", "--config", DEMO_HTML]) == EXIT_USAGE
    assert "already exists; pass --overwrite true" in capsys.readouterr().err


def test_column_mapping_error_names_expected_and_found(capsys, models_dir):
    code = main(
        ["train", "--config", DEMO_HTML, "--dry-run", "--columns", "{instruction: title, response: html}"]
    )
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert "prompt style 'codellama-inst' expects the fields instruction, response" in err
    assert "found the columns label, html" in err
    assert "field 'instruction' is mapped to column 'title', which does not exist" in err


def test_column_keys_must_be_style_fields(models_dir):
    with pytest.raises(
        ConfigError,
        match="columns: 'instructions' is not a field of prompt style 'codellama-inst'; did you mean 'instruction'",
    ):
        load_config(REPO_ROOT / DEMO_HTML, {"columns": "{instructions: label, response: html}"})


def test_cli_exit_code_for_a_bad_config_in_a_real_process(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_name: x\n")
    done = subprocess.run(
        [sys.executable, "-m", "finetune", "train", "--config", str(bad)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == EXIT_USAGE
    assert "task: required" in done.stderr and "base: required" in done.stderr


def test_seq2seq_dry_run_shows_encoder_input_and_target_with_and_without_context(capsys, models_dir):
    assert main(["train", "--config", "configs/finetune/demo-qa.yaml", "--dry-run"]) == EXIT_OK
    with_context = capsys.readouterr().out
    first = with_context.split("--- example 1 of 42")[1].split("--- example 2")[0]
    assert "input (encoder, no loss): [[question: " in first and " context: " in first
    assert "</s>]]\ntarget (loss):" in first and first.rstrip().endswith("</s>")
    assert "input token lengths (max_length) (42 examples, limit 768)" in with_context
    assert "target token lengths (max_target_length)" in with_context

    assert (
        main(["train", "--config", "configs/finetune/demo-qa.yaml", "--dry-run", "--with_context", "false"])
        == 0
    )
    without = capsys.readouterr().out.split("--- example 1 of 42")[1].split("--- example 2")[0]
    assert "[[question: " in without and "context:" not in without


def test_with_context_false_only_fits_the_qa_style(models_dir):
    with pytest.raises(ConfigError, match="with_context: false only applies to question-answering styles"):
        load_config(REPO_ROOT / "configs" / "finetune" / "demo-email.yaml", {"with_context": "false"})


def test_local_files_have_one_split(models_dir):
    with pytest.raises(ConfigError, match="a local file is one split with no configurations"):
        load_config(REPO_ROOT / DEMO_PYTHON, {"dataset_split": "validation"})
