"""Seed 004's experiment: does giving the model the context passage with the question help it answer?

Two arms train from one question-answering recipe (`qa-t5-squad` on T5, its offline twin `demo-qa`, or
`smollm2-qa` on the real SmolLM2 with the causal `chat-qa` style) with the same rows, seed and settings;
only `with_context` differs (the question with its context passage, against the question alone). Both
are then evaluated by `finetune.evaluation` on the same held-out questions, each beside its base model
asked zero-shot in the same prompt style, so the table has four rows: the adapter trained with context,
the one trained without, and the base with and without context. It is written in Markdown and JSON
(exact match, F1, eval loss, perplexity, train time), with one sentence saying which arm won and by
how much.

The arms are saved as their own adapters, `<run_name>-with-context` and `<run_name>-without-context`
(replaced when the experiment runs again), so the recipe's own adapter is never touched.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from babl_core import settings
from finetune.config import FinetuneConfig, context_styles, has_context_field, load_config

log = logging.getLogger("finetune")

DEFAULT_CONFIG = "configs/finetune/qa-t5-squad.yaml"
ARMS = (("with-context", True, "with context"), ("without-context", False, "without context"))
# Keys the experiment sets itself for each arm; the command line may not change them.
ARM_KEYS = ("run_name", "with_context", "overwrite", "resume")
TIE = 1e-9


class ExperimentError(ValueError):
    """The experiment cannot run as asked; the message says how to fix it."""


@dataclass
class ArmResult:
    """One trained and evaluated arm."""

    name: str
    """"with context" or "without context"."""
    with_context: bool
    run_name: str
    adapter: str
    """Where its adapter is, as a portable path."""
    metrics: dict
    """exact_match, f1, eval_loss, perplexity, train_seconds, train_loss, steps; and the base model's
    zero-shot numbers in the same prompt style: base_exact_match, base_f1, base_eval_loss,
    base_perplexity (None when the base was not measured)."""


@dataclass
class ExperimentResult:
    """Both arms, the verdict and where the tables went."""

    recipe: str
    arms: list[ArmResult]
    verdict: str
    questions: int
    markdown_path: Path
    json_path: Path
    markdown: str


def arm_configs(config_path: str | Path, overrides: dict | None = None) -> list[FinetuneConfig]:
    """The two arms' configs: the recipe plus `overrides`, with context and without.

    Raises:
        ExperimentError: an override names a key the experiment sets itself, or the recipe is not QA.
        ConfigError: the recipe has problems here (e.g. its base is not downloaded).
    """
    overrides = dict(overrides or {})
    clash = [key for key in ARM_KEYS if key in overrides]
    if clash:
        raise ExperimentError(
            f"--{clash[0]}: the experiment sets {', '.join(ARM_KEYS)} itself for each arm; remove it"
        )
    base = load_config(config_path, overrides, check_environment=False)
    if not has_context_field(base.style_name):
        raise ExperimentError(
            f"{base.source}: the experiment compares answering with and without a context passage, so it "
            f"needs a question-answering recipe ({' or '.join(context_styles())} style; this one uses "
            f"{base.style_name!r}); e.g. {DEFAULT_CONFIG}, or configs/finetune/smollm2-qa.yaml offline"
        )
    configs = []
    for suffix, with_context, _label in ARMS:
        arm_overrides = {
            **overrides,
            "run_name": f"{base.run.run_name}-{suffix}",
            "with_context": with_context,
            "overwrite": True,  # the arms belong to the experiment: a new run replaces the last one's
            "label": f"{base.label} ({suffix.replace('-', ' ')})",
        }
        configs.append(load_config(config_path, arm_overrides))
    return configs


def run_experiment(
    config_path: str | Path = DEFAULT_CONFIG, overrides: dict | None = None, *, output_dir: Path | None = None,
    on_evaluated: Callable | None = None,
) -> ExperimentResult:  # fmt: skip
    """Train and evaluate both arms, then write `experiment.md` and `experiment.json`.

    Args:
        config_path: a question-answering recipe (qa-t5-squad; offline demo-qa or smollm2-qa).
        overrides: config keys from the command line, applied to both arms alike.
        output_dir: where the tables go (default models/experiments/<run_name>-context/).
        on_evaluated: called with each arm's `EvalReport` as soon as it is evaluated (the CLI prints it).

    Raises:
        ExperimentError, ConfigError: as `arm_configs`.
        DataError, ModelUnavailable: as training and evaluation raise them.
    """
    from finetune import evaluation
    from finetune.recipes import run_training

    configs = arm_configs(config_path, overrides)
    recipe_name = configs[0].run.run_name.removesuffix(f"-{ARMS[0][0]}")
    arms: list[ArmResult] = []
    questions = 0
    for config, (_suffix, with_context, label) in zip(configs, ARMS, strict=True):
        log.info("experiment arm %s: training %s", label, config.run.run_name)
        trained = run_training(config)
        target = evaluation.resolve_target(adapter=str(trained.output_dir))
        log.info("experiment arm %s: evaluating", label)
        report = evaluation.run_eval(target)
        evaluation.write_results(target, report)
        if on_evaluated is not None:
            on_evaluated(report)
        questions = report.counts["answered"]
        base = report.base_metrics or {}
        arms.append(
            ArmResult(
                name=label,
                with_context=with_context,
                run_name=config.run.run_name,
                adapter=settings.portable_path(trained.output_dir),
                metrics={
                    "exact_match": report.metrics.get("exact_match"),
                    "f1": report.metrics.get("f1"),
                    "eval_loss": report.metrics.get("loss"),
                    "perplexity": report.metrics.get("perplexity"),
                    "train_seconds": trained.metrics.get("train_seconds"),
                    "train_loss": trained.metrics.get("train_loss"),
                    "steps": trained.metrics.get("steps"),
                    "base_exact_match": base.get("exact_match"),
                    "base_f1": base.get("f1"),
                    "base_eval_loss": base.get("loss"),
                    "base_perplexity": base.get("perplexity"),
                },
            )
        )
    verdict = decide(arms[0].metrics, arms[1].metrics, questions=questions)
    output_dir = output_dir or settings.models_dir() / "experiments" / f"{recipe_name}-context"
    output_dir.mkdir(parents=True, exist_ok=True)
    recipe = configs[0].source or str(config_path)
    markdown = to_markdown(recipe, arms, verdict, questions=questions)
    markdown_path, json_path = output_dir / "experiment.md", output_dir / "experiment.json"
    evaluation.write_json_atomic(
        json_path,
        {
            "experiment": "seed 004: with and without context",
            "recipe": recipe,
            "overrides": {k: str(v) for k, v in (overrides or {}).items()},
            "questions": questions,
            "arms": [arm.__dict__ for arm in arms],
            "rows": table_rows(arms),
            "verdict": verdict,
            "finished": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
    )
    markdown_path.write_text(markdown, encoding="utf-8")
    return ExperimentResult(recipe, arms, verdict, questions, markdown_path, json_path, markdown)


def _differs(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and abs(a - b) > TIE


def decide(with_context: dict, without_context: dict, *, questions: int) -> str:
    """One sentence: which arm won and by how much (F1 first, then exact match, then eval loss).

    Args:
        with_context, without_context: each arm's metrics (exact_match, f1, eval_loss).
        questions: how many held-out questions both were scored on.
    """
    names = ("with context", "without context")
    pairs = {key: (with_context.get(key), without_context.get(key)) for key in ("f1", "exact_match")}
    on = f"on {questions} held-out question{'s' if questions != 1 else ''}"
    for key, label in (("f1", "F1"), ("exact_match", "exact match")):
        a, b = pairs[key]
        if not _differs(a, b):
            continue
        winner = names[0] if a > b else names[1]
        detail = f"{label} {a:.3f} with context vs {b:.3f} without ({a - b:+.3f})"
        em_a, em_b = pairs["exact_match"]
        if key == "f1" and em_a is not None and em_b is not None:
            detail += f", exact match {em_a:.3f} vs {em_b:.3f} ({em_a - em_b:+.3f})"
        elif key == "exact_match" and pairs["f1"][0] is not None:
            detail += f" (F1 tied at {pairs['f1'][0]:.3f})"
        return f"{winner.capitalize()} won: {detail} {on}."
    a, b = with_context.get("eval_loss"), without_context.get("eval_loss")
    f1, em = pairs["f1"][0], pairs["exact_match"][0]
    scores = f"F1 {f1:.3f} and exact match {em:.3f}" if f1 is not None and em is not None else "no scores"
    if _differs(a, b):
        lower = 0 if a < b else 1
        return (
            f"Neither arm won on the answers (both {scores} {on}); by eval loss {names[lower]} was better, "
            f"{a:.3f} with context vs {b:.3f} without ({a - b:+.3f})."
        )
    return f"Neither arm won: both scored {scores} {on}, with the same eval loss."


def _cell(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _difference(a, b, digits: int = 3) -> str:
    if a is None or b is None or not all(math.isfinite(float(v)) for v in (a, b)):
        return "—"
    return f"{a - b:+.{digits}f}"


COLUMNS = (
    ("exact match", "exact_match", 3),
    ("F1", "f1", 3),
    ("eval loss", "eval_loss", 3),
    ("perplexity", "perplexity", 2),
    ("train time (s)", "train_seconds", 1),
)


def table_rows(arms: list[ArmResult]) -> list[dict]:
    """The four rows of the table, each made of one arm's numbers: the two trained adapters, then the
    base model zero-shot with and without context (the `base_*` numbers of the arm with that setting)."""
    rows = []
    for arm in arms:
        rows.append(
            {
                "model": f"adapter trained {arm.name}",
                "context": arm.with_context,
                **{key: arm.metrics.get(key) for _label, key, _digits in COLUMNS},
            }
        )
    for arm in arms:
        rows.append(
            {
                "model": f"base, zero-shot, {arm.name}",
                "context": arm.with_context,
                **{key: arm.metrics.get(f"base_{key}") for _label, key, _digits in COLUMNS},
                "train_seconds": None,
            }
        )
    return rows


def to_markdown(recipe: str, arms: list[ArmResult], verdict: str, *, questions: int) -> str:
    """The experiment's answer: a four-row table (both adapters, the base with and without context) and
    the verdict, as Markdown."""
    with_arm, without_arm = arms
    lines = [
        "# Seed 004: does the context passage help?",
        "",
        f"`{recipe}` trained twice on the same rows, seed and settings — once with the context passage, "
        "once with the question alone — and both evaluated on the same "
        f"{questions} held-out questions, beside the base model asked the same way without training.",
        "",
        "| model | " + " | ".join(label for label, _key, _digits in COLUMNS) + " |",
        "|---|" + "---:|" * len(COLUMNS),
    ]
    for row in table_rows(arms):
        cells = [_cell(row[key], digits) for _label, key, digits in COLUMNS]
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    a, b = with_arm.metrics.get("f1"), without_arm.metrics.get("f1")
    lines += [
        "",
        f"**Answer:** {verdict}",
        "",
        f"F1 with context minus without: adapters {_difference(a, b)}, base "
        f"{_difference(with_arm.metrics.get('base_f1'), without_arm.metrics.get('base_f1'))}.",
        "",
        f"Adapters: `{with_arm.adapter}` and `{without_arm.adapter}` (each has its eval.json).",
        "",
    ]
    return "\n".join(lines)


def print_summary(result: ExperimentResult) -> str:
    """What the CLI prints at the end: the table, the verdict and where the files are."""
    return (
        f"{result.markdown.rstrip()}\n\n"
        f"written: {settings.portable_path(result.markdown_path)}, {settings.portable_path(result.json_path)}"
    )
