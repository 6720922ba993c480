"""What `/train` and `/jobs` show and how they read answers: the chat side of `babl_core.web.jobs`.

Plain functions over plain data (no Chainlit): the recipes offered, the check of an uploaded JSONL file,
the form's settings read into config keys and checked by the recipe schema (`finetune.config`: one set of
bounds for the CLI and the chat), and the Markdown and loss-curve picture of a job. `app.py` sends them.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

from babl_core import settings
from babl_core.engine.words import count
from babl_core.web import jobs

TRAIN_COMMAND, JOBS_COMMAND = "train", "jobs"
COMMANDS = [
    {
        "id": TRAIN_COMMAND,
        "icon": "graduation-cap",
        "description": "Fine-tune a model on your own rows, here in the chat",
        "button": False,
        "persistent": False,
    },
    {
        "id": JOBS_COMMAND,
        "icon": "list-checks",
        "description": "Training runs: running, waiting and finished",
        "button": False,
        "persistent": False,
    },
]
# The form's names for the config keys it sets (the rest of the recipe stays as written).
FORM_KEYS = {"name": "run_name", "steps": "max_steps", "epochs": "num_train_epochs", "lr": "learning_rate",
             "rank": "lora_r"}  # fmt: skip
FORM_WORDS = {
    "name": "run name",
    "steps": "steps",
    "epochs": "epochs",
    "lr": "learning rate",
    "rank": "LoRA rank",
}
MAX_UPLOAD_MB = 50
SHOWN_PROBLEMS = 5


@dataclass
class Recipe:
    """A configs/finetune recipe as the form offers it."""

    path: str  # repo-relative, as the job's --config
    name: str  # the file's stem
    label: str
    task: str
    real: bool  # a pretrained base (not the random-weight demo models)
    config: object  # finetune.config.FinetuneConfig


def recipes() -> list[Recipe]:
    """The recipes usable on this machine (base and data present), real-base ones first."""
    from finetune.config import ConfigError, build_config, environment_problems, read_yaml

    found = []
    for path in sorted((settings.REPO_ROOT / "configs" / "finetune").glob("*.yaml")):
        try:
            config, problems = build_config(read_yaml(path), source=settings.portable_path(path))
        except ConfigError:
            continue
        if problems or environment_problems(config, for_training=False):
            continue
        demo_dir = settings.demo_dir().resolve()
        real = not settings.resolve_path(config.model.base).resolve().is_relative_to(demo_dir)
        label = config.run.label or config.run.run_name
        found.append(Recipe(settings.portable_path(path), path.stem, label, config.run.task, real, config))
    return sorted(found, key=lambda recipe: (not recipe.real, recipe.name))


def find_recipe(name: str, choices: list[Recipe]) -> Recipe | None:
    name = Path(name.strip()).stem
    return next((recipe for recipe in choices if recipe.name == name), None)


def expected_columns(config) -> tuple[list[str], list[str]]:
    """(required, optional) column names of a recipe's rows: its prompt style's fields, mapped by `columns`."""
    from babl_core.engine.prompts import get_style

    style = get_style(config.style_name)

    def column(name: str) -> str:
        return config.data.columns.get(name, name).split(".", 1)[0]

    return [column(n) for n in style.required_fields], [column(n) for n in style.optional_fields]


def upload_problems(path: Path, config, *, shown_name: str) -> list[str]:
    """Everything wrong with an uploaded JSONL file for this recipe, one line each (empty: usable).

    Checked at once, before any job exists: the file is JSON Lines (one object per line), not empty, and
    every row has the columns the recipe's prompt style needs.
    """
    required, _optional = expected_columns(config)
    try:
        size = path.stat().st_size
    except OSError as exc:
        return [f"{shown_name} could not be read: {exc.strerror or exc}"]
    if size > MAX_UPLOAD_MB * 1024 * 1024:
        return [f"{shown_name} is larger than {MAX_UPLOAD_MB} MB; upload fewer rows"]
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return [f"{shown_name} is not text (UTF-8): upload a JSON Lines file, one JSON object per line"]
    rows = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not rows:
        return [f"{shown_name} is empty: it has no rows to train on"]
    problems: list[str] = []
    not_json: list[int] = []
    missing: dict[str, list[int]] = {}
    for number, line in rows:
        try:
            row = json.loads(line)
        except ValueError:
            not_json.append(number)
            continue
        if not isinstance(row, dict):
            not_json.append(number)
            continue
        for name in required:
            if row.get(name) in (None, ""):
                missing.setdefault(name, []).append(number)
    if not_json:
        problems.append(
            f"{shown_name}: {_lines(not_json)} {'is' if len(not_json) == 1 else 'are'} not a JSON object; "
            'each line must be one object, e.g. {"' + '": "…", "'.join(required) + '": "…"}'
        )
    for name, numbers in missing.items():
        problems.append(
            f"{shown_name}: column {name!r} is missing or empty on {_lines(numbers)}; this recipe needs "
            f"the columns {', '.join(repr(n) for n in required)} on every row"
        )
    return problems


def _lines(numbers: list[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:SHOWN_PROBLEMS])
    more = f" and {len(numbers) - SHOWN_PROBLEMS} more" if len(numbers) > SHOWN_PROBLEMS else ""
    return f"line{'s' if len(numbers) > 1 else ''} {shown}{more}"


def free_run_name(base_name: str) -> str:
    """`base_name`-1, -2, ...: the first name with no adapter, checkpoints or catalog entry of that id."""
    from babl_core.engine.catalog import Catalog, CatalogError

    try:
        taken = set(Catalog.load().ids())
    except CatalogError:
        taken = set()
    for number in range(1, 1000):
        name = f"{base_name}-{number}"
        if name in taken or (settings.adapters_dir() / name).exists():
            continue
        if (settings.models_dir() / "checkpoints" / name).exists():
            continue
        return name
    return f"{base_name}-{jobs.new_job_id()}"


def form_defaults(recipe: Recipe) -> dict[str, str]:
    """The form's starting values: the recipe's own, and a free run name."""
    train = recipe.config.train
    values = {"name": free_run_name(recipe.config.run.run_name), "lr": f"{train.learning_rate:g}",
              "rank": str(recipe.config.adapter.lora_r)}  # fmt: skip
    if train.max_steps > 0:
        values["steps"] = str(train.max_steps)
    else:
        values["epochs"] = f"{train.num_train_epochs:g}"
    return values


def form_text(recipe: Recipe, values: dict[str, str], *, uploaded: str | None) -> str:
    """The settings question: the values in effect, and how to change them."""
    data = (
        f"your rows from **{uploaded}**"
        if uploaded
        else f"the recipe's own rows ({recipe.config.data.dataset})"
    )
    shown = " · ".join(f"{FORM_WORDS[key]} **{value}**" for key, value in values.items())
    return (
        f"**{recipe.label}** on {data}\n\n{shown}\n\n"
        "Reply **ok** to start, or change any of them, e.g. `steps=20 lr=1e-3 rank=8 name=my-run` "
        "(`epochs=2` trains by passes instead of steps)."
    )


_PAIR = re.compile(r"([A-Za-z_]+)\s*=\s*(\S+)")


def read_form(text: str, values: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """The form's values after the user's reply (`ok`, or `key=value ...`); (values, problems)."""
    text = text.strip()
    if text.lower() in ("", "ok", "yes", "start", "go"):
        return values, []
    values = dict(values)
    problems = []
    pairs = _PAIR.findall(text)
    if not pairs:
        return values, [f"{text!r}: write ok, or settings such as steps=20 lr=1e-3 rank=8 name=my-run"]
    for key, value in pairs:
        key = key.lower()
        if key not in FORM_KEYS:
            problems.append(f"{key}: not a setting here; use {', '.join(FORM_KEYS)}")
            continue
        values[key] = value
        if key == "epochs":
            values.pop("steps", None)
        if key == "steps":
            values.pop("epochs", None)
    return values, problems


def overrides_for(recipe: Recipe, values: dict[str, str], upload: Path | None) -> dict[str, str]:
    """The config keys the job passes on its command line."""
    overrides = {FORM_KEYS[key]: value for key, value in values.items()}
    if "num_train_epochs" in overrides:
        overrides["max_steps"] = "-1"  # passes, not steps
    overrides["label"] = f"{recipe.label} — {values['name']}"
    if upload is not None:
        overrides["dataset"] = str(upload)
        if recipe.config.data.eval_dataset:
            overrides["eval_dataset"] = "null"  # held-out rows come from the upload too
    return overrides


def config_problems(recipe: Recipe, overrides: dict[str, str]) -> list[str]:
    """The recipe schema's verdict on the form's values (bounds, free run name): the CLI's own checks."""
    from finetune.config import ConfigError, load_config

    try:
        load_config(recipe.path, overrides)
    except ConfigError as exc:
        words = {config_key: FORM_WORDS[form_key] for form_key, config_key in FORM_KEYS.items()}
        problems = []
        for problem in exc.problems:
            key = problem.split(":", 1)[0].split(" ", 1)[0]
            problems.append(f"{words[key]} ({problem})" if key in words else problem)
        return problems
    return []


