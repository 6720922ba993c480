"""Tests for finetune.metrics: known answers computed by hand, and the code sandbox's guarantees."""

from __future__ import annotations

import json
import logging
import re
import socket
import time
from pathlib import Path

import pytest

from finetune import metrics

SAMPLES = Path(__file__).resolve().parent.parent / "finetune" / "samples"


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


# --------------------------------------------------------------------------- sandbox


def test_passing_failing_and_erroring_programs():
    assert metrics.run_code_tests("assert sum([1, 2]) == 3").status == "passed"
    failed = metrics.run_code_tests("assert sum([1, 2]) == 4, 'wrong sum'")
    assert (failed.passed, failed.status) == (False, "failed")
    assert "wrong sum" in failed.detail
    error = metrics.run_code_tests("1 / 0")
    assert (error.passed, error.status) == (False, "error")
    assert "ZeroDivisionError" in error.detail
    assert metrics.run_code_tests("def broken(:\n    pass").status == "error"
    # Leaving early is not passing, whether politely or not.
    assert metrics.run_code_tests("raise SystemExit(0)\nassert False").status == "error"
    assert metrics.run_code_tests("import os\nos._exit(0)\nassert False").status == "error"
    forged = metrics.run_code_tests("import os, sys\nopen(sys.argv[2], 'w').write('{')\nos._exit(0)")
    assert (forged.status, forged.detail.split(" (")[0]) == ("error", "unreadable result file")


@pytest.mark.parametrize(
    "program",
    ["while True:\n    pass\n", "import time\nwhile True:\n    time.sleep(0.05)\n"],
    ids=["busy", "sleeping"],
)
def test_infinite_loop_times_out_in_bounded_time(program):
    started = time.monotonic()
    result = metrics.run_code_tests(program, timeout_s=1.0)
    elapsed = time.monotonic() - started
    assert (result.passed, result.status) == (False, "timeout")
    assert elapsed < 4.0


def test_timeout_kills_processes_the_program_started():
    program = (
        "import subprocess, time\n"
        "child = subprocess.Popen(['sleep', '60'])\n"
        "print(child.pid, flush=True)\n"
        "open('pid.txt', 'w').write(str(child.pid))\n"
        "raise AssertionError('child pid ' + str(child.pid))\n"
    )
    result = metrics.run_code_tests(program, timeout_s=5.0)
    if result.guard == "audit-hook":
        # Without a network namespace (unprivileged CI), the fallback refuses to start processes at all.
        assert result.status == "error"
        assert "subprocess.Popen is not allowed" in result.detail
        return
    assert result.status == "failed"
    pid = int(re.search(r"child pid (\d+)", result.detail).group(1))
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split()[2]
        except FileNotFoundError:
            break  # reaped: gone entirely
        if state == "Z":
            break  # killed, waiting for PID 1 to reap it
        time.sleep(0.05)
    else:
        pytest.fail(f"the program's child {pid} was still running after the sandbox returned")


def test_resource_limits_and_environment(monkeypatch):
    memory = metrics.run_code_tests("block = bytearray(3 * 1024**3)", memory_mb=512)
    assert memory.status == "error"
    assert "MemoryError" in memory.detail
    big_file = metrics.run_code_tests("open('big.bin', 'wb').write(b'x' * (4 * 1024 * 1024))", max_file_mb=1)
    assert big_file.status == "error"
    assert "File too large" in big_file.detail

    monkeypatch.setenv("BABL_SECRET_PROBE", "do-not-leak")
    probe = metrics.run_code_tests(
        "import json, os\nraise AssertionError('ENV' + json.dumps([os.getcwd(), sorted(os.environ)]))"
    )
    cwd, names = json.loads(probe.detail.rsplit("AssertionError: ENV", 1)[1].strip().splitlines()[0])
    assert "BABL_SECRET_PROBE" not in names
    assert set(names) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "LC_CTYPE"}
    assert Path(cwd).name.startswith("babl-sandbox-")
    assert not Path(cwd).exists(), "the temporary directory must be removed"


@pytest.fixture
def listening_server(listening_server):
    """conftest's recording server, after a control connection from this process: "no connection"
    below then means the sandbox blocked it, not that the server was deaf."""
    port, accepted = listening_server
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    deadline = time.monotonic() + 2
    while not accepted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(accepted) == 1
    return listening_server


# If the connection went through, each program would run to its end and pass.
CONNECTING_PROGRAMS = {
    "create_connection": "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'hi')\n",
    "raw_connect": "import socket\ns = socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))\n",
    "via_subprocess": (
        "import subprocess, sys\n"
        "code = \"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)\"\n"
        "subprocess.run([sys.executable, '-c', code], check=True)\n"
    ),
}


@pytest.mark.parametrize("guard", ["auto", "audit-hook"])
@pytest.mark.parametrize("how", sorted(CONNECTING_PROGRAMS))
def test_network_connection_fails_and_never_reaches_server(listening_server, guard, how):
    port, accepted = listening_server
    result = metrics.run_code_tests(
        CONNECTING_PROGRAMS[how].format(port=port), timeout_s=5.0, network_guard=guard
    )
    assert not result.passed
    assert result.status == "error", result.detail
    time.sleep(0.2)  # give a connection that slipped through time to be accepted
    assert len(accepted) == 1, f"the sandboxed program reached the server ({result.guard})"


def test_audit_hook_is_the_fallback_when_unshare_fails(monkeypatch, caplog):
    monkeypatch.setattr(metrics, "_unshare_works", lambda guard: False)
    monkeypatch.setattr(metrics, "_fallback_warned", False)
    with caplog.at_level(logging.WARNING, logger="finetune.metrics"):
        assert metrics.select_network_guard("auto") == "audit-hook"
    assert "audit hook" in caplog.text
    assert metrics.run_code_tests("assert True").guard == "audit-hook"
    with pytest.raises(RuntimeError, match="network_guard='auto' or 'audit-hook'"):
        metrics.select_network_guard("unshare-net")
    with pytest.raises(ValueError, match="is not one of"):
        metrics.select_network_guard("none")


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
