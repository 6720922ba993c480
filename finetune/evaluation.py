"""Evaluate a trained adapter: loss and perplexity on the held-out rows, and the task's own metric on
answers generated the way the app generates them.

What is measured is what users get:
- the model is loaded as the app serves it: the catalog entry the adapter fills, or the entry the app
  lists it as (same base, quantization and dtype), through `babl_core.engine.loading`;
- prompts come from `babl_core.engine.prompts` (the style's `training_pair`, whose prompt equals the chat
  rendering of the same content; `predict`'s own queries go through `babl_core.engine.service.render_prompt`);
- answers are decoded by `babl_core.engine.batching.stream` with the entry's settings as
  `babl_core.engine.service.params_for` merges them (max_new_tokens, repetition penalty, the style's stop strings),
  except that they are greedy unless `eval_temperature` says otherwise, so a score can be repeated.

Task metrics (`finetune.metrics`): qa → SQuAD exact match and F1 against every accepted answer; email →
ROUGE-1/2/L; python and code → pass@k, each answer's code run against the problem's tests in the
sandbox (rows with a `test_list` column, MBPP-style, or HumanEval with `eval_set: humaneval`); html →
the fraction of answers that are valid HTML5 documents; chat → loss only.

Beside the adapter, the base model is measured the same way (`eval_base`, on by default): the same
loaded weights with the adapter switched off (`LoadedModel.with_adapter(None)`), the same rows, prompts,
generation settings and scoring, so "base" and "adapter" differ only by what training changed.

Results go to `<adapter>/eval.json` (`eval-humaneval.json` for HumanEval; `base_metrics` and each
example's `base_answers` beside the adapter's), into `babl.json`'s `metrics["eval"][<eval set>]` (each
metric with `base_<name>` beside it) and its flat headline keys (`pass_at_1`/`base_pass_at_1`, …; see
`EvalReport.headline`), rewritten atomically so the app never reads half a file, and to the terminal as
a table with a base, an adapter and a change column.
"""

from __future__ import annotations

import json
import logging
import math
import re
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from babl_core import settings
from babl_core.engine import words
from finetune.config import FinetuneConfig, build_config, read_yaml
from finetune.files import RunNotFound, find_run_dir, write_json_atomic
from finetune.model_card import TASK_METRIC_NAMES

log = logging.getLogger("finetune")

EVAL_FILE = "eval.json"
CODE_TIMEOUT_S = 10.0  # per program; HumanEval's slowest canonical solutions take about a second
PASS_AT = (1, 10, 100)  # the k values reported, up to the answers generated per problem
SCORED_TASKS = ("qa", "email", "python", "code", "html")  # chat: loss and perplexity only
HUMANEVAL_INSTRUCTION = (
    "Complete this Python function. Answer with the whole function, its signature included."
)


class EvalError(ValueError):
    """Nothing to evaluate where asked, or not in the way asked; the message says how to fix it."""


# --------------------------------------------------------------------------------------------------
# What is evaluated


@dataclass
class EvalTarget:
    """A trained model to evaluate: where it is, how it was trained and how the app serves it."""

    path: Path
    """The adapter directory (or a full fine-tune's model directory)."""
    config: FinetuneConfig
    """The run's own settings (its saved finetune.yaml) with the eval settings asked for on top."""
    spec: Any
    """The `ModelSpec` the app serves it with."""
    info: Any
    """Its `babl.json` as a `babl_core.engine.catalog.AdapterInfo`."""

    @property
    def name(self) -> str:
        return self.info.id