# --------------------------------------------------------------------------------------------------
# A job in the chat


def progress_markdown(job: jobs.Job, progress: jobs.Progress, *, position: int | None = None) -> str:
    """The one message that follows a job: state, step / total, losses and time left."""
    title = f"**Training `{job.run_name}`**"
    if job.state == jobs.QUEUED:
        # Position 1 waits for the run training now; each position further waits for one more run.
        ahead = count(position, "run") if position else "another run"
        return (
            f"{title} — waiting: position {position or '?'} in the queue; it starts when the {ahead} "
            f"ahead of it {'ends' if position in (1, None) else 'end'} (one run trains at a time)."
        )
    parts = []
    if progress.total:
        parts.append(f"step {progress.step} / {progress.total}")
    elif job.state == jobs.RUNNING:
        parts.append("loading the model and the rows…")
    if progress.loss is not None:
        parts.append(f"loss {progress.loss:.4f}")
    if progress.eval_loss is not None:
        parts.append(f"eval loss {progress.eval_loss:.4f}")
    if progress.base_eval_loss is not None:
        parts.append(f"base eval loss {progress.base_eval_loss:.4f}")
    if job.state == jobs.RUNNING and progress.seconds_left is not None:
        parts.append(f"about {jobs.format_seconds(progress.seconds_left)} left")
    state = jobs.STATE_WORDS.get(job.state, job.state)
    if job.state == jobs.RUNNING:  # the title says it trains: the figures follow it directly
        text = f"{title} — {' · '.join(parts)}"
    else:
        text = f"{title} — {state}" + (f": {' · '.join(parts)}" if parts else "")
    if job.note and job.state not in (jobs.FINISHED,):
        text += f"\n\n{job.note}"
    return text


