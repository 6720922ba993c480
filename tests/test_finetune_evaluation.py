"""`python -m finetune eval` and `predict` on adapters trained here from the offline twins: loss and
perplexity, each task's metric through the eval path (known answers fed in where a random model cannot
give them), HumanEval in the sandbox, results in eval.json and babl.json, and predictions that are
exactly what the app answers."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from finetune.__main__ import EXIT_OK, EXIT_USAGE, main
from finetune.config import ConfigError, load_config

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS = REPO_ROOT / "configs" / "finetune"
# A few steps on short rows: the adapters only need to exist and be real PEFT adapters.
QUICK = {"max_length": 128, "max_target_length": 64, "logging_steps": 5, "save_steps": 1000, "max_steps": 3}
RUNS = {
    "demo-qa": "demo-qa-squad",
    "demo-email": "demo-email-lora",
    "demo-code": "demo-code-mbpp",
    "demo-python": "demo-python-lora",
    "demo-html": "demo-html-qlora",
}
TASK_METRICS = {
    "demo-qa-squad": {"exact_match", "f1"},
    "demo-email-lora": {"rouge1", "rouge2", "rougeL"},
    "demo-code-mbpp": {"pass@1", "sandbox"},
    "demo-python-lora": {"pass@1", "sandbox"},  # on HumanEval: the twin's eval_set (rows have no tests)
    "demo-html-qlora": {"html_valid_fraction"},
    "demo-qa-full": {"exact_match", "f1"},
}
VALID_PAGE = (
    "<!DOCTYPE html>\n<html><head><title>Hi</title></head>\n<body><h1>Hello</h1><p>Welcome.</p></body></html>"
)


@pytest.fixture(scope="module")
def trained(session_models_dir, tmp_path_factory):
    """A models dir of its own with an adapter trained from every twin, and a full fine-tune."""
    import torch

    from finetune.recipes import run_training

    root = tmp_path_factory.mktemp("eval-models")
    (root / "demo").symlink_to(session_models_dir / "demo", target_is_directory=True)
    (root / "adapters").mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared 2-core machine: one thread is fastest
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BABL_MODELS_DIR", str(root))
        for twin in RUNS:
            run_training(load_config(CONFIGS / f"{twin}.yaml", QUICK))
        run_training(
            load_config(CONFIGS / "demo-qa.yaml", {**QUICK, "finetuning": "full", "run_name": "demo-qa-full"})
        )
        yield root
    torch.set_num_threads(threads)


def target_for(run: str, **overrides):
    """The run's eval target; the base comparison is off unless asked for (these tests feed the adapter's
    answers, and the base's would only cost time)."""
    from finetune.evaluation import resolve_target

    overrides = {"eval_base": False, **overrides}
    return resolve_target(adapter=run, overrides={k: str(v) for k, v in overrides.items()})


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------------
# eval on every twin


@pytest.mark.parametrize("run", list(TASK_METRICS))
def test_eval_command_on_each_twin_writes_eval_json_and_babl_metrics(trained, run, capsys):
    folder = trained / ("finetuned" if run == "demo-qa-full" else "adapters") / run
    meta_before = read_json(folder / "babl.json")
    mode_before = (folder / "babl.json").stat().st_mode

    assert main(["eval", "--adapter", run, "--limit", "3", "--eval_max_new_tokens", "12"]) == EXIT_OK

    out = capsys.readouterr().out
    eval_set = "humaneval" if run == "demo-python-lora" else "split"
    report = read_json(folder / ("eval-humaneval.json" if eval_set == "humaneval" else "eval.json"))
    assert report["id"] == run and report["eval_set"] == eval_set
    metrics = report["metrics"]
    assert set(metrics) == {"loss", "perplexity"} | TASK_METRICS[run]
    assert metrics["loss"] > 0 and metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]), rel=1e-5)
    assert report["counts"]["loss_examples"] == 3 and report["counts"]["answered"] == 3
    assert report["generation"]["max_new_tokens"] == 12 and report["generation"]["temperature"] == 0
    assert len(report["examples"]) == 3 and all(e["answers"] for e in report["examples"])
    # babl.json keeps what training wrote and gains the summary, without becoming private.
    meta = read_json(folder / "babl.json")
    assert meta["metrics"]["train_loss"] == meta_before["metrics"]["train_loss"]
    summary = meta["metrics"]["eval"][eval_set]
    assert {k: summary[k] for k in metrics} == metrics
    assert summary["evaluated_at"] == report["evaluated_at"]
    assert (folder / "babl.json").stat().st_mode == mode_before
    assert not list(folder.glob(".*.tmp"))
    # The table.
    assert f"{run} · " in out and "perplexity" in out and "written: " in out
    if run == "demo-python-lora":
        assert "HumanEval, 3 problems (loss on 3 held-out rows)" in out
        assert all(e["id"].startswith("HumanEval/") for e in report["examples"])
    if run == "demo-qa-squad":
        assert "exact match" in out and "F1" in out