def resolve_target(
    *, adapter: str | None = None, config_path: str | Path | None = None, overrides: dict | None = None
) -> EvalTarget:
    """Find a trained model by its directory or run name, or by the config that trained it.

    The training settings (data set, split, prompt style, lengths) are the run's own, read from the
    `finetune.yaml` saved next to the adapter, so the held-out rows are the ones training held out.
    The eval settings come from that file, then from `config_path` when given, then `overrides`.

    Args:
        adapter: a run directory, or a run name under models/adapters/ (or models/finetuned/).
        config_path: the recipe YAML that trained it: it finds the run when `adapter` is not given, and
            names the data set of an adapter that has no finetune.yaml (one not trained by finetune).
        overrides: eval settings from the command line (`{"eval_limit": "20", ...}`).

    Raises:
        EvalError: no trained model there, or no settings to evaluate it with.
        ConfigError: the settings have problems (each with its fix).
    """
    from babl_core.engine.catalog import Catalog, read_adapter_info
    from finetune.config import EvalArgs, load_config

    if adapter is None and config_path is None:
        raise EvalError("name what to evaluate: --adapter DIR_OR_RUN_NAME, or --config FILE")
    eval_keys = {f for f in EvalArgs.__dataclass_fields__}
    file_values: dict = {}
    if config_path is not None:
        located = load_config(config_path, overrides, check_environment=False)
        file_values = read_yaml(Path(config_path))
    if adapter is not None:
        try:
            path = find_run_dir(adapter)  # a run name, or its folder
        except RunNotFound as exc:
            raise EvalError(str(exc)) from None
    else:
        path = located.adapter_path()
        if not (path / "babl.json").is_file():
            raise EvalError(
                f"{settings.portable_path(path)} holds no trained model yet; train it first: "
                f"python -m finetune train --config {located.source}"
            )
    saved = path / "finetune.yaml"
    if saved.is_file():
        values = read_yaml(saved)
        source = settings.portable_path(saved)
    elif config_path is not None:
        values, source = file_values, str(config_path)
    else:
        raise EvalError(
            f"{settings.portable_path(path)} has no finetune.yaml (it was not trained by finetune), so its "
            "data set is unknown; add --config FILE, a recipe naming the data set and its columns"
        )
    values = {**values, **{k: v for k, v in file_values.items() if k in eval_keys}}
    config, problems = build_config(values, overrides=overrides, source=source)
    if problems:
        from finetune.config import ConfigError

        raise ConfigError(source, problems)
    try:
        info = read_adapter_info(path)
    except ValueError as exc:
        raise EvalError(f"{settings.portable_path(path)}: {exc}") from exc

    spec = Catalog.load().spec_for_trained(path, info, kind=config.model.kind)
    return EvalTarget(path=path, config=config, spec=spec, info=info)


# --------------------------------------------------------------------------------------------------
# Examples: what the model is asked, and what a right answer looks like


@dataclass
class Example:
    """One question for the model."""

    id: str
    fields: dict[str, str | None]
    """The prompt style's fields as read from the row (what `predict` shows as the input)."""
    prompt: str
    """The text the model is given, rendered by the prompt style."""
    add_special_tokens: bool
    reference: str | list[str] | None
    """The expected answer (qa: every accepted answer); None for HumanEval and custom queries."""
    problem: dict | None = None
    """python/code: the row or HumanEval problem whose tests an answer must pass."""


def target_field(style) -> str:
    """The style's answer field (the last required one: output, response, body, answer, code)."""
    return style.required_fields[-1]


def _all_answers(row: dict, path: str) -> list[str] | None:
    """Every accepted answer when the column path picks one of several (`answers.text.0`)."""
    from finetune.data import value_at

    head, _, last = path.rpartition(".")
    if head and last.lstrip("-").isdigit():
        value = value_at(row, head)
        if isinstance(value, (list, tuple)) and value:
            return [str(v) for v in value]
    return None


