"""What a run leaves behind: the adapter directory (written atomically), `babl.json`, the loss curve,
and the checkpoints `--resume` continues from.

The adapter directory is what the app discovers (DESIGN.md "Adapters"): `models/adapters/<run-name>/`
with the PEFT files and `babl.json` = {id, label, task, base, prompt_style, recipe, metrics, created}.
It is assembled in `models/adapters/.partial/<run-name>/` (one level too deep for discovery, on the same
file system) and renamed into place, so the app never lists a half-written adapter.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import yaml

from babl_core import settings
from babl_core.engine.catalog import looks_like_path
from finetune.config import FinetuneConfig
from finetune.files import fresh_staging_dir, into_place, staging_path, write_text_atomic
from finetune.model_card import CARD_FILE, EXAMPLE_MESSAGES, MARKER, PEFT_TEMPLATE_MARK, render

log = logging.getLogger(__name__)

META_FILE = "babl.json"
CONFIG_FILE = "finetune.yaml"
LOG_FILE = "trainer_log.json"
PLOT_FILE = "loss.png"


def is_main_process() -> bool:
    """True in a single process, and in the rank-0 process under `accelerate launch` / torchrun."""
    return os.environ.get("RANK", "0") == "0"


class RunInProgress(RuntimeError):
    """Another process is training a run of the same name; `str()` is the one line to show."""


@contextlib.contextmanager
def run_lock(config: FinetuneConfig):
    """Hold the run name for the length of a training run, or refuse at once if another process holds it.

    Two runs of one name would share the checkpoint folder (the second empties it under the first) and
    the adapter folder (the second died at the end, after training fully). The lock is an `flock` on
    models/checkpoints/.<run-name>.lock, which the kernel releases when the process ends however it
    ends, so a killed run leaves nothing stale. Under `accelerate launch` only the main process takes it.
    """
    if not is_main_process():
        yield
        return
    path = settings.models_dir() / "checkpoints" / f".{config.run.run_name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            raise RunInProgress(
                f"run {config.run.run_name!r} is already training in another process"
                + (f" (pid {holder})" if holder.isdigit() else "")
                + "; wait for it to finish, or give this one another --run_name"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def portable_base(base: str) -> str:
    """The base as the catalog writes it: a hub id or a relative path as given (both read the same way
    everywhere), an absolute path made relative to the repo or models/ where it lies inside them."""
    if not looks_like_path(base):
        return base
    path = Path(base).expanduser()
    return settings.portable_path(path) if path.is_absolute() else path.as_posix()


def metadata(config: FinetuneConfig, metrics: dict) -> dict:
    """The `babl.json` document for this run. A base read from a GGUF file is recorded as the catalog
    names it, `base` + `gguf_file`, so the adapter matches that entry and shares its loaded copy."""
    document = {
        "id": config.run.run_name,
        "label": config.label,
        "task": config.run.task,
        "base": portable_base(config.model.base),
        "prompt_style": config.style_name,
        "recipe": config.recipe,
        "metrics": metrics,
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if config.model.gguf_file:
        document["gguf_file"] = config.model.gguf_file
    return document


def staging_dir(config: FinetuneConfig) -> Path:
    """The empty directory a run's weights are saved into before `publish` moves them into place.

    Its path depends only on the run name, so under `accelerate launch` every process agrees on it
    (all of them take part in saving; only the main one writes files).
    """
    target = config.adapter_path()
    return fresh_staging_dir(target) if is_main_process() else staging_path(target)


def publish(config: FinetuneConfig, staging: Path, *, metrics: dict, log_history: list[dict]) -> Path:
    """Complete the staged directory (config, log, loss plot, babl.json) and rename it into place.

    Args:
        config: the run (its run name, overwrite flag and metadata).
        staging: the directory from `staging_dir`, holding the saved weights.
        metrics: what `babl.json` records.
        log_history: the trainer's log entries (train and eval losses), for the JSON log and the plot.

    Returns:
        The final directory, e.g. models/adapters/<run-name>.
    """
    target = config.adapter_path()
    appeared = FileExistsError(
        f"{settings.portable_path(target)} appeared while training; pass --overwrite true to replace it"
    )
    with into_place(staging, target, overwrite=config.run.overwrite, refusal=appeared):
        (staging / CONFIG_FILE).write_text(config.to_yaml(), encoding="utf-8")
        (staging / LOG_FILE).write_text(json.dumps(log_history, indent=1) + "\n", encoding="utf-8")
        plot_losses(log_history, staging / PLOT_FILE, title=config.run.run_name)
        # babl.json last: it is what marks a directory as a finished adapter.
        (staging / META_FILE).write_text(
            json.dumps(metadata(config, metrics), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        try:
            refresh_model_card(staging, location=target)  # replaces PEFT's empty template
        except (OSError, ValueError) as exc:  # the trained weights matter more than their card
            log.warning("the model card (README.md) was not written: %s", exc)
    return target


def write_model_card(
    directory: Path, *, location: Path | None = None, model_id: str | None = None
) -> Path | None:
    """(Re)write `directory`/README.md from its babl.json and finetune.yaml; returns its path, or None
    when the directory holds a README.md of someone else's (neither PEFT's template nor Babl's).

    Args:
        directory: the adapter directory (or the staging directory it is assembled in).
        location: where the adapter lives once published (default: `directory`).
        model_id: the catalog id that serves it, when a catalog entry's `adapter` points at it.
    """
    path = directory / CARD_FILE
    if path.is_file():
        existing = path.read_text(encoding="utf-8", errors="replace")
        if MARKER not in existing and PEFT_TEMPLATE_MARK not in existing:
            return None  # its author's card, not PEFT's empty template or ours
    meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
    config_path = directory / CONFIG_FILE
    config = yaml.safe_load(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    text = render(
        meta, config if isinstance(config, dict) else {}, location=settings.portable_path(location or directory),
        model_id=model_id, python=python_command(),
    )  # fmt: skip
    write_text_atomic(path, text)
    return path


def refresh_model_card(directory: Path, *, location: Path | None = None) -> Path | None:
    """(Re)write the directory's README.md from its babl.json and finetune.yaml (`finetune.model_card`).

    Call it after anything changes `babl.json`, so the card shows what the app reads. A README.md that
    someone else wrote (an adapter trained elsewhere) is left alone: returns None then.
    """
    from babl_core.engine.catalog import CatalogError
    from finetune.config import claiming_entry

    location = location or directory
    claimant = None
    if location.parent.resolve() == settings.adapters_dir().resolve():
        try:
            claimant = claiming_entry(location.name)
        except CatalogError:
            claimant = None  # a broken catalog is reported where it is used; the card names the run
    return write_model_card(directory, location=location, model_id=claimant.id if claimant else None)


def plot_losses(log_history: list[dict], path: Path, *, title: str = "") -> Path | None:
    """A PNG of the training loss (and the evaluation loss, when there is one) against the step.

    Returns the path, or None when the history has no loss to draw.
    """
    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry and "step" in entry]
    evaluation = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    if not train and not evaluation:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    axes = figure.subplots()
    if train:
        axes.plot(*zip(*train, strict=True), label="train loss", color="tab:blue")
    if evaluation:
        axes.plot(*zip(*evaluation, strict=True), label="eval loss", color="tab:orange", marker="o")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(f"{title} loss" if title else "loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    return path


# --------------------------------------------------------------------------------------------------
# Checkpoints


def complete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Checkpoints with a readable trainer state (written last), oldest first.

    A run killed while saving leaves a checkpoint without one; resuming from it would fail, so it is
    skipped and the one before it is used.
    """
    found = []
    if not checkpoint_dir.is_dir():
        return found
    for path in checkpoint_dir.glob("checkpoint-*"):
        suffix = path.name.removeprefix("checkpoint-")
        if not (path.is_dir() and suffix.isdigit()):
            continue
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            log.warning("skipping incomplete checkpoint %s", settings.portable_path(path))
            continue
        found.append((int(suffix), path))
    return [path for _, path in sorted(found)]


