"""Seed 004's experiment (`python -m finetune experiment`): both arms trained and evaluated end to end on
the demo-qa twin, the side-by-side table printed and written, and the verdict sentence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from finetune.__main__ import EXIT_OK, EXIT_USAGE, main
from finetune.experiment import ArmResult, ExperimentError, arm_configs, decide, plot_data, plot_experiment

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_QA = "configs/finetune/demo-qa.yaml"


@pytest.fixture
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_experiment_end_to_end_on_demo_qa(models_dir, tmp_path, capsys, one_torch_thread):
    out = tmp_path / "results"
    # A shorter run than the twin's own (40 steps on 768-byte rows): the same path, in seconds.
    quick = ["--max_steps", "4", "--max_length", "384", "--logging_steps", "2", "--save_steps", "1000"]
    code = main(
        ["experiment", "--config", DEMO_QA, *quick, "--eval_max_new_tokens", "8", "--output", str(out)]
    )
    assert code == EXIT_OK
    printed = capsys.readouterr().out

    # The table is printed and written as Markdown, with the verdict sentence under it: four rows, both
    # adapters and the base asked zero-shot with and without context.
    markdown = (out / "experiment.md").read_text(encoding="utf-8")
    header = "| model | exact match | F1 | eval loss | perplexity | train time (s) |"
    assert header in printed and header in markdown
    for row in ("trained with context", "trained without context", "zero-shot, with context",
                "zero-shot, without context"):  # fmt: skip
        assert f"| {'adapter' if row.startswith('trained') else 'base,'} {row} |" in markdown
    result = json.loads((out / "experiment.json").read_text(encoding="utf-8"))
    verdict = result["verdict"]
    assert f"**Answer:** {verdict}" in markdown and verdict in printed
    assert verdict.startswith(("With context won", "Without context won", "Neither arm won"))
    assert result["recipe"] == DEMO_QA and result["questions"] == 6

    # Both arms: trained with and without the context, evaluated on the same held-out questions.
    with_arm, without_arm = result["arms"]
    assert (with_arm["with_context"], without_arm["with_context"]) == (True, False)
    for arm in (with_arm, without_arm):
        assert set(arm["metrics"]) >= {"exact_match", "f1", "eval_loss", "train_seconds"}
        assert arm["metrics"]["eval_loss"] > 0 and arm["metrics"]["train_seconds"] > 0
        assert arm["metrics"]["steps"] == 4
        folder = models_dir / "adapters" / arm["run_name"]
        assert arm["adapter"] == f"models/adapters/{arm['run_name']}"
        saved = yaml.safe_load((folder / "finetune.yaml").read_text(encoding="utf-8"))
        assert saved["with_context"] is arm["with_context"] and saved["max_steps"] == 4
        report = json.loads((folder / "eval.json").read_text(encoding="utf-8"))
        assert report["metrics"]["loss"] == arm["metrics"]["eval_loss"]
        assert report["metrics"]["f1"] == arm["metrics"]["f1"]
        prompts = [example["prompt"] for example in report["examples"]]
        assert len(prompts) == 6 and all((" context: " in p) is arm["with_context"] for p in prompts)
        meta = json.loads((folder / "babl.json").read_text(encoding="utf-8"))
        assert meta["metrics"]["eval"]["split"]["f1"] == arm["metrics"]["f1"]

    def asked(arm: dict) -> list[str]:
        report = json.loads((models_dir / "adapters" / arm["run_name"] / "eval.json").read_text())
        return [example["input"]["question"] for example in report["examples"]]

    questions = [asked(with_arm), asked(without_arm)]
    assert questions[0] == questions[1]
    assert with_arm["run_name"] == "demo-qa-squad-with-context"
    assert not (models_dir / "adapters" / "demo-qa-squad").exists()  # the recipe's own adapter is untouched
    # The table is made of the arms' own numbers (each row from one eval.json), and the verdict agrees.
    assert_table_is_made_of_the_arms(markdown, result, models_dir)
    assert verdict == decide(with_arm["metrics"], without_arm["metrics"], questions=6)

    # The plot beside experiment.md, linked from it and named in the printed list of files.
    plot = out / "experiment.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    assert "](experiment.png)" in markdown
    assert "experiment.png" in printed.split("written:")[-1]


def assert_table_is_made_of_the_arms(markdown: str, result: dict, models_dir: Path) -> None:
    """Each of the four rows holds the numbers its arm's eval.json reports (adapter or base)."""
    rows = [line for line in markdown.splitlines() if line.startswith(("| adapter", "| base"))]
    assert len(rows) == 4 and result["rows"][0]["model"] == "adapter trained with context"

    def cell(value, digits):
        return "—" if value is None else f"{value:.{digits}f}"

    for line, row in zip(rows, result["rows"], strict=True):
        arm = next(a for a in result["arms"] if a["with_context"] is row["context"])
        report = json.loads((models_dir / "adapters" / arm["run_name"] / "eval.json").read_text())
        source = report["base_metrics"] if row["model"].startswith("base") else report["metrics"]
        expected = [
            cell(source["exact_match"], 3), cell(source["f1"], 3), cell(source["loss"], 3),
            cell(source["perplexity"], 2),
            cell(arm["metrics"]["train_seconds"], 1) if row["model"].startswith("adapter") else "—",
        ]  # fmt: skip
        assert line == f"| {row['model']} | " + " | ".join(expected) + " |"