def test_rows_without_tests_say_how_to_get_pass_at_k(trained, capsys):
    assert main(["eval", "--adapter", "demo-python-lora", "--eval_set", "split", "--limit", "2",
                 "--eval_max_new_tokens", "4"]) == EXIT_OK  # fmt: skip
    out = capsys.readouterr().out
    assert "no pass@k: the held-out rows have no tests" in out and "--humaneval" in out
    report = read_json(trained / "adapters" / "demo-python-lora" / "eval.json")
    assert set(report["metrics"]) == {"loss", "perplexity"}


def test_eval_by_config_finds_the_run_and_the_app_lists_the_metrics(trained, capsys):
    from babl_core.engine.catalog import Catalog

    config = "configs/finetune/demo-email.yaml"
    assert main(["eval", "--config", config, "--limit", "2", "--eval_max_new_tokens", "8"]) == EXIT_OK
    assert "demo-email-lora · email · 2 held-out rows" in capsys.readouterr().out
    spec = Catalog.load().get("demo-email-lora")
    assert spec.metrics["eval"]["split"]["loss_examples"] == 2


def test_qa_loss_is_the_training_loss_and_known_answers_score_by_hand(trained):
    from finetune.evaluation import run_eval, write_results

    target = target_for("demo-qa-squad")
    # Answers chosen per example: exactly the first reference, the reference dressed up (same after
    # SQuAD normalisation), a wrong answer sharing one of two words, then nothing right.
    shapes = iter(["exact", "dressed", "half", "wrong", "wrong", "wrong"])

    def answer(example, params):
        reference = example.reference[0]
        shape = next(shapes)
        if shape == "exact":
            return reference
        if shape == "dressed":
            return f"The {reference.upper()}!"
        if shape == "half":
            return reference.split()[0] + " zebra" if len(reference.split()) == 2 else "zebra"
        return "zebra"

    report = run_eval(target, answer_fn=answer)
    assert report.counts["answered"] == 6
    # The same rows, cut and masked as training did: the loss is the trainer's final eval loss.
    trained_loss = read_json(target.path / "babl.json")["metrics"]["eval_loss"]
    assert report.metrics["loss"] == pytest.approx(trained_loss, abs=1e-4)
    em, f1 = report.metrics["exact_match"], report.metrics["f1"]
    per = [e["scores"] for e in report.examples]
    assert [p["exact_match"] for p in per] == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert per[1]["f1"] == 1.0 and per[3]["f1"] == 0.0
    assert em == pytest.approx(2 / 6, abs=1e-6)
    assert f1 == pytest.approx(sum(p["f1"] for p in per) / 6, abs=1e-6)  # metrics keep 6 decimals
    assert f1 >= em - 1e-6
    # All accepted answers are references (SQuAD lists several).
    assert any(len(e["reference"]) > 1 for e in report.examples)
    write_results(target, report)


