"""What a person watching a training run sees: one progress bar, and the losses as a small table.

transformers' own `ProgressCallback` opens a second, nested bar for every evaluation and prints each log
as a raw dict (`{'loss': '6.185', 'grad_norm': '3.47', ...}`) to stdout. This callback replaces it: one
bar for the optimizer steps (the latest losses in its postfix) and, above it, a row per evaluation
(or per logged loss when the run holds no rows out), on stderr like the rest of the run's progress.
Only the main process draws anything under `accelerate launch`.
"""

from __future__ import annotations

import math
import sys

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
    return progress