def result_markdown(job: jobs.Job) -> str:
    """The end of a finished run: the held-out figures of the base beside the adapter."""
    from finetune.model_card import TASK_METRIC_NAMES

    metrics = job.metrics()
    rows = []
    if metrics.get("eval_loss") is not None:
        base = metrics.get("base_eval_loss")
        rows.append(("eval loss (lower is better)", base, metrics["eval_loss"]))
    for key, name in TASK_METRIC_NAMES.items():
        if metrics.get(key) is not None:
            rows.append((name, metrics.get(f"base_{key}"), metrics[key]))
    lines = [f"**`{job.run_name}` is trained** — {count(metrics.get('steps', 0), 'step')}"
             + (f" in {jobs.format_seconds(metrics['train_seconds'])}" if metrics.get("train_seconds") else "")
             + "."]  # fmt: skip
    if rows:
        held = metrics.get("eval_examples")
        lines.append(f"\nOn {count(held, 'held-out row')}:" if held else "")
        lines += ["", "| | base | trained |", "|---|---|---|"]
        for name, base, trained in rows:
            lines.append(f"| {name} | {_figure(base)} | {_figure(trained)} |")
    lines.append("\nIt is in the model list now. **Chat with it** switches this chat to it.")
    return "\n".join(lines)


def example_question(task: str | None) -> str:
    """The question "Compare with base" asks: the task's example from the model card."""
    from finetune.model_card import EXAMPLE_MESSAGES

    return EXAMPLE_MESSAGES.get(task or "", EXAMPLE_MESSAGES["chat"])


def _figure(value) -> str:
    return "—" if value is None else f"{value:.4f}"


def jobs_markdown(runner: jobs.JobRunner, user: str) -> str:
    """`/jobs`: this user's runs, newest first, and what else the machine is doing."""
    mine = list(reversed(runner.jobs(user)))
    running = runner.running()
    lines = []
    if running is not None and running.user != user:
        lines.append("The machine is training another user's run now; yours wait for it.\n")
    if not mine:
        lines.append("No training runs yet. Send **/train** to start one.")
        return "\n".join(lines)
    lines += ["| run | recipe | state | started | |", "|---|---|---|---|---|"]
    for job in mine:
        state = jobs.STATE_WORDS.get(job.state, job.state)
        if job.state == jobs.QUEUED:
            state += f" (position {runner.position(job.id)})"
        elif job.state == jobs.RUNNING:
            progress = jobs.read_progress(job.events_path)
            if progress.total:
                state += f" (step {progress.step} / {progress.total})"
        when = _clock(job.started or job.created)
        extra = "resumable" if job.resumable else ""
        lines.append(f"| `{job.run_name}` | {Path(job.recipe).stem} | {state} | {when} | {extra} |")
    return "\n".join(lines)


def _clock(stamp: float | None) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp)) if stamp else "—"


def loss_curve_png(progress: jobs.Progress, title: str) -> bytes | None:
    """The loss curve so far as PNG bytes (None before the first logged loss)."""
    if not progress.train_points and not progress.eval_points:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display: render to bytes only
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.6, 3.2), dpi=100)
    axes = figure.subplots()
    if progress.train_points:
        axes.plot(*zip(*progress.train_points, strict=True), label="train loss", color="tab:blue")
    if progress.eval_points:
        axes.plot(*zip(*progress.eval_points, strict=True), label="eval loss", color="tab:orange", marker="o")
    if progress.base_eval_loss is not None:
        axes.axhline(progress.base_eval_loss, color="grey", linestyle="--", label="base eval loss")
    if progress.total:
        axes.set_xlim(0, progress.total)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(f"{title} loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()