def last_checkpoint(checkpoint_dir: Path) -> Path | None:
    checkpoints = complete_checkpoints(checkpoint_dir)
    return checkpoints[-1] if checkpoints else None


def start_checkpoint_dir(config: FinetuneConfig) -> Path:
    """Prepare the checkpoint directory: emptied for a fresh (--overwrite) run, kept for --resume.

    The resolved config is saved there, so a resumed run can be checked against the one it continues.
    """
    path = config.checkpoint_path()
    if is_main_process():
        if not config.run.resume and path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        if not config.run.resume:
            write_text_atomic(path / CONFIG_FILE, config.to_yaml())
    return path


def finish_checkpoint_dir(config: FinetuneConfig) -> None:
    """Delete the checkpoints after a successful run unless `keep_checkpoints`."""
    path = config.checkpoint_path()
    if is_main_process() and not config.train.keep_checkpoints and path.exists():
        shutil.rmtree(path)


@dataclass
class TrainResult:
    """What a finished run produced."""

    output_dir: Path | None
    """The adapter directory (None in processes other than the main one)."""
    metrics: dict = field(default_factory=dict)
    log_history: list[dict] = field(default_factory=list)


def save_and_publish(trainer, config: FinetuneConfig, metrics: dict, save, *, what: str = "adapter"):
    """Save the trained model and publish it; every process must call this, only the main one writes.

    `save(unwrapped_model, staging_dir, state_dict)` writes the files. Returns the recipe's TrainResult
    (output_dir None outside the main process).
    """
    # Other processes may still be writing their part of the last checkpoint (their RNG state), which the
    # main process deletes once the model is published.
    trainer.accelerator.wait_for_everyone()
    staging = staging_dir(config)
    state_dict = trainer.accelerator.get_state_dict(trainer.model)  # a collective step under FSDP
    output_dir = None
    if trainer.is_world_process_zero():
        save(trainer.accelerator.unwrap_model(trainer.model), staging, state_dict)
        output_dir = publish(config, staging, metrics=metrics, log_history=trainer.state.log_history)
        finish_checkpoint_dir(config)
        log.info("%s saved to %s", what, settings.portable_path(output_dir))
    return TrainResult(output_dir=output_dir, metrics=metrics, log_history=list(trainer.state.log_history))