def examples_from_rows(
    rows: list[dict], config: FinetuneConfig, tokenizer, *, style, columns: dict[str, str]
) -> tuple[list[Example], int]:
    """Examples from raw data set rows, rendered as training rendered them; returns (examples, left out).

    Rows with an empty required field are left out, as training leaves them out.
    """
    from finetune.data import example_fields

    answer = target_field(style)
    add_special_tokens = not style.uses_bos_in_text(tokenizer)
    examples, left_out = [], 0
    for index, row in enumerate(rows):
        fields = example_fields(row, columns, with_context=config.data.with_context)
        if any(not (fields.get(name) or "").strip() for name in style.required_fields):
            left_out += 1
            continue
        prompt, _ = style.training_pair(fields, tokenizer)
        reference: str | list[str] | None = fields[answer]
        if config.run.task == "qa":
            reference = _all_answers(row, columns[answer]) or [fields[answer]]
        problem = row if row.get("test_list") else None
        row_id = row.get("id", row.get("task_id", index))
        examples.append(
            Example(
                id=str(row_id),
                fields={k: v for k, v in fields.items() if k != answer},
                prompt=prompt,
                add_special_tokens=add_special_tokens,
                reference=reference,
                problem=problem,
            )
        )
    return examples, left_out


def humaneval_examples(config: FinetuneConfig, tokenizer, *, style) -> list[Example]:
    """HumanEval's problems (a seeded sample of `eval_limit`), asked in the run's prompt style.

    The instruction and the function's signature and docstring fill the style's first field (an
    instruction style with an `input` field gets the code there); the model answers with the function.
    """
    from finetune.metrics import load_humaneval

    problems = load_humaneval(limit=config.eval.eval_limit, seed=config.eval.eval_seed)
    first, answer = style.required_fields[0], target_field(style)
    add_special_tokens = not style.uses_bos_in_text(tokenizer)
    examples = []
    for problem in problems:
        code = problem["prompt"].strip("\n")
        if "input" in style.optional_fields:
            fields = {first: HUMANEVAL_INSTRUCTION, "input": code}
        else:
            fields = {first: f"{HUMANEVAL_INSTRUCTION}\n\n{code}"}
        prompt, _ = style.training_pair({**fields, answer: ""}, tokenizer)
        examples.append(
            Example(problem["task_id"], fields, prompt, add_special_tokens, None, problem=problem)
        )
    return examples


# --------------------------------------------------------------------------------------------------
# Answers


def generation_params(target: EvalTarget):
    """The entry's generation settings as the app merges them, with the eval settings on top."""
    from babl_core.engine.service import params_for

    evaluation = target.config.eval
    return params_for(
        target.spec,
        None,
        max_new_tokens=evaluation.eval_max_new_tokens,
        temperature=evaluation.eval_temperature,
    )


def fits_context(loaded, example: Example, max_new_tokens: int) -> bool:
    """Whether the app would accept this prompt: it and the answer fit the model's context."""
    from babl_core.engine.prompts import count_tokens

    count = count_tokens(loaded.tokenizer, example.prompt, add_special_tokens=example.add_special_tokens)
    available = loaded.context_length - (0 if loaded.kind == "seq2seq" else max_new_tokens)
    return count <= available


AnswerFn = Callable[[Example, Any], str]
"""(example, GenerationParams) -> the model's answer text."""


def model_answer_fn(loaded) -> AnswerFn:
    """Answers from `loaded` through the app's generation path (`babl_core.engine.batching.stream`)."""
    from babl_core.engine.batching import generate_text

    def answer(example: Example, params) -> str:
        return generate_text(loaded, example.prompt, params, add_special_tokens=example.add_special_tokens)

    return answer


EVAL_CONCURRENCY = 4
"""Answers asked at once from the model (not from a test's answer_fn): they share the app's continuous
batch (`babl_core.engine.batching`), each decoding step serving all of them; on 2 CPU cores 4 rows give
about 3x the tokens/s of one (ENVIRONMENT.md), so a 135M model's eval fits its time budget."""


def model_concurrency(loaded) -> int:
    """How many answers to ask `loaded` at once: EVAL_CONCURRENCY when its requests share a batch."""
    from babl_core.engine import batching

    if loaded.kind != "causal" or not batching.batching_enabled():
        return 1
    if batching.batching_unsupported(loaded.model):
        return 1
    return max(1, min(EVAL_CONCURRENCY, batching.max_rows()))