def test_base_is_measured_beside_the_adapter_on_the_same_rows_and_prompts(trained, capsys):
    """The base column: the same rows and prompts with the adapter switched off. Its loss is the loss the
    trainer measured before the first step (base_eval_loss), its answers are scored like the adapter's,
    and babl.json carries both side by side."""
    from finetune.evaluation import format_table, run_eval, write_results

    target = target_for("demo-qa-squad", eval_base=True)
    asked = {"adapter": [], "base": []}

    def answer_as(who, text):
        def answer(example, params):
            asked[who].append(example.prompt)
            return text(example)

        return answer

    report = run_eval(
        target,
        answer_fn=answer_as("adapter", lambda ex: ex.reference[0]),  # all right
        base_answer_fn=answer_as("base", lambda ex: "zebra"),  # all wrong
    )
    assert asked["adapter"] == asked["base"] and len(asked["base"]) == 6
    assert report.metrics["exact_match"] == 1.0 and report.base_metrics["exact_match"] == 0.0
    assert report.base_metrics["f1"] == 0.0
    trained_metrics = read_json(target.path / "babl.json")["metrics"]
    # The base loss is the trainer's step-0 loss on the same rows; the adapter's its final one.
    assert report.base_metrics["loss"] == pytest.approx(trained_metrics["base_eval_loss"], abs=1e-4)
    assert report.metrics["loss"] == pytest.approx(trained_metrics["eval_loss"], abs=1e-4)
    assert report.base_metrics["loss"] != pytest.approx(report.metrics["loss"], abs=1e-4)  # training moved it
    assert all(
        e["base_answers"] == ["zebra"] and e["base_scores"]["exact_match"] == 0.0 for e in report.examples
    )

    table = format_table(report)
    assert "base" in table.splitlines()[1] and "adapter" in table.splitlines()[1]
    assert any(
        line.startswith("exact match") and "0.0000" in line and "+1.0000" in line
        for line in table.splitlines()
    )

    write_results(target, report)
    metrics = read_json(target.path / "babl.json")["metrics"]
    assert (metrics["exact_match"], metrics["base_exact_match"]) == (1.0, 0.0)
    assert (metrics["f1"], metrics["base_f1"]) == (report.metrics["f1"], 0.0)
    assert metrics["task_metric_eval_set"] == "split" and metrics["task_metric_examples"] == 6
    assert metrics["eval"]["split"]["base_loss"] == report.base_metrics["loss"]
    assert read_json(target.path / "eval.json")["base_metrics"] == report.base_metrics


def test_a_full_fine_tune_has_no_base_to_switch_to(trained):
    from finetune.evaluation import run_eval

    report = run_eval(target_for("demo-qa-full", eval_base=True, eval_limit=2), answer_fn=lambda ex, p: "x")
    assert report.base_metrics is None
    assert any("no base comparison" in note for note in report.notes)


@pytest.mark.parametrize("run", ["demo-python-lora", "demo-email-lora", "demo-code-mbpp"])
def test_loss_is_the_trainers_eval_loss(trained, run):
    """Same held-out rows, cut and masked as training did, a mean over answer tokens, scored by the
    weights the app serves: the trainer's last eval loss, to rounding."""
    from finetune.evaluation import run_eval

    target = target_for(run)
    report = run_eval(target, answer_fn=lambda ex, params: "")
    metrics = read_json(target.path / "babl.json")["metrics"]
    assert report.counts["loss_examples"] == metrics["eval_examples"]
    assert report.metrics["loss"] == pytest.approx(metrics["eval_loss"], abs=1e-4)


def test_email_rouge_and_html_validity_through_the_eval_path(trained):
    from finetune.evaluation import run_eval

    email = run_eval(target_for("demo-email-lora", eval_limit=3), answer_fn=lambda ex, params: ex.reference)
    assert email.metrics["rouge1"] == pytest.approx(1.0) and email.metrics["rougeL"] == pytest.approx(1.0)

    answers = iter(
        [
            f"Here is your page:\n\n```html\n{VALID_PAGE}\n```\nEnjoy!",  # fenced, prose around it
            VALID_PAGE,  # a raw document
            "<html><body><div><p>no doctype, unclosed div</body></html>",
            "I cannot do that.",
        ]
    )
    html = run_eval(target_for("demo-html-qlora", eval_limit=4), answer_fn=lambda ex, params: next(answers))
    assert html.metrics["html_valid_fraction"] == pytest.approx(0.5)
    assert [e["scores"]["valid"] for e in html.examples] == [True, True, False, False]