# --------------------------------------------------------------------------------------------------
# What the user reads when a run ends


def python_command() -> str:
    """How to run Python as this run was run: the checkout's `.venv/bin/python`, or plain `python`."""
    import sys

    executable = Path(sys.executable)
    if executable.is_relative_to(settings.REPO_ROOT):
        return executable.relative_to(settings.REPO_ROOT).as_posix()
    return "python"


def final_report(config: FinetuneConfig, result) -> str:
    """The block printed when a run ends: what was trained, where it went and how to use it."""
    import math
    import shlex

    from babl_core.engine.words import count
    from finetune.config import claiming_entry

    m = result.metrics
    where = result.output_dir
    shown = settings.portable_path(where)
    python = python_command()
    figures = f"{count(m['steps'], 'step')} in {m['train_seconds']:.1f} s, train loss {m['train_loss']:.4f}"
    if m.get("eval_loss") is not None:
        figures += (
            f", eval loss {m['eval_loss']:.4f} (perplexity {math.exp(min(m['eval_loss'], 50.0)):.2f}) "
            f"on {count(m['eval_examples'], 'held-out row')}"
        )
    lines = [f"trained {config.run.run_name}: {figures}"]
    if m.get("eval_loss") is not None and m.get("base_eval_loss") is not None:
        lines.append(
            f"held-out loss per answer token on {count(m['eval_examples'], 'row')}: base "
            f"{m['base_eval_loss']:.4f} -> trained {m['eval_loss']:.4f} ({m['eval_loss'] - m['base_eval_loss']:+.4f})"
        )
    rows = [("folder", shown)]
    if (where / PLOT_FILE).is_file():
        rows.append(("loss curve", f"{shown}/{PLOT_FILE}"))
    if (where / CARD_FILE).is_file():
        rows.append(("model card", f"{shown}/{CARD_FILE}"))
    if config.adapter.finetuning == "full":
        rows.append(("serve it", "add an entry with this folder as its base to configs/models.yaml"))
    else:
        claimant = claiming_entry(config.run.run_name)
        model_id = claimant.id if claimant else config.run.run_name
        label = _dropdown_label(model_id) or config.label
        message = EXAMPLE_MESSAGES.get(config.run.task, "Hello")  # the card's example too
        rows += [
            ("task metric", f"{python} -m finetune eval --adapter {config.run.run_name}"),
            ("chat with it", f"{python} -m babl_core generate --model {model_id} {shlex.quote(message)}"),
            ("in the app", f"make run, then pick “{label}” in the settings"),
        ]
    width = max(len(name) for name, _ in rows)
    lines += [f"  {name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)


def _dropdown_label(model_id: str) -> str | None:
    """The label the app's model dropdown shows for `model_id` (None if the catalog cannot say)."""
    from babl_core.engine.catalog import Catalog, CatalogError, UnknownModel

    try:
        return Catalog.load().get(model_id).display_label
    except (CatalogError, UnknownModel):
        return None
