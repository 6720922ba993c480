"""What a training run reports and refuses: an empty data set before anything loads, a second run of the
same name at start, the losses of a T5 run with gradient accumulation, and a resumed run's totals."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from finetune import factories, outputs
from finetune.config import load_config

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS = REPO_ROOT / "configs" / "finetune"
QUICK = {"max_length": 96, "max_target_length": 64, "save_steps": 1000}


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One thread: on a shared 2-core machine tiny-model steps are faster so (see test_finetune_recipes)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def train(name: str, **overrides):
    from finetune.recipes import run_training

    return run_training(load_config(CONFIGS / f"{name}.yaml", {**QUICK, **overrides}))


# --------------------------------------------------------------------------------------------------
# An empty data set: one clear error before the base loads


@pytest.mark.parametrize("content", ["", "\n\n  \n"], ids=["empty", "blank-lines"])
def test_empty_jsonl_is_one_error_before_the_model_loads(models_dir, tmp_path, monkeypatch, capsys, content):
    import babl_core.engine.loading
    from finetune.__main__ import EXIT_USAGE, main

    def no_loading(*args, **kwargs):
        raise AssertionError("the base model was loaded before the data set was checked")

    monkeypatch.setattr(babl_core.engine.loading, "load_base", no_loading)
    empty = tmp_path / "rows.jsonl"
    empty.write_text(content)
    code = main(["train", "--config", str(CONFIGS / "demo-python.yaml"), "--dataset", str(empty)])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert err.strip().splitlines() == [f"finetune: dataset: {empty} is empty: it has no rows to train on"]


def test_header_only_csv_has_no_rows(models_dir, tmp_path):
    from finetune.data import DataError

    header = tmp_path / "rows.csv"
    header.write_text("instruction,input,output\n")
    with pytest.raises(DataError, match="has no rows"):
        train("demo-python", dataset=str(header))


# --------------------------------------------------------------------------------------------------
# Two runs of one name at once


def test_second_run_of_the_same_name_is_refused_at_start(models_dir, capsys, monkeypatch):
    import babl_core.engine.loading
    from finetune.__main__ import EXIT_FAILED, main

    def no_loading(*args, **kwargs):
        raise AssertionError("the refused run loaded the base model")

    config = load_config(CONFIGS / "demo-python.yaml")
    with outputs.run_lock(config):  # the first run, still training
        monkeypatch.setattr(babl_core.engine.loading, "load_base", no_loading)
        code = main(["train", "--config", str(CONFIGS / "demo-python.yaml")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == EXIT_FAILED
        assert len(err) == 1, err
        assert err[0].startswith(
            "finetune: run 'demo-python-lora' is already training in another process (pid "
        )
        # Another name is free meanwhile.
        with outputs.run_lock(load_config(CONFIGS / "demo-python.yaml", {"run_name": "other-run"})):
            pass
    # Released when the first run ends: the name is free again.
    with outputs.run_lock(config):
        pass


# --------------------------------------------------------------------------------------------------
# T5's loss under accumulation (and, the same cause, under several processes: test_finetune_ddp)


def base_loss_on_training_rows(config) -> float:
    """The loss of the untrained base (a fresh LoRA adapter changes nothing) over the run's training rows,
    computed here without the Trainer: what a first logged loss should be close to."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from babl_core import settings
    from finetune.data import prepare_data

    base = settings.resolve_path(config.model.base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSeq2SeqLM.from_pretrained(base).eval()
    rows = prepare_data(tokenizer, config, kind="seq2seq").train.rows
    losses = []
    with torch.no_grad():
        for row in rows:
            out = model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]]))
            losses.append(out.loss.item())
    return sum(losses) / len(losses)


@pytest.mark.slow
def test_t5_loss_with_gradient_accumulation_is_the_mean_not_the_sum(models_dir):
    """Before the fix, every logged loss of a T5 run was gradient_accumulation_steps times too large."""
    config = load_config(CONFIGS / "demo-email.yaml", QUICK)
    reference = base_loss_on_training_rows(config)
    result = train("demo-email", max_steps=2, logging_steps=1, gradient_accumulation_steps=2)
    first = next(entry["loss"] for entry in result.log_history if entry.get("step") == 1)
    assert first == pytest.approx(reference, rel=0.2), (first, reference)
    assert result.metrics["train_loss"] < 1.2 * reference


# --------------------------------------------------------------------------------------------------
# A resumed run reports the whole run


def test_whole_run_train_loss_by_hand():
    # Logged at steps 1, 2 and 4 before the checkpoint at 4 (each the mean since the previous log), then
    # the resumed session's mean over steps 5-8.
    history = [
        {"step": 1, "loss": 4.0},
        {"step": 2, "loss": 3.0},
        {"step": 4, "loss": 2.0},
        {"step": 4, "eval_loss": 9},
    ]
    whole = factories.whole_run_train_loss(history, 1.0, resumed_at=4, steps=8)
    assert whole == pytest.approx((4.0 + 3.0 + 2.0 * 2 + 1.0 * 4) / 8)
    assert factories.whole_run_train_loss(history, 1.0, resumed_at=0, steps=8) == 1.0
    # Steps after the last log and before the checkpoint (5-6 here) are unknown and left out.
    assert factories.whole_run_train_loss(history, 1.0, resumed_at=6, steps=8) == pytest.approx(
        (4.0 + 3.0 + 2.0 * 2 + 1.0 * 2) / 6
    )


class _Interrupt(Exception):
    pass


@pytest.mark.slow
def test_resumed_run_reports_train_loss_and_seconds_of_the_whole_run(models_dir, monkeypatch):
    from transformers import TrainerCallback

    settings = {"max_steps": 8, "save_steps": 4, "logging_steps": 2, "eval_steps": 1000}
    slow_step_s = 0.5  # the first session's steps take at least this long each

    class SlowThenKilled(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            time.sleep(slow_step_s)

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 5:  # checkpoint-4 is complete
                raise _Interrupt

    original = factories.train_and_evaluate

    def interrupted(trainer, *args, **kwargs):
        trainer.add_callback(SlowThenKilled())
        return original(trainer, *args, **kwargs)

    monkeypatch.setattr(factories, "train_and_evaluate", interrupted)
    with pytest.raises(_Interrupt):
        train("demo-python", **settings)
    monkeypatch.setattr(factories, "train_and_evaluate", original)

    checkpoint = models_dir / "checkpoints" / "demo-python-lora" / "checkpoint-4"
    before = json.loads((checkpoint / factories.PROGRESS_FILE).read_text())["seconds"]
    assert before >= 4 * slow_step_s

    started = time.perf_counter()
    resumed = train("demo-python", **settings, resume=True)
    second_session = time.perf_counter() - started
    straight = train("demo-python", **settings, run_name="demo-python-straight")

    assert resumed.metrics["steps"] == straight.metrics["steps"] == 8
    assert resumed.metrics["train_loss"] == pytest.approx(straight.metrics["train_loss"], rel=1e-4)
    # The first session's time up to its checkpoint counts too (before the fix: this session's only).
    assert resumed.metrics["train_seconds"] > second_session + 4 * slow_step_s - 0.2
    babl = json.loads((resumed.output_dir / "babl.json").read_text())
    assert babl["metrics"]["train_loss"] == resumed.metrics["train_loss"]
    log = json.loads((resumed.output_dir / "trainer_log.json").read_text())
    summary = next(entry for entry in reversed(log) if "train_loss" in entry)
    assert summary["train_loss"] == pytest.approx(straight.metrics["train_loss"], rel=1e-4)