# --------------------------------------------------------------------------------------------------
# pass@k: HumanEval and the sandbox, through the eval path


def humaneval_answer(example, *, whole: bool) -> str:
    problem = example.problem
    if whole:  # the whole function in a fence, as an instruction model answers
        return f"Sure:\n```python\n{problem['prompt'].lstrip()}{problem['canonical_solution']}```\n"
    return problem["canonical_solution"]  # a body that continues the prompt


def test_a_whole_function_indented_as_a_block_counts_as_the_whole_function():
    """Seed 002's format indents the response by four spaces; an answer that keeps that indentation for
    a whole function (often inside a code fence) must not be read as a function body."""
    from finetune.evaluation import code_from_answer, completion_for

    problem = {"entry_point": "add", "prompt": 'def add(a, b):\n    """Add."""\n'}
    fenced = " ```\n    def add(a, b):\n        return a + b\n    ```\n"
    assert completion_for(problem, code_from_answer(fenced)) == "\ndef add(a, b):\n    return a + b\n"
    body = "    return a + b\n"  # a body continues the prompt, indentation kept
    assert completion_for(problem, code_from_answer(body)) == body
    program = problem["prompt"] + completion_for(problem, code_from_answer(fenced))
    namespace: dict = {}
    exec(compile(program, "answer", "exec"), namespace)
    assert namespace["add"](2, 3) == 5


def test_humaneval_canonical_solutions_score_one_and_wrong_ones_zero(trained):
    from finetune.evaluation import run_eval, write_results
    from finetune.metrics import load_humaneval

    target = target_for("demo-python-lora", eval_set="humaneval", eval_limit=8, eval_seed=3)
    flip = iter(range(100))
    right = run_eval(target, answer_fn=lambda ex, params: humaneval_answer(ex, whole=next(flip) % 2 == 0))
    failures = {e["id"]: e["scores"]["detail"] for e in right.examples if not e["scores"]["passed"][0]}
    assert failures == {}
    assert right.metrics["pass@1"] == 1.0 and right.counts["answered"] == 8
    # The problems are asked in the run's prompt style (seed 002's template), signature included.
    example = right.examples[0]
    assert example["prompt"].startswith("### Instruction:") and "def " in example["prompt"]
    assert example["id"].startswith("HumanEval/")
    assert [e["id"] for e in right.examples] == [p["task_id"] for p in load_humaneval(limit=8, seed=3)]
    path = write_results(target, right)
    assert path.name == "eval-humaneval.json" and read_json(path)["metrics"]["pass@1"] == 1.0
    assert read_json(target.path / "babl.json")["metrics"]["eval"]["humaneval"]["pass@1"] == 1.0

    wrong = run_eval(target, answer_fn=lambda ex, params: "    return None\n")
    assert wrong.metrics["pass@1"] == 0.0
    assert {e["scores"]["status"][0] for e in wrong.examples} <= {"failed", "error"}


def test_runaway_and_networked_answers_fail_without_hanging(trained, listening_server):
    from finetune.evaluation import run_eval

    port, accepted = listening_server
    target = target_for("demo-python-lora", eval_set="humaneval", eval_limit=2, eval_seed=5)

    def answer(example, params):
        if answer.calls == 0:
            body = "    while True:\n        pass\n"
        else:  # would pass, had the connection gone through
            body = (
                f"    import socket\n    socket.create_connection(('127.0.0.1', {port}), timeout=2).close()\n"
                + example.problem["canonical_solution"]
            )
        answer.calls += 1
        return body

    answer.calls = 0
    started = time.monotonic()
    report = run_eval(target, answer_fn=answer, timeout_s=2.0)
    assert time.monotonic() - started < 20
    statuses = [e["scores"]["status"][0] for e in report.examples]
    assert statuses == ["timeout", "error"], [e["scores"]["detail"] for e in report.examples]
    assert report.metrics["pass@1"] == 0.0
    time.sleep(0.2)
    assert accepted == [], "a sandboxed answer reached the network"


