"""What a person reads after training: the terminal output, and the adapter's model card."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import yaml

from finetune.model_card import PEFT_TEMPLATE_MARK
from finetune.outputs import write_model_card
from tests.conftest import REPO_ROOT


def fake_adapter(directory, metrics: dict, **config) -> None:
    directory.mkdir(parents=True)
    meta = {"id": directory.name, "label": "Q&A test", "task": "qa", "base": "t5-small",
            "prompt_style": "t5-qa", "recipe": "qa-t5-squad", "metrics": metrics,
            "created": "2026-12-01T00:00:00Z"}  # fmt: skip
    (directory / "babl.json").write_text(json.dumps(meta))
    run = {"run_name": directory.name, "task": "qa", "base": "t5-small", "kind": "seq2seq",
           "dataset": "squad", "lora_r": 8, "learning_rate": 0.0003, **config}  # fmt: skip
    (directory / "finetune.yaml").write_text(yaml.safe_dump(run))


def test_model_card_renders_every_metric_and_pairs_base_figures(tmp_path):
    metrics = {
        "train_loss": 1.25,
        "eval_loss": 1.5,
        "base_eval_loss": 3.75,
        "train_examples": 90,
        "eval_examples": 10,
        "eval": {"split": {"exact_match": 0.4, "f1": 0.55, "base": {"exact_match": 0.05, "f1": 0.125}}},
        "a_new_figure": 7,
    }
    directory = tmp_path / "qa-run"
    fake_adapter(directory, metrics)
    (directory / "README.md").write_text(f"# Model Card\n{PEFT_TEMPLATE_MARK}\n")  # PEFT's template
    card = write_model_card(directory).read_text()
    assert PEFT_TEMPLATE_MARK not in card
    assert "| eval loss | 1.5 | 3.75 |" in card  # the adapter and its base side by side
    assert "| evaluation › held-out rows › exact match | 0.4 | 0.05 |" in card
    assert "| evaluation › held-out rows › F1 | 0.55 | 0.125 |" in card
    assert "| train loss | 1.25 |  |" in card
    assert "| a new figure | 7 |  |" in card  # metrics nobody told the card about still show
    assert "base eval loss" not in card  # paired, not listed again
    assert "| training rows | 90 |" in card and "| held-out rows | 10 (" in card
    assert "| lora_r | 8 |" in card and "| learning_rate | 0.0003 |" in card
    assert "PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained('t5-small')" in card
    assert "tokenizer('question: Who wrote Hamlet?'" in card  # the prompt format it was trained on
    assert "-m babl_core generate --model qa-run" in card


def test_model_card_keeps_a_readme_someone_else_wrote(tmp_path):
    directory = tmp_path / "theirs"
    fake_adapter(directory, {"train_loss": 1.0})
    (directory / "README.md").write_text("# My adapter\nTrained on my own data.\n")
    assert write_model_card(directory) is None
    assert (directory / "README.md").read_text() == "# My adapter\nTrained on my own data.\n"


def run(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=400
    )


@pytest.mark.slow
def test_train_output_one_bar_a_loss_table_a_last_block_and_a_card_with_the_real_metrics(models_dir):
    env = {**os.environ, "BABL_MODELS_DIR": str(models_dir), "HF_HUB_OFFLINE": "1", "BABL_THREADS": "1"}
    train = run("-m", "finetune", "train", "--config", "configs/finetune/demo-qa.yaml", "--max_steps", "6",
                "--eval_steps", "3", "--logging_steps", "2", "--max_length", "128", "--max_target_length", "32",
                env=env)  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]

    # stderr: one progress bar (no nested evaluation bar), the losses as a table, no raw dicts, no warnings
    segments = re.split(r"[\r\n]", train.stderr)
    bars = {segment.split(":")[0].strip() for segment in segments if "%|" in segment}
    assert bars == {"training"}, bars
    assert "\x1b[A" not in train.stderr  # tqdm's cursor-up: a second bar drawn under the first
    assert re.search(r"step\s+epoch\s+train loss\s+eval loss\s+perplexity", train.stderr)
    assert re.search(r"^\s+6\s+\d+\.\d+\s+\d+\.\d{4}\s+\d+\.\d{4}\s+\d+\.\d+$", train.stderr, re.M)
    assert "{'loss'" not in train.stderr + train.stdout and "{'eval_loss'" not in train.stderr + train.stdout
    assert "Warning" not in train.stderr

    # stdout: the last block names the folder, the plot, the card and the command to chat with it
    adapter = models_dir / "adapters" / "demo-qa-squad"
    out = train.stdout
    assert out.startswith("trained demo-qa-squad: 6 steps in ")
    assert "eval loss" in out.splitlines()[0] and "on 6 held-out rows" in out.splitlines()[0]
    assert re.search(r"^\s+folder\s+models/adapters/demo-qa-squad$", out, re.M)
    assert re.search(r"^\s+loss curve\s+models/adapters/demo-qa-squad/loss\.png$", out, re.M)
    assert re.search(r"^\s+model card\s+models/adapters/demo-qa-squad/README\.md$", out, re.M)
    assert (adapter / "loss.png").is_file()
    from babl_core.engine.catalog import Catalog

    label = Catalog.load().get("demo-qa-squad").display_label  # as the app's dropdown shows it
    assert re.search(
        rf"^\s+in the app\s+make run, then pick “{re.escape(label)}” in the settings$", out, re.M
    )
    chat = re.search(r"^\s+chat with it\s+(.+)$", out, re.M).group(1)
    argv = shlex.split(chat)
    assert argv[1:4] == ["-m", "babl_core", "generate"] and "--model" in argv

    # the model card holds this run's numbers, as babl.json records them
    metrics = json.loads((adapter / "babl.json").read_text())["metrics"]
    card = (adapter / "README.md").read_text()
    assert "[More Information Needed]" not in card
    assert f"| train loss | {metrics['train_loss']:.6g} |" in card
    assert f"| eval loss | {metrics['eval_loss']:.6g} |" in card
    assert f"| training rows | {metrics['train_examples']} |" in card
    assert f"| held-out rows | {metrics['eval_examples']} " in card
    assert f"| steps | {metrics['steps']} |" in card
    assert "`finetune/samples/squad.jsonl`" in card and "| max_steps | 6 |" in card

    # the printed command works as printed (with this interpreter)
    answer = run(*argv[1:], "--max-new-tokens", "8", env=env)
    assert answer.returncode == 0, answer.stderr[-2000:]

    # eval adds the task metric to babl.json, the card follows, and loading the adapter warns nothing
    evaluated = run("-m", "finetune", "eval", "--adapter", "demo-qa-squad", "--limit", "2", env=env)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert "FutureWarning" not in evaluated.stderr
    split = json.loads((adapter / "babl.json").read_text())["metrics"]["eval"]["split"]
    card = (adapter / "README.md").read_text()
    assert f"| evaluation › held-out rows › exact match | {split['exact_match']:.6g} |" in card
    assert f"| evaluation › held-out rows › perplexity | {split['perplexity']:.6g} |" in card


def test_progress_table_rows_per_evaluation_or_per_logged_loss_without_held_out_rows():
    import io
    from types import SimpleNamespace

    from finetune.progress import TrainingProgress

    def lines(text: str) -> list[str]:
        return re.split(r"[\r\n]", text)  # the bar redraws with carriage returns; rows end with newlines

    def replay(eval_strategy: str, logs: list[tuple[int, dict]]) -> tuple[TrainingProgress, str]:
        out = io.StringIO()
        progress = TrainingProgress(stream=out)
        args = SimpleNamespace(eval_strategy=eval_strategy)
        state = SimpleNamespace(is_world_process_zero=True, max_steps=4, global_step=0, epoch=0.0)
        progress.on_train_begin(args, state, None)
        for step, entry in logs:
            state.global_step, state.epoch = step, step / 4
            progress.on_step_end(args, state, None)
            progress.on_log(args, state, None, logs=entry)
        progress.on_train_end(args, state, None)
        return progress, out.getvalue()

    logs = [
        (2, {"loss": 3.0}),
        (2, {"eval_loss": 2.5}),
        (4, {"loss": 2.0}),
        (4, {"eval_loss": 2.25}),
        (4, {"eval_loss": 2.25, "eval_runtime": 0.1}),
    ]  # fmt: skip  (the last: the final evaluation)
    progress, shown = replay("steps", logs)
    assert [(r["step"], r["train loss"], r["eval loss"]) for r in progress.rows] == [
        (2, 3.0, 2.5),
        (4, 2.0, 2.25),
    ]
    assert shown.count("train loss") == 1  # one header
    assert any(re.fullmatch(r"\s+4\s+1\.00\s+2\.0000\s+2\.2500\s+9\.49", line) for line in lines(shown))
    assert "{'" not in shown

    progress, shown = replay("no", [(2, {"loss": 3.0}), (4, {"loss": 2.0})])
    assert [(r["step"], r["train loss"], r["eval loss"]) for r in progress.rows] == [
        (2, 3.0, None),
        (4, 2.0, None),
    ]
    assert any(re.fullmatch(r"\s+2\s+0\.50\s+3\.0000\s+—\s+—", line) for line in lines(shown))