def generate_answers(
    examples: list[Example], answer_fn: AnswerFn, params, *, samples: int = 1, seed: int = 0,
    desc: str = "answering", workers: int = 1,
) -> list[list[str]]:  # fmt: skip
    """`samples` answers per example, with a progress bar. Sampled answers get seeds from `seed`, so a
    run repeats exactly, whatever `workers` (how many answers are asked at once; order is kept)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    jobs = []
    for index, example in enumerate(examples):
        for sample in range(samples):
            run_params = params
            if params.temperature > 0:
                run_params = replace(params, seed=seed + index * samples + sample)
            jobs.append((example, run_params))
    with tqdm(total=len(jobs), desc=desc, unit="answer", dynamic_ncols=True) as bar:

        def answer(job) -> str:
            text = answer_fn(*job)
            bar.update()
            return text

        if workers > 1 and len(jobs) > 1:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="eval-answer") as pool:
                flat = list(pool.map(answer, jobs))
        else:
            flat = [answer(job) for job in jobs]
    return [flat[i * samples : (i + 1) * samples] for i in range(len(examples))]


_CODE_FENCE = re.compile(
    r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:\n[ \t]*```|\Z)", re.DOTALL | re.IGNORECASE
)


def code_from_answer(text: str) -> str:
    """The code in an answer: the first ```python (or unlabelled) fenced block, else the whole text."""
    match = _CODE_FENCE.search(text)
    code = match.group(1) if match else text
    return code.rstrip() + "\n"


def completion_for(problem: dict, code: str) -> str:
    """What `metrics.program_for` appends to a problem for this answer's code.

    HumanEval: an answer that defines the entry point is a whole function, placed after the prompt (the
    prompt's stub and imports stay, the answer's definition replaces the stub); any other answer
    continues the prompt, as a function body. MBPP-style rows: the code is the whole solution.
    """
    if "entry_point" in problem:
        defines = rf"^def\s+{re.escape(problem['entry_point'])}\s*\("
        if re.search(defines, code, re.MULTILINE):
            return "\n" + code
        # A whole function indented as a block (seed 002's format indents the response by four spaces,
        # and models often keep that inside a code fence) is still the whole function.
        dedented = textwrap.dedent(code)
        if dedented != code and re.match(defines, dedented.lstrip("\n")):
            return "\n" + dedented
        return code
    return code


# --------------------------------------------------------------------------------------------------
# Scores


def score_answers(
    task: str,
    examples: list[Example],
    answers: list[list[str]],
    *,
    timeout_s: float = CODE_TIMEOUT_S,
    unsafe: bool = False,
) -> tuple[dict, list[dict], list[str]]:
    """The task metric over the answers; returns (summary, per-example scores, notes).

    Args:
        task: the run's task (qa, email, python, code, html; chat has no task metric).
        examples: what was asked.
        answers: per example, its answers (several only for pass@k).
        timeout_s: per program, for code tasks.
        unsafe: run code without the sandbox where it cannot start (`metrics.run_code_tests`).
    """
    from babl_core.web.render import extract_html
    from finetune import metrics

    firsts = [a[0] for a in answers]
    notes: list[str] = []
    if not examples:
        return {}, [], ["no examples to score"]
    if task == "qa":
        references = [e.reference if isinstance(e.reference, list) else [e.reference or ""] for e in examples]
        predictions = [a.strip() for a in firsts]
        per = [metrics.squad_em_f1([p], [r]) for p, r in zip(predictions, references, strict=True)]
        return metrics.squad_em_f1(predictions, references), per, notes
    if task == "email":
        references = [e.reference or "" for e in examples]
        per = [metrics.rouge_scores([p], [r]) for p, r in zip(firsts, references, strict=True)]
        return metrics.rouge_scores(firsts, references), per, notes
    if task == "html":
        documents = [extract_html(a, partial=True) or a for a in firsts]
        report = metrics.html_validity(documents)
        return {"html_valid_fraction": report["valid_fraction"]}, report["documents"], notes
    if task in ("python", "code"):
        tested = [i for i, e in enumerate(examples) if e.problem is not None]
        if not tested:
            notes.append(
                "no pass@k: the held-out rows have no tests (no test_list column); "
                "evaluate on HumanEval instead: --humaneval (eval_set: humaneval)"
            )
            return {}, [{} for _ in examples], notes
        problems = [examples[i].problem for i in tested]
        completions = [
            [completion_for(examples[i].problem, code_from_answer(a)) for a in answers[i]] for i in tested
        ]
        n = min(len(c) for c in completions)
        report = metrics.evaluate_code(
            problems, completions, k=[k for k in PASS_AT if k <= n], timeout_s=timeout_s, unsafe=unsafe
        )
        summary = {key: value for key, value in report.items() if key.startswith("pass@")}
        summary["sandbox"] = report["sandbox"]
        if report["sandbox"] == "unsafe":
            notes.append("the answers' code ran WITHOUT the sandbox (eval_unsafe_no_sandbox)")
        per: list[dict] = [{} for _ in examples]
        for i, problem_report in zip(tested, report["problems"], strict=True):
            per[i] = {
                "passed": problem_report["passed"],
                "status": [r["status"] for r in problem_report["results"]],
                "detail": [r["detail"][-300:] for r in problem_report["results"]],
            }
        if len(tested) < len(examples):
            notes.append(f"pass@k over the {len(tested)} of {len(examples)} rows that have tests")
        return summary, per, notes
    return {}, [{} for _ in examples], notes


def eval_loss(loaded, rows: list[dict], config: FinetuneConfig, *, style, columns: dict[str, str]) -> dict:
    """Mean loss per answer token on the held-out rows, tokenized exactly as training tokenized them,
    and its perplexity (exp of the loss).

    Returns:
        `{"loss", "perplexity", "loss_examples", "loss_tokens"}`; loss and perplexity are None when no
        row is usable.
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm
    from transformers import DataCollatorForSeq2Seq

    from finetune.data import IGNORE_INDEX, encode_rows

    tokenizer = loaded.tokenizer
    encoded = encode_rows(tokenizer, rows, config, style=style, columns=columns, kind=loaded.kind)
    if not encoded.rows:
        return {"loss": None, "perplexity": None, "loss_examples": 0, "loss_tokens": 0}
    batch_size = config.train.per_device_eval_batch_size
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "right"  # batches padded as training padded them
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX)
    total, tokens = 0.0, 0
    try:
        batches = range(0, len(encoded.rows), batch_size)
        for start in tqdm(batches, desc="loss", unit="batch", dynamic_ncols=True):
            chunk = encoded.rows[start : start + batch_size]
            batch = {k: v.to(loaded.device) for k, v in collator(chunk).items()}
            with torch.inference_mode(), loaded.selecting_adapter(len(chunk)):
                if loaded.kind == "seq2seq":
                    logits = loaded.model(**batch).logits
                    targets = batch["labels"]
                else:
                    out = loaded.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                    logits, targets = out.logits[:, :-1], batch["labels"][:, 1:]
                total += F.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]),
                    targets.reshape(-1),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                ).item()
                tokens += int((targets != IGNORE_INDEX).sum())
    finally:
        tokenizer.padding_side = previous_side
    loss = total / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else math.inf,
        "loss_examples": len(encoded.rows),
        "loss_tokens": tokens,
    }


# --------------------------------------------------------------------------------------------------
# The whole evaluation


@dataclass
class EvalReport:
    """One evaluation's results (what eval.json holds)."""

    id: str
    task: str
    eval_set: str
    model: str
    """How the model was loaded (`LoadedModel.describe()`)."""
    metrics: dict
    counts: dict
    generation: dict
    notes: list[str] = field(default_factory=list)
    examples: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    evaluated_at: str = ""
    base_metrics: dict | None = None
    """The same metrics for the base model (adapter off, same rows and prompts); None when not measured."""

    def to_dict(self) -> dict:
        return {
            "id": self.id, "task": self.task, "eval_set": self.eval_set, "model": self.model,
            "metrics": self.metrics, "base_metrics": self.base_metrics, "counts": self.counts,
            "generation": self.generation, "notes": self.notes, "seconds": self.seconds,
            "evaluated_at": self.evaluated_at, "examples": self.examples,
        }  # fmt: skip

    def summary(self) -> dict:
        """What babl.json records under metrics.eval.<set>: the metrics, each base metric beside its
        adapter metric as `base_<name>`, the counts and when."""
        base = {f"base_{key}": value for key, value in (self.base_metrics or {}).items()}
        return {**self.metrics, **base, **self.counts, "evaluated_at": self.evaluated_at}

    def headline(self) -> dict:
        """The flat keys babl.json's metrics carry for model cards and the app: the task metric beside
        its base value (`pass_at_1` / `base_pass_at_1`, `html_valid_fraction`, `exact_match`, `f1`,
        `rouge1`/`rouge2`/`rougeL`), and where they were measured."""
        out: dict = {}
        for key, value in self.metrics.items():
            if key in ("loss", "perplexity", "network_guard"):
                continue
            name = metric_key(key)
            out[name] = value
            if self.base_metrics is not None:
                out[f"base_{name}"] = self.base_metrics.get(key)
        if out:
            out["task_metric_eval_set"] = self.eval_set
            out["task_metric_examples"] = self.counts["answered"]
        return out


def metric_key(name: str) -> str:
    """A metric's name as a flat babl.json key: `pass@1` -> `pass_at_1`; others unchanged."""
    return name.replace("@", "_at_")


def load_target_model(target: EvalTarget):
    """The model as the app would load it for this entry (base, quantization, dtype, adapter)."""
    from babl_core.engine.loading import load_model

    return load_model(target.spec)


def run_eval(
    target: EvalTarget, *, loaded=None, answer_fn: AnswerFn | None = None,
    base_answer_fn: AnswerFn | None = None, timeout_s: float = CODE_TIMEOUT_S,
) -> EvalReport:  # fmt: skip
    """Loss, perplexity and the task metric of `target`, and of its base beside it (see the module
    docstring).

    With `eval_base` (the default) the base model is measured too: the same weights with the adapter
    switched off, on the same rows, with the same prompts, generation settings and scoring, so the two
    columns differ only by what training changed.

    Args:
        target: from `resolve_target`.
        loaded: the model already loaded (else loaded here and released at the end).
        answer_fn: replaces the model's answers (tests feed known solutions through the same scoring).
        base_answer_fn: replaces the base model's answers likewise.
        timeout_s: per program, for code tasks.

    Raises:
        EvalError: nothing to evaluate (no held-out rows and no HumanEval).
        DataError: the data set cannot be read.
        ModelUnavailable: the model cannot be loaded here.
    """
    from babl_core.engine.loading import release
    from finetune.data import load_split

    started = time.perf_counter()
    config, evaluation = target.config, target.config.eval
    split = load_split(config)
    rows = split.eval.to_list() if split.eval is not None else []
    if evaluation.eval_limit is not None:
        rows = rows[: evaluation.eval_limit]
    if not rows and evaluation.eval_set == "split":
        raise EvalError(
            f"{target.name} held out no rows (eval_fraction {config.data.eval_fraction}); train with "
            "eval_fraction above 0"
            + (", or use --humaneval" if config.run.task in ("python", "code") else "")
        )
    runs_code = evaluation.eval_set == "humaneval" or any(row.get("test_list") for row in rows)
    if config.run.task in ("python", "code") and runs_code:
        from finetune.metrics import SandboxUnavailable, select_sandbox

        try:  # refuse before loading and generating, not after
            select_sandbox(evaluation.eval_unsafe_no_sandbox)
        except SandboxUnavailable as exc:
            raise EvalError(str(exc)) from None
    own_model = loaded is None
    loaded = loaded or load_target_model(target)
    no_loss = {"loss": None, "perplexity": None, "loss_examples": 0, "loss_tokens": 0}
    try:
        description = loaded.describe()
        log.info("evaluating %s: %s", target.name, description)
        notes: list[str] = []
        # The base is the same weights with the adapter switched off: same rows, prompts and settings.
        base_view = loaded.with_adapter(None) if evaluation.eval_base and loaded.is_peft else None
        if evaluation.eval_base and base_view is None:
            notes.append("no base comparison: this model carries no adapter to switch off (a full fine-tune)")
        loss = eval_loss(loaded, rows, config, style=split.style, columns=split.columns) if rows else no_loss
        base_loss = None
        if base_view is not None:
            base_loss = (
                eval_loss(base_view, rows, config, style=split.style, columns=split.columns)
                if rows
                else no_loss
            )
        if not rows:
            notes.append("no loss: the run held out no rows")
        if evaluation.eval_set == "humaneval":
            examples, left_out = humaneval_examples(config, loaded.tokenizer, style=split.style), 0
        else:
            examples, left_out = examples_from_rows(
                rows, config, loaded.tokenizer, style=split.style, columns=split.columns
            )
        params = generation_params(target)
        if config.run.task not in SCORED_TASKS:
            notes.append(f"the {config.run.task} task has no task metric: loss only")
            examples = []
        fitting = [e for e in examples if fits_context(loaded, e, params.max_new_tokens)]
        if len(fitting) < len(examples):
            notes.append(
                f"{words.count(len(examples) - len(fitting), 'prompt')} too long for the model's context "
                f"{'was' if len(examples) - len(fitting) == 1 else 'were'} skipped (the app refuses them too)"
            )
        samples = evaluation.eval_samples if config.run.task in ("python", "code") else 1
        answers = generate_answers(
            fitting, answer_fn or model_answer_fn(loaded), params, samples=samples, seed=evaluation.eval_seed,
            workers=1 if answer_fn else model_concurrency(loaded),
        )  # fmt: skip
        task_metrics, per_example, score_notes = (
            score_answers(
                config.run.task,
                fitting,
                answers,
                timeout_s=timeout_s,
                unsafe=evaluation.eval_unsafe_no_sandbox,
            )
            if fitting
            else ({}, [], [])
        )
        notes += score_notes
        base_metrics, base_answers, base_per_example = None, [None] * len(fitting), [None] * len(fitting)
        if base_view is not None:
            base_answers = generate_answers(
                fitting, base_answer_fn or model_answer_fn(base_view), params, samples=samples,
                seed=evaluation.eval_seed, desc="base answering",
                workers=1 if base_answer_fn else model_concurrency(base_view),
            )  # fmt: skip
            base_task_metrics, base_per_example, _ = (
                score_answers(config.run.task, fitting, base_answers, timeout_s=timeout_s)
                if fitting
                else ({}, [], [])
            )
            base_task_metrics.pop("network_guard", None)
            base_metrics = {
                "loss": base_loss["loss"],
                "perplexity": base_loss["perplexity"],
                **base_task_metrics,
            }
    finally:
        if own_model:
            release(loaded)
    described = []
    for example, example_answers, scores, base_example_answers, base_scores in zip(
        fitting, answers, per_example, base_answers, base_per_example, strict=True
    ):
        entry = {
            "id": example.id,
            "input": example.fields,
            "prompt": example.prompt,
            "reference": example.reference,
            "answers": example_answers,
            "scores": scores,
        }
        if base_metrics is not None:
            entry |= {"base_answers": base_example_answers, "base_scores": base_scores}
        described.append(entry)
    metrics = {"loss": loss["loss"], "perplexity": loss["perplexity"], **task_metrics}
    counts = {
        "loss_examples": loss["loss_examples"],
        "loss_tokens": loss["loss_tokens"],
        "answered": len(fitting),
        "answers_per_example": samples,
        "skipped_too_long": len(examples) - len(fitting),
        "left_out_empty": left_out,
    }
    return EvalReport(
        id=target.name,
        task=config.run.task,
        eval_set=evaluation.eval_set,
        model=description,
        metrics={k: _rounded(v) for k, v in metrics.items()},
        base_metrics={k: _rounded(v) for k, v in base_metrics.items()} if base_metrics is not None else None,
        counts=counts,
        generation={
            "max_new_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "repetition_penalty": params.repetition_penalty,
            "stop": list(params.stop),
            "seed": evaluation.eval_seed,
        },
        notes=notes,
        examples=described,
        seconds=round(time.perf_counter() - started, 1),
        evaluated_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )


def _rounded(value):
    return round(value, 6) if isinstance(value, float) and math.isfinite(value) else value


# --------------------------------------------------------------------------------------------------
# Writing and showing results


def eval_file_name(eval_set: str) -> str:
    return EVAL_FILE if eval_set == "split" else f"eval-{eval_set}.json"


def write_results(target: EvalTarget, report: EvalReport) -> Path:
    """eval.json (or eval-<set>.json) next to the adapter, and the summary into babl.json's metrics.

    Returns:
        The eval JSON's path.
    """
    from finetune.outputs import META_FILE, refresh_model_card

    out = target.path / eval_file_name(report.eval_set)
    write_json_atomic(out, report.to_dict())
    meta_path = target.path / META_FILE
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    metrics = meta.get("metrics") if isinstance(meta.get("metrics"), dict) else {}
    evals = metrics.get("eval") if isinstance(metrics.get("eval"), dict) else {}
    meta["metrics"] = {**metrics, **report.headline(), "eval": {**evals, report.eval_set: report.summary()}}
    write_json_atomic(meta_path, meta)
    refresh_model_card(target.path)  # the card shows what babl.json now holds
    return out


METRIC_LABELS = {
    "loss": "loss (per answer token)",
    "perplexity": "perplexity",
    **TASK_METRIC_NAMES,
}


def _format_value(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e6 else f"{value:.3g}"
    return str(value)


def format_table(report: EvalReport) -> str:
    """The report as an aligned text table, with its notes below."""
    held_out = words.count(report.counts["loss_examples"], "held-out row")
    where = (
        f"HumanEval, {words.count(report.counts['answered'], 'problem')} (loss on {held_out})"
        if report.eval_set == "humaneval"
        else held_out
    )
    keys = [key for key in report.metrics if key != "sandbox"]
    lines = [f"{report.id} · {report.task} · {where}"]
    if report.base_metrics is None:
        rows = [(METRIC_LABELS.get(key, key), _format_value(report.metrics[key])) for key in keys]
        width = max(len(name) for name, _ in rows)
        lines.append(f"{'metric':<{width}}  value")
        lines += [f"{name:<{width}}  {value}" for name, value in rows]
    else:
        table = [("metric", "base", "adapter", "change")]
        for key in keys:
            adapter, base = report.metrics[key], report.base_metrics.get(key)
            change = (
                f"{adapter - base:+.4f}"
                if isinstance(adapter, (int, float)) and isinstance(base, (int, float))
                and math.isfinite(adapter) and math.isfinite(base)
                else "—"
            )  # fmt: skip
            table.append((METRIC_LABELS.get(key, key), _format_value(base), _format_value(adapter), change))
        widths = [max(len(row[i]) for row in table) for i in range(4)]
        for row in table:
            lines.append(
                f"{row[0]:<{widths[0]}}  "
                + "  ".join(f"{cell:>{widths[i]}}" for i, cell in enumerate(row[1:], 1))
            )
    generation = report.generation
    sampling = "greedy" if generation["temperature"] == 0 else f"temperature {generation['temperature']:g}"
    lines.append(
        f"({words.count(report.counts['answered'], 'answer')} × {report.counts['answers_per_example']}, {sampling}, "
        f"max {generation['max_new_tokens']} new tokens; {report.model}; {report.seconds:.1f} s)"
    )
    lines += [f"note: {note}" for note in report.notes]
    return "\n".join(lines)
