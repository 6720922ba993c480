"""Tests for finetune.metrics: known answers computed by hand, and the code sandbox's guarantees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune import metrics

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLES = REPO_ROOT / "finetune" / "samples"


# --------------------------------------------------------------------------- SQuAD


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  The  Quick, brown FOX!  ", "quick brown fox"),
        ("An apple a day", "apple day"),
        ("theatre", "theatre"),  # articles only as whole words
        ("Rock-n-roll", "rocknroll"),  # punctuation is removed, not replaced by a space
        ("the end.", "end"),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert metrics.normalize_answer(text) == expected


def test_squad_em_f1_by_hand():
    predictions = ["The Eiffel Tower", "in Paris, France", "1889", "blue sky"]
    references = [["Eiffel Tower", "the tower"], ["Paris"], ["in 1889", "1889"], ["green grass"]]
    # 1: "eiffel tower" == "eiffel tower"                      EM 1, F1 1
    # 2: pred {in, paris, france}, ref {paris}: overlap 1,
    #    P = 1/3, R = 1, F1 = 2 * (1/3) / (4/3) = 0.5           EM 0, F1 0.5
    # 3: matches the second reference exactly                   EM 1, F1 1 (max over references)
    # 4: no overlap                                             EM 0, F1 0
    # mean EM = 2/4 = 0.5, mean F1 = (1 + 0.5 + 1 + 0) / 4 = 0.625
    scores = metrics.squad_em_f1(predictions, references)
    assert scores["exact_match"] == pytest.approx(0.5)
    assert scores["f1"] == pytest.approx(0.625)


def test_squad_f1_counts_token_bags():
    # pred "the cat the cat sat" -> [cat, cat, sat]; ref "a cat sat on the mat" -> [cat, sat, on, mat]
    # overlap = min(2, 1) cat + 1 sat = 2; P = 2/3, R = 2/4; F1 = 2 * (1/3) / (7/6) = 4/7
    scores = metrics.squad_em_f1(["the cat the cat sat"], [["a cat sat on the mat"]])
    assert scores["f1"] == pytest.approx(4 / 7)
    assert scores["exact_match"] == 0.0


def test_squad_no_answer_references():
    # An empty reference list is "no answer": only an empty prediction matches it.
    assert metrics.squad_em_f1([""], [[]]) == {"exact_match": 1.0, "f1": 1.0}
    assert metrics.squad_em_f1(["Paris"], [[]]) == {"exact_match": 0.0, "f1": 0.0}


def test_squad_rejects_bad_input():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        metrics.squad_em_f1(["a", "b"], [["a"]])
    with pytest.raises(TypeError, match="list of answers"):
        metrics.squad_em_f1(["a"], ["a"])


# --------------------------------------------------------------------------- ROUGE


def test_rouge_identical_and_disjoint():
    same = "Please send the quarterly report by Friday."
    assert metrics.rouge_scores([same], [same]) == pytest.approx(
        {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    )
    assert metrics.rouge_scores(["budget meeting tomorrow"], ["holiday party invitation"]) == pytest.approx(
        {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    )
    # Averaged over examples: (1 + 0) / 2.
    both = metrics.rouge_scores([same, "budget meeting"], [same, "holiday party"])
    assert both == pytest.approx({"rouge1": 0.5, "rouge2": 0.5, "rougeL": 0.5})


def test_rouge_partial_by_hand():
    # Tokens after lower-casing and Porter stemming (words over 3 letters):
    #   pred: the meet is move to fridai   (6)     ref: meet move to mondai   (4)
    # ROUGE-1: overlap {meet, move, to} = 3; P = 3/6, R = 3/4, F = 2 * .5 * .75 / 1.25 = 0.6
    # ROUGE-2: pred bigrams 5, ref bigrams 3, shared {move to} = 1; P = 1/5, R = 1/3, F = 0.25
    # ROUGE-L: LCS = meet move to = 3, same P and R as ROUGE-1: 0.6
    scores = metrics.rouge_scores(["The meeting is moved to Friday"], ["meeting moved to Monday"])
    assert scores == pytest.approx({"rouge1": 0.6, "rouge2": 0.25, "rougeL": 0.6})


def test_rouge_uses_stemming_and_best_reference():
    # "running cats" and "run cat" only match once stemmed.
    assert metrics.rouge_scores(["running cats"], ["run cat"])["rouge1"] == pytest.approx(1.0)
    multi = metrics.rouge_scores(["budget review"], [["holiday party", "budget review"]])
    assert multi["rouge1"] == pytest.approx(1.0)


# --------------------------------------------------------------------------- pass@k estimator


def test_pass_at_k_by_hand():
    assert metrics.pass_at_k(5, 2, 1) == pytest.approx(1 - 3 / 5)  # 1 - C(3,1)/C(5,1) = 0.4
    assert metrics.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2) = 0.7
    assert metrics.pass_at_k(4, 0, 2) == 0.0
    assert metrics.pass_at_k(3, 3, 2) == 1.0  # C(0,2) = 0
    assert metrics.pass_at_k(10, 1, 10) == 1.0  # drawing all 10 always includes the good one
    assert metrics.pass_at_k(200, 10, 1) == pytest.approx(10 / 200)  # pass@1 is the pass rate
    # Two problems: 1 of 2 passes (pass@1 0.5), 0 of 2 pass (0.0) -> mean 0.25.
    assert metrics.mean_pass_at_k([[True, False], [False, False]], 1) == pytest.approx(0.25)


def test_pass_at_k_rejects_impossible_k():
    with pytest.raises(ValueError, match="k=3 needs 1 <= k <= n=2"):
        metrics.pass_at_k(2, 1, 3)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        metrics.pass_at_k(2, 3, 1)


# --------------------------------------------------------------------------- HumanEval and MBPP


def test_load_humaneval():
    problems = metrics.load_humaneval()
    assert len(problems) == 164
    assert {"task_id", "prompt", "canonical_solution", "test", "entry_point"} <= problems[0].keys()
    sample = metrics.load_humaneval(limit=20, seed=7)
    assert [p["task_id"] for p in sample] == [p["task_id"] for p in metrics.load_humaneval(limit=20, seed=7)]
    assert len({p["task_id"] for p in sample}) == 20
    assert [p["task_id"] for p in sample] != [p["task_id"] for p in metrics.load_humaneval(limit=20, seed=8)]


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail():
    problems = metrics.load_humaneval(limit=20, seed=1234)
    right = metrics.evaluate_code(problems, [[p["canonical_solution"]] for p in problems], timeout_s=10)
    failures = {p["task_id"]: p["results"][0]["detail"] for p in right["problems"] if not p["passed"][0]}
    assert failures == {}
    assert right["pass@1"] == 1.0
    assert right["num_problems"] == 20

    wrong = metrics.evaluate_code(
        problems, [["    raise NotImplementedError\n"] for _ in problems], timeout_s=10
    )
    assert wrong["pass@1"] == 0.0
    assert {r["status"] for p in wrong["problems"] for r in p["results"]} == {"error"}


def test_evaluate_code_pass_at_k_over_several_completions():
    problems = {p["task_id"]: p for p in metrics.load_humaneval()}
    chosen = [problems["HumanEval/0"], problems["HumanEval/2"]]
    # HumanEval/0 asks whether two numbers are closer than a threshold: "always False" fails an assert.
    completions = [
        [chosen[0]["canonical_solution"], "    return False\n"],
        ["    return 0.0\n", "    return -1.0\n"],
    ]
    report = metrics.evaluate_code(chosen, completions, k=(1, 2), timeout_s=10)
    # Problem 0: n=2, c=1 -> pass@1 = 0.5, pass@2 = 1; problem 1: c=0 -> 0 and 0.
    assert report["pass@1"] == pytest.approx(0.25)
    assert report["pass@2"] == pytest.approx(0.5)
    assert report["problems"][0]["passed"] == [True, False]
    assert report["problems"][0]["results"][1]["status"] == "failed"
    with pytest.raises(ValueError, match="k=3 needs at least 3 completions"):
        metrics.evaluate_code(chosen, completions, k=(3,))


def test_evaluate_code_on_mbpp_shaped_problems():
    rows = [
        json.loads(line) for line in (SAMPLES / "mbpp.jsonl").read_text(encoding="utf-8").splitlines()[:3]
    ]
    report = metrics.evaluate_code(
        rows, [[row["code"], "def unrelated():\n    return None\n"] for row in rows]
    )
    assert [p["passed"] for p in report["problems"]] == [[True, False]] * 3
    assert report["pass@1"] == pytest.approx(0.5)
    assert [p["task_id"] for p in report["problems"]] == [row["task_id"] for row in rows]


def test_program_for_rejects_unknown_problem_shape():
    with pytest.raises(ValueError, match="neither the HumanEval keys"):
        metrics.program_for({"question": "?"}, "pass")


@pytest.mark.slow
def test_all_humaneval_canonical_solutions_pass():
    problems = metrics.load_humaneval()
    report = metrics.evaluate_code(problems, [[p["canonical_solution"]] for p in problems], timeout_s=10)
    failures = {p["task_id"]: p["results"][0]["detail"] for p in report["problems"] if not p["passed"][0]}
    assert failures == {}
    assert report["pass@1"] == 1.0


# --------------------------------------------------------------------------- HTML

VALID_PAGE = (
    '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>Hi</title>\n</head>\n'
    '<body>\n<main><h1>Hello</h1><p>One<br>two</p><img src="a.png" alt=""></main>\n</body>\n</html>\n'
)
HEAD = "<!DOCTYPE html><html><head><title>t</title></head>"


@pytest.mark.parametrize(
    ("document", "error"),
    [
        (HEAD + "<body><div><p>open div</p></body></html>", "parse error"),  # unclosed tag
        (HEAD + "<body><section><p>eof", "parse error"),  # unclosed at end of file
        (HEAD + "<body><p>text</p></span></body></html>", "parse error"),  # stray end tag
        ("<html><head><title>t</title></head><body><p>x</p></body></html>", "parse error"),  # no doctype
        (HEAD + "<body></body></html>", "no elements"),  # empty body
        (HEAD + "<body>only text</body></html>", "no elements"),  # text but no element
        ("", "parse error"),
    ],
    ids=["unclosed-div", "eof", "stray-end-tag", "no-doctype", "empty-body", "text-only", "empty"],
)
def test_html_document_errors(document, error):
    assert error in metrics.html_document_error(document)


def test_html_validity_fraction():
    broken = HEAD + "<body><p>text</p></span></body></html>"
    report = metrics.html_validity([VALID_PAGE, broken, VALID_PAGE, HEAD + "<body></body></html>"])
    assert report["valid_fraction"] == pytest.approx(0.5)
    assert [d["valid"] for d in report["documents"]] == [True, False, True, False]
    assert report["documents"][0]["error"] is None
    assert "span" in report["documents"][1]["error"]