def test_sampled_answers_give_pass_at_k_with_their_own_seeds(trained):
    from finetune.evaluation import run_eval

    with pytest.raises(ConfigError, match="eval_temperature above 0"):
        target_for("demo-code-mbpp", eval_samples=2)
    target = target_for(
        "demo-code-mbpp",
        eval_set="humaneval",
        eval_limit=2,
        eval_samples=2,
        eval_temperature=0.8,
        eval_seed=9,
    )
    seeds = []

    def answer(example, params):
        seeds.append(params.seed)
        right = len(seeds) % 2 == 1  # the first sample of each problem is right, the second wrong
        return example.problem["canonical_solution"] if right else "    return None\n"

    report = run_eval(target, answer_fn=answer)
    assert report.counts["answers_per_example"] == 2
    assert report.metrics["pass@1"] == pytest.approx(0.5)  # c = 1 of n = 2 for both problems
    assert [e["scores"]["passed"] for e in report.examples] == [[True, False], [True, False]]
    assert seeds == [9, 10, 11, 12] and report.generation["temperature"] == 0.8


def test_answers_asked_at_once_keep_their_order_and_seeds():
    """The model's answers are asked 4 at a time (they share the app's batch); the result is the same
    list, in the same order with the same seeds, as one at a time."""
    import threading

    from babl_core.engine.generation import GenerationParams
    from finetune.evaluation import Example, generate_answers

    examples = [Example(str(i), {}, f"prompt {i}", True, None) for i in range(6)]
    params = GenerationParams(temperature=0.7)
    at_once = threading.Barrier(4, timeout=10)  # breaks (BrokenBarrierError) unless 4 answer together

    def answer(example, run_params):
        if int(example.id) < 4 and run_params.seed % 2 == 0:
            at_once.wait()
        time.sleep(0.01 * (6 - int(example.id)))  # later examples finish first
        return f"{example.id}/{run_params.seed}"

    one_by_one = generate_answers(examples, lambda e, p: f"{e.id}/{p.seed}", params, samples=2, seed=3)
    together = generate_answers(examples, answer, params, samples=2, seed=3, workers=4)
    assert together == one_by_one == [[f"{i}/{3 + 2 * i}", f"{i}/{4 + 2 * i}"] for i in range(6)]


# --------------------------------------------------------------------------------------------------
# predict


def test_predict_rows_are_seeded_and_are_what_the_app_answers(trained):
    import asyncio

    from babl_core.engine.service import ChatService
    from finetune.prediction import predict

    first = predict(target_for("demo-qa-squad", eval_max_new_tokens=10), num=3)
    again = predict(target_for("demo-qa-squad", eval_max_new_tokens=10), num=3)
    other = predict(target_for("demo-qa-squad", eval_max_new_tokens=10, eval_seed=1), num=3)
    assert [p.id for p in first] == [p.id for p in again] and len({p.id for p in first}) == 3
    assert [p.id for p in first] != [p.id for p in other]
    assert [p.prediction for p in first] == [p.prediction for p in again]  # greedy: repeatable

    # The same question typed into the app gets the same prompt and the same answer.
    service = ChatService()
    for item in first:
        message = f"Question: {item.input['question']}\nContext: {item.input['context']}"
        reply = service.complete(
            "demo-qa-squad", [{"role": "user", "content": message}], max_new_tokens=10, temperature=0
        )
        text = asyncio.run(_collect(reply))
        assert reply.prompt.text == item.prompt
        assert text == item.prediction
        assert isinstance(item.reference, list) and item.reference