def test_verdict_names_the_winner_and_the_margin():
    assert decide(
        {"f1": 0.71, "exact_match": 0.6, "eval_loss": 1.0},
        {"f1": 0.15, "exact_match": 0.1, "eval_loss": 2.0},
        questions=2000,
    ) == (
        "With context won: F1 0.710 with context vs 0.150 without (+0.560), exact match 0.600 vs 0.100 "
        "(+0.500) on 2000 held-out questions."
    )
    assert decide({"f1": 0.2, "exact_match": 0.0}, {"f1": 0.2, "exact_match": 0.5}, questions=4) == (
        "Without context won: exact match 0.000 with context vs 0.500 without (-0.500) (F1 tied at 0.200) "
        "on 4 held-out questions."
    )
    assert decide(
        {"f1": 0.0, "exact_match": 0.0, "eval_loss": 4.2},
        {"f1": 0.0, "exact_match": 0.0, "eval_loss": 4.5},
        questions=1,
    ) == (
        "Neither arm won on the answers (both F1 0.000 and exact match 0.000 on 1 held-out question); by eval "
        "loss with context was better, 4.200 with context vs 4.500 without (-0.300)."
    )
    tie = {"f1": 0.5, "exact_match": 0.5, "eval_loss": 3.0}
    assert decide(tie, dict(tie), questions=3) == (
        "Neither arm won: both scored F1 0.500 and exact match 0.500 on 3 held-out questions, with the same eval loss."
    )


def test_experiment_refuses_what_it_cannot_compare(models_dir, capsys):
    with pytest.raises(ExperimentError, match="sets run_name, with_context"):
        arm_configs(DEMO_QA, {"with_context": "false"})
    with pytest.raises(ExperimentError, match="needs a Q&A recipe"):
        arm_configs("configs/finetune/demo-email.yaml")
    # The real recipe offline: its base and data set are not here; the error says to use the twin.
    assert main(["experiment"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "t5-small" in err and "--config configs/finetune/demo-qa.yaml" in err


def test_plot_draws_both_arms_losses_scores_and_base_rows_where_present(tmp_path, monkeypatch):
    monkeypatch.setenv("BABL_MODELS_DIR", str(tmp_path))
    arms = []
    for index, name in enumerate(("with context", "without context")):
        folder = tmp_path / "adapters" / f"arm-{index}"
        folder.mkdir(parents=True)
        log = [{"step": 2, "loss": 3.0 + index}, {"step": 4, "loss": 2.0 + index, "eval_loss": 2.5 + index}]
        (folder / "trainer_log.json").write_text(json.dumps(log))
        metrics = {"exact_match": 0.5 - index / 4, "f1": 0.75 - index / 4}
        if index == 0:
            metrics |= {"base_exact_match": 0.125, "base_f1": 0.25}  # the base measured for this arm only
        arms.append(ArmResult(name, index == 0, f"arm-{index}", f"models/adapters/arm-{index}", metrics))
    curves, bars = plot_data(arms)
    assert curves["with context"] == ([(2, 3.0), (4, 2.0)], [(4, 2.5)])
    assert curves["without context"] == ([(2, 4.0), (4, 3.0)], [(4, 3.5)])
    assert bars == [
        ("adapter, with context", [0.5, 0.75]),
        ("adapter, without context", [0.25, 0.5]),
        ("base alone, with context", [0.125, 0.25]),
    ]
    path = plot_experiment(arms, tmp_path / "experiment.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    nothing = [ArmResult("a", True, "x", "models/adapters/missing", {}), ArmResult("b", False, "y", "z", {})]
    assert plot_experiment(nothing, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
