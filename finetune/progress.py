"""What a person watching a training run sees: one progress bar, and the losses as a small table.

transformers' own `ProgressCallback` opens a second, nested bar for every evaluation and prints each log
as a raw dict (`{'loss': '6.185', 'grad_norm': '3.47', ...}`) to stdout. This callback replaces it: one
bar for the optimizer steps (the latest losses in its postfix) and, above it, a row per evaluation
(or per logged loss when the run holds no rows out), on stderr like the rest of the run's progress.
Only the main process draws anything under `accelerate launch`.

Two more callbacks serve a run started from the chat (`babl_core.web.jobs`), on the same code path as the CLI:
`RunEvents` appends one JSON line per step and per log to the file named by `BABL_PROGRESS_FILE`, which
the app reads for its progress message and loss curve (the tqdm bar is for eyes, not parsers); and
`GracefulStop` turns the first SIGINT (Ctrl-C, or the chat's stop button) into "save a checkpoint at the
end of this step and stop", so a stopped run can be resumed with `--resume true`. A second SIGINT
interrupts at once.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time

from transformers import TrainerCallback

COLUMNS = (("step", 6), ("epoch", 7), ("train loss", 11), ("eval loss", 10), ("perplexity", 11))


def _cell(value, width: int, digits: int = 4) -> str:
    if value is None:
        return "—".rjust(width)
    if isinstance(value, int):
        return str(value).rjust(width)
    return f"{value:.{digits}f}".rjust(width)


class TrainingProgress(TrainerCallback):
    """One tqdm bar over the optimizer steps and a table of losses written above it."""

    def __init__(self, stream=None) -> None:
        self.stream = stream
        self.bar = None
        self.has_eval = False
        self.header_shown = False
        self.last_train_loss: float | None = None
        self.rows: list[dict] = []

    @property
    def _out(self):
        return self.stream or sys.stderr  # whatever stderr is now (tests swap it)

    def _write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self._out)  # above the bar, which redraws below
        else:
            print(text, file=self._out, flush=True)

    def on_train_begin(self, args, state, control, **kwargs):
        self.has_eval = kwargs.get("eval_dataloader") is not None or args.eval_strategy != "no"
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=state.max_steps, initial=state.global_step, desc="training", unit="step",
                dynamic_ncols=True, file=self._out,
            )  # fmt: skip

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs:
            self.last_train_loss = float(logs["loss"])
        if "eval_loss" in logs or ("loss" in logs and not self.has_eval):
            self._add_row(state, logs.get("eval_loss"))
        if self.bar is not None:
            postfix = {}
            if self.last_train_loss is not None:
                postfix["loss"] = f"{self.last_train_loss:.4f}"
            if self.rows and self.rows[-1]["eval loss"] is not None:
                postfix["eval loss"] = f"{self.rows[-1]['eval loss']:.4f}"
            self.bar.set_postfix(postfix, refresh=True)

    def _add_row(self, state, eval_loss) -> None:
        step = state.global_step
        if self.rows and self.rows[-1]["step"] == step and eval_loss is not None:
            self.rows.pop()  # the final evaluation repeats the last one: keep a single row per step
        row = {
            "step": step,
            "epoch": round(state.epoch or 0.0, 2),
            "train loss": self.last_train_loss,
            "eval loss": None if eval_loss is None else float(eval_loss),
            "perplexity": None if eval_loss is None else math.exp(min(float(eval_loss), 50.0)),
        }
        if self.rows and self.rows[-1] == row:
            return
        if not self.header_shown:
            self._write("  ".join(name.rjust(width) for name, width in COLUMNS))
            self.header_shown = True
        self.rows.append(row)
        self._write(
            "  ".join(
                _cell(row[name], width, 2 if name in ("epoch", "perplexity") else 4)
                for name, width in COLUMNS
            )
        )

    # No bar per evaluation: the training bar stays the only one.
    def on_prediction_step(self, args, state, control, **kwargs):
        return None

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


EVENTS_ENV = "BABL_PROGRESS_FILE"


class RunEvents(TrainerCallback):
    """Appends the run's progress as JSON lines to `path` (main process only).

    Lines: {"event": "begin", "step", "total"}, {"event": "step", "step", "total", "seconds"} (at most
    about twice a second, and always the last step), {"event": "log", "step", "epoch", "loss" and/or
    "eval_loss"} (an eval_loss at step 0 is the base model before training), {"event": "stopping",
    "step"} when a stop was asked for.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = path
        self.started = time.monotonic()
        self._last_step_line = 0.0

    def write(self, **event) -> None:
        event["time"] = round(time.time(), 3)
        with open(
            self.path, "a", encoding="utf-8"
        ) as out:  # one short append per line: readers see whole lines
            out.write(json.dumps(event) + "\n")

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.started = time.monotonic()
            self.write(event="begin", step=state.global_step, total=state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        now = time.monotonic()
        if state.is_world_process_zero and (
            now - self._last_step_line >= 0.5 or state.global_step >= state.max_steps
        ):
            self._last_step_line = now
            self.write(
                event="step",
                step=state.global_step,
                total=state.max_steps,
                seconds=round(now - self.started, 3),
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        losses = {key: float(logs[key]) for key in ("loss", "eval_loss") if key in logs}
        if losses:
            self.write(event="log", step=state.global_step, epoch=round(state.epoch or 0.0, 3), **losses)


class GracefulStop(TrainerCallback):
    """The first SIGINT saves a checkpoint at the end of the current step and ends training; the
    caller then raises KeyboardInterrupt (`train_and_evaluate`), so nothing is published and the
    checkpoint stays for `--resume true`. A second SIGINT interrupts at once.

    Single-process runs only: under `accelerate launch` each process would stop at its own step and
    the others would wait for it forever, so there Ctrl-C keeps its default meaning.
    """

    def __init__(self, events: RunEvents | None = None) -> None:
        self.requested = False
        self.events = events
        self._previous = None

    def _on_signal(self, signum, frame) -> None:
        if self.requested:  # the second one: stop now
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = True
        print(
            "finetune: stopping after this step and saving a checkpoint (Ctrl-C again stops at once)",
            file=sys.stderr,
            flush=True,
        )

    def on_train_begin(self, args, state, control, **kwargs):
        single = int(os.environ.get("WORLD_SIZE", "1")) <= 1
        if single and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_signal)

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True
            if self.events is not None:
                self.events.write(event="stopping", step=state.global_step)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def graceful_stop(trainer) -> GracefulStop:
    """The trainer's `GracefulStop` (added with `show_progress`)."""
    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, GracefulStop))


def show_progress(trainer) -> TrainingProgress:
    """Replace the Trainer's progress bars and raw-dict printing with `TrainingProgress` (once: a
    second call, e.g. the base evaluation's before training, returns the one already there)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TrainingProgress):
            return callback

    for cls in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(cls)
    for callback in list(trainer.callback_handler.callbacks):  # e.g. the notebook variant
        if type(callback).__name__.endswith("ProgressCallback"):
            trainer.remove_callback(callback)
    progress = TrainingProgress()
    trainer.add_callback(progress)
    events = RunEvents(os.environ[EVENTS_ENV]) if os.environ.get(EVENTS_ENV) else None
    if events is not None:
        trainer.add_callback(events)
    trainer.add_callback(GracefulStop(events))
    return progress