def test_predict_queries_without_context_and_as_json(trained, capsys):
    qa_query = "Question: Who wrote it?\nContext: Ada wrote it."
    command = ["predict", "--adapter", "demo-qa-squad", "--query", qa_query, "--query", "Where is Paris?"]
    assert main([*command, "--json", "--eval_max_new_tokens", "6"]) == EXIT_OK
    items = json.loads(capsys.readouterr().out)
    assert [i["prompt"] for i in items] == [
        "question: Who wrote it? context: Ada wrote it.",
        "question: Where is Paris?",
    ]
    assert all(i["reference"] is None and isinstance(i["prediction"], str) for i in items)

    assert (
        main(["predict", "--adapter", "demo-email-lora", "--num", "2", "--eval_max_new_tokens", "6"])
        == EXIT_OK
    )
    text = capsys.readouterr().out
    assert text.count("── ") == 2 and text.count("\ninput\n") == 2
    assert text.count("\nreference\n") == 2 and text.count("\nprediction\n") == 2
    assert "key_points: " in text


async def _collect(reply) -> str:
    return "".join([chunk async for chunk in reply])


# --------------------------------------------------------------------------------------------------
# errors


def test_eval_errors_name_the_fix(trained, tmp_path, capsys):
    assert main(["eval", "--adapter", "no-such-run"]) == EXIT_USAGE
    assert "no trained model there" in capsys.readouterr().err
    assert main(["eval"]) == EXIT_USAGE
    assert "name what to evaluate: --adapter DIR_OR_RUN_NAME, or --config FILE" in capsys.readouterr().err
    assert main(["eval", "--adapter", "demo-qa-squad", "--humaneval"]) == EXIT_USAGE
    assert "humaneval is a Python benchmark" in capsys.readouterr().err
    assert main(["eval", "--adapter", "demo-qa-squad", "--eval_limt", "3"]) == EXIT_USAGE
    assert "did you mean --eval_limit" in capsys.readouterr().err
    # An adapter trained elsewhere (no finetune.yaml): its data set must be named by a config.
    folder = tmp_path / "foreign"
    folder.mkdir()
    source = trained / "adapters" / "demo-qa-squad"
    for name in ("adapter_config.json", "adapter_model.safetensors", "babl.json"):
        (folder / name).write_bytes((source / name).read_bytes())
    assert main(["eval", "--adapter", str(folder)]) == EXIT_USAGE
    assert "has no finetune.yaml" in capsys.readouterr().err
    command = ["eval", "--adapter", str(folder), "--config", "configs/finetune/demo-qa.yaml", "--limit", "1"]
    assert main([*command, "--eval_max_new_tokens", "4"]) == EXIT_OK
    assert read_json(folder / "eval.json")["counts"]["answered"] == 1
    capsys.readouterr()
    # A recipe whose run was never trained.
    never = tmp_path / "never.yaml"
    never.write_text(
        (CONFIGS / "demo-qa.yaml").read_text().replace("run_name: demo-qa-squad", "run_name: never")
    )
    assert main(["eval", "--config", str(never)]) == EXIT_USAGE
    assert "holds no trained model yet; train it first" in capsys.readouterr().err


def test_pass_at_k_without_the_sandbox_is_one_line_before_loading_unless_unsafe(trained, capsys, monkeypatch):
    from finetune import evaluation, metrics
    from finetune.evaluation import run_eval

    def no_loading(target):
        raise AssertionError("the model was loaded before the sandbox was checked")

    monkeypatch.setattr(
        metrics, "sandbox_problem", lambda: "bubblewrap is not installed (apt-get install bubblewrap)"
    )
    monkeypatch.setattr(evaluation, "load_target_model", no_loading)
    assert main(["eval", "--adapter", "demo-python-lora", "--limit", "1"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "bubblewrap is not installed" in err[0] and "--eval_unsafe_no_sandbox true" in err[0]
    monkeypatch.undo()

    # With the explicit flag the answers are scored, the report says how.
    monkeypatch.setattr(
        metrics, "sandbox_problem", lambda: "bubblewrap is not installed (apt-get install bubblewrap)"
    )
    target = target_for("demo-python-lora", eval_set="humaneval", eval_limit=1, eval_unsafe_no_sandbox=True)
    report = run_eval(target, answer_fn=lambda example, params: humaneval_answer(example, whole=False))
    assert (report.metrics["pass@1"], report.metrics["sandbox"]) == (1.0, "unsafe")
    assert any("WITHOUT the sandbox" in note for note in report.notes)
