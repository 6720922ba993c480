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
from finetune.files import replacing, write_json_atomic, write_text_atomic

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
            f"needs a Q&A recipe ({' or '.join(context_styles())} style; this one uses "
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
    write_json_atomic(
        json_path,
        {
            "experiment": "does the context passage help the Q&A model? with and without context",
            "recipe": recipe,
            "overrides": {k: str(v) for k, v in (overrides or {}).items()},
            "questions": questions,
            "arms": [arm.__dict__ for arm in arms],
            "rows": table_rows(arms),
            "verdict": verdict,
            "finished": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
    )
    if plot_experiment(arms, output_dir / PLOT_FILE) is not None:
        markdown += f"\n![Both arms' losses, exact match and F1]({PLOT_FILE})\n"
    write_text_atomic(markdown_path, markdown)
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
        "# Does the context passage help the Q&A model?",
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
    written = [result.markdown_path, result.json_path, result.markdown_path.parent / PLOT_FILE]
    return f"{result.markdown.rstrip()}\n\nwritten: " + ", ".join(
        settings.portable_path(path) for path in written if path.is_file()
    )


PLOT_FILE = "experiment.png"
SCORES = (("exact_match", "exact match"), ("f1", "F1"))


def _arm_losses(arm: ArmResult) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train, eval) loss points of an arm, from the trainer log saved in its adapter directory."""
    import json

    from finetune.outputs import LOG_FILE

    try:
        history = json.loads((settings.resolve_path(arm.adapter) / LOG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return [], []
    train = [(e["step"], e["loss"]) for e in history if "loss" in e and "step" in e]
    evaluation = [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e and "step" in e]
    return train, evaluation


def plot_data(arms: list[ArmResult]) -> tuple[dict, list[tuple[str, list[float | None]]]]:
    """What `plot_experiment` draws: {arm name: (train, eval) loss points}, and one bar group per
    adapter arm and per base row, each [exact match, F1] (None where not measured)."""
    curves = {arm.name: _arm_losses(arm) for arm in arms}
    bars: list[tuple[str, list[float | None]]] = [
        (f"adapter, {arm.name}", [arm.metrics.get(key) for key, _ in SCORES]) for arm in arms
    ]
    bars += [
        (f"base alone, {arm.name}", [arm.metrics.get(f"base_{key}") for key, _ in SCORES])
        for arm in arms
        if any(arm.metrics.get(f"base_{key}") is not None for key, _ in SCORES)
    ]
    return curves, bars


def plot_experiment(arms: list[ArmResult], path: Path) -> Path | None:
    """A PNG beside experiment.md: both arms' loss curves (left) and their exact match and F1 (right),
    with the base model's zero-shot scores beside them where the arms recorded `base_*` figures.

    Returns the path, or None when there is nothing to draw.
    """
    curves, bars = plot_data(arms)
    if not any(train or evaluation for train, evaluation in curves.values()) and not any(
        value is not None for _, values in bars for value in values
    ):
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2), dpi=100)
    losses, scores = figure.subplots(1, 2)
    colors = ("tab:blue", "tab:orange", "tab:cyan", "tab:red")
    for color, (name, (train, evaluation)) in zip(colors, curves.items(), strict=False):
        if train:
            losses.plot(*zip(*train, strict=True), color=color, label=f"{name}: train loss")
        if evaluation:
            losses.plot(*zip(*evaluation, strict=True), color=color, linestyle="--", marker="o",
                        label=f"{name}: eval loss")  # fmt: skip
    losses.set_xlabel("step")
    losses.set_ylabel("loss")
    losses.set_title("loss while training")
    losses.grid(alpha=0.3)
    if losses.get_legend_handles_labels()[0]:
        losses.legend(fontsize="small")
    width = 0.8 / max(len(bars), 1)
    for index, (color, (name, values)) in enumerate(zip(colors, bars, strict=False)):
        xs = [position + (index - (len(bars) - 1) / 2) * width for position in range(len(SCORES))]
        heights = [value if value is not None else 0.0 for value in values]
        drawn = scores.bar(
            xs, heights, width, color=color, label=name, hatch="//" if "base" in name else None
        )
        scores.bar_label(
            drawn, labels=[f"{v:.2f}" if v is not None else "—" for v in values], fontsize="small"
        )
    scores.set_xticks(range(len(SCORES)), [label for _, label in SCORES])
    scores.set_ylim(0, 1.35)  # room for the legend above a perfect score
    scores.set_title("held-out questions")
    scores.legend(fontsize="small")
    figure.suptitle("Does the context passage help?")
    figure.tight_layout()
    with replacing(path) as partial:
        figure.savefig(partial, format="png")
    return path
