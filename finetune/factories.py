"""Small factories that turn a run config into the Hugging Face objects the recipes use.

They are shared by every recipe (and with the app, where the app has the same need): the device and
quantization policy come from `babl_core.engine.loading`, so a base is quantized for training exactly as it is
for serving (the seeds' nf4 double-quant `BitsAndBytesConfig`).
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path

from babl_core import settings
from babl_core.engine.catalog import BaseWeights
from finetune.config import FinetuneConfig

log = logging.getLogger(__name__)


def training_device() -> str:
    """`BABL_DEVICE` (auto: CUDA when present); under `accelerate launch`, this process's own GPU."""
    from babl_core.engine.devices import resolve_device

    device = resolve_device()
    local_rank = os.environ.get("LOCAL_RANK")
    if device.startswith("cuda") and local_rank is not None:
        device = f"cuda:{int(local_rank)}"
    return device


def base_weights(config: FinetuneConfig) -> BaseWeights:
    """The run's base and how to load it, so `babl_core.engine.loading` applies the app's policy to it."""
    model = config.model
    in_demo_dir = False
    if model.base:
        try:
            in_demo_dir = (
                settings.resolve_path(model.base).resolve().is_relative_to(settings.demo_dir().resolve())
            )
        except OSError:
            in_demo_dir = False
    return BaseWeights(
        base=model.base,
        gguf_file=model.gguf_file,
        kind=model.kind,
        quantization=model.quantization,
        dtype=model.dtype,
        demo=in_demo_dir,
        name=config.run.run_name or "",
    )


def lora_config(config: FinetuneConfig, task_type: str):
    """PEFT's LoraConfig from the adapter settings (`task_type`: CAUSAL_LM or SEQ_2_SEQ_LM)."""
    from peft import LoraConfig

    adapter = config.adapter
    return LoraConfig(
        r=adapter.lora_r,
        lora_alpha=adapter.lora_alpha,
        lora_dropout=adapter.lora_dropout,
        bias=adapter.lora_bias,
        target_modules=adapter.target_modules,
        task_type=task_type,
    )


def training_arguments(config: FinetuneConfig, *, plan, output_dir, has_eval: bool, cls=None, **extra):
    """TrainingArguments (or a subclass: Seq2SeqTrainingArguments, TRL's SFTConfig) for this run.

    Mixed precision follows the load plan: bf16/fp16 autocast on CUDA with that compute dtype, none on
    CPU (LoRA weights stay float32 there). Activation checkpointing is switched on by the recipe itself,
    before PEFT wraps the model, so it is off here.
    """
    from transformers import TrainingArguments

    cls = cls or TrainingArguments
    train = config.train
    cuda = plan.device.startswith("cuda")
    eval_steps = train.eval_steps or train.save_steps
    kwargs = dict(
        output_dir=str(output_dir),
        learning_rate=train.learning_rate,
        num_train_epochs=train.num_train_epochs,
        max_steps=train.max_steps,
        per_device_train_batch_size=train.per_device_train_batch_size,
        per_device_eval_batch_size=train.per_device_eval_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        warmup_steps=train.warmup_steps,
        lr_scheduler_type=train.lr_scheduler_type,
        weight_decay=train.weight_decay,
        train_sampling_strategy=sampling_strategy(train.train_sampling_strategy, plan.device),
        seed=train.seed,
        data_seed=train.seed,
        logging_steps=train.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_steps if has_eval else None,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        bf16=cuda and plan.dtype == "bfloat16",
        fp16=cuda and plan.dtype == "float16",
        use_cpu=plan.device == "cpu",
        activation_checkpointing=False,
        report_to="none",
        disable_tqdm=False,
        dataloader_pin_memory=cuda,
        # Every LoRA weight takes part in each forward pass, so DDP need not search the graph for unused
        # ones (a traversal per step, and a warning printed by every process). Full fine-tunes keep the check.
        ddp_find_unused_parameters=False if config.adapter.finetuning == "lora" else None,
        **extra,
    )
    if train.optim:
        kwargs["optim"] = train.optim
    return cls(**kwargs)


def sampling_strategy(setting: str, device: str) -> str:
    """The Trainer's row order for `train_sampling_strategy` on `device` (`auto` decided by measurement).

    On CPU a step costs in proportion to its padded tokens: on variable-length data (bench/finetune.py)
    batches of random rows were 36% padding, length-grouped ones 14%, and the recipe trained 1.5x more real
    tokens/s (2956 vs 1948, 2 cores). GPUs were not measured here, so `auto` keeps the random order there.
    """
    if setting != "auto":
        return setting
    return "group_by_length" if device == "cpu" else "random"


def count_parameters(model) -> tuple[int, int]:
    """(trainable, all) parameters; 4-bit weights count as their unpacked size, as PEFT reports them."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def final_evaluation(trainer) -> dict:
    """The eval metrics at the last step: the trainer's own when it just evaluated, else one more pass."""
    history = trainer.state.log_history
    last = next((entry for entry in reversed(history) if "eval_loss" in entry), None)
    if last is not None and last.get("step") == trainer.state.global_step:
        return last
    return trainer.evaluate()


def base_evaluation(trainer) -> dict:
    """The eval metrics of the base model before any training: the same held-out rows, prompt style,
    batches and loss as the final evaluation, so `base_eval_loss` and `eval_loss` compare like for like.

    The adapter is switched off for the pass (a fresh LoRA adds exactly zero anyway, and a full fine-tune
    has not changed a weight yet). Returns {} without an eval set. The pass is kept out of the trainer's
    history, which (like the loss curve, the checkpoints and a resumed run) starts at step 1.
    """
    from contextlib import nullcontext

    from finetune.progress import show_progress

    if trainer.eval_dataset is None:
        return {}
    show_progress(trainer)  # Babl's progress output from the first evaluation on, not tqdm's bars
    model = trainer.model
    off = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
    with off:
        metrics = trainer.evaluate()
    history = trainer.state.log_history
    if history and "eval_loss" in history[-1] and history[-1].get("step", 0) == 0:
        history.pop()
    log.info(
        "base model on the %d held-out rows, before training: eval loss %.4f",
        len(trainer.eval_dataset), metrics["eval_loss"],
    )  # fmt: skip
    return metrics


PROGRESS_FILE = "babl_progress.json"  # in each checkpoint: the run's seconds up to that save


def honest_loss_scaling(trainer) -> None:
    """Make the Trainer's loss bookkeeping match a model whose loss ignores `num_items_in_batch`.

    transformers 5.23 passes `num_items_in_batch` (the token count of the whole optimizer step, summed
    over processes) to any model whose forward takes `**kwargs`, then trusts the model to divide by
    it: it skips its own division by gradient_accumulation_steps and, across N processes, multiplies
    the loss by N (DDP averages the gradients again). T5's forward takes `**kwargs` but returns the
    plain mean over its own batch, so under `accelerate launch` with N processes every logged loss,
    the train_loss and the gradients were N times too large (and gradient_accumulation_steps times
    too large with accumulation). Telling the Trainer that the model does not take the count restores
    its own averaging. Causal models' losses do use the count and are left alone.
    """
    trainer.model_accepts_loss_kwargs = False


def _progress_callback(started: float, seconds_before: float):
    """A callback that writes the run's seconds so far into each checkpoint (main process only)."""
    from transformers import TrainerCallback

    from finetune.files import write_text_atomic

    class RecordProgress(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if checkpoint.is_dir():
                    seconds = seconds_before + time.perf_counter() - started
                    write_text_atomic(checkpoint / PROGRESS_FILE, json.dumps({"seconds": seconds}) + "\n")

    return RecordProgress()


def _seconds_before(checkpoint) -> float:
    try:
        return float(json.loads((Path(checkpoint) / PROGRESS_FILE).read_text())["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0  # a checkpoint written before this file existed: only this session's time is known


def whole_run_train_loss(
    log_history: list[dict], session_loss: float, *, resumed_at: int, steps: int
) -> float:
    """The mean training loss over every step of a run that was resumed at step `resumed_at`.

    The Trainer's own `training_loss` covers the steps of this session only. The earlier session's
    losses come back with the checkpoint's log history (each logged loss is the mean over the steps
    since the previous log), so they are weighted by those step counts. Steps after the earlier
    session's last log and before its checkpoint were never logged and are left out.
    """
    if resumed_at <= 0:
        return session_loss
    total, covered, last = 0.0, 0, 0
    for entry in log_history:
        step = entry.get("step", 0)
        if "loss" in entry and last < step <= resumed_at:
            total += entry["loss"] * (step - last)
            covered += step - last
            last = step
    session_steps = max(steps - resumed_at, 0)
    if covered + session_steps == 0:
        return session_loss
    return (total + session_loss * session_steps) / (covered + session_steps)


def train_and_evaluate(
    trainer, config: FinetuneConfig, checkpoint_dir, *, started: float | None = None
) -> tuple:
    """`trainer.train()` — from the last complete checkpoint with `--resume` — then the final eval
    metrics ({} without an eval set). Returns (the trainer's TrainOutput, eval metrics).

    A resumed run's TrainOutput describes the whole run: `training_loss` over the steps of every
    session (`whole_run_train_loss`), and `metrics["seconds_before_resume"]` the time the sessions
    before this one spent up to the checkpoint it continues (`run_metrics` adds it to train_seconds).
    """
    from finetune import outputs
    from finetune.progress import graceful_stop, show_progress

    started = time.perf_counter() if started is None else started
    show_progress(trainer)
    resume_from = outputs.last_checkpoint(checkpoint_dir) if config.run.resume else None
    seconds_before = _seconds_before(resume_from) if resume_from is not None else 0.0
    if resume_from is not None:
        log.info("resuming from %s", resume_from)
    trainer.add_callback(_progress_callback(started, seconds_before))
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if graceful_stop(trainer).requested:
        # Stopped on request: the checkpoint of the last step stays, nothing is published.
        raise KeyboardInterrupt
    if resume_from is not None:
        resumed_at = int(Path(resume_from).name.removeprefix("checkpoint-"))
        loss = whole_run_train_loss(
            trainer.state.log_history, result.training_loss, resumed_at=resumed_at, steps=result.global_step
        )
        for entry in reversed(trainer.state.log_history):  # trainer_log.json's summary entry says the same
            if "train_loss" in entry:
                entry["train_loss"] = loss
                break
        result = result._replace(
            training_loss=loss,
            metrics={**result.metrics, "train_loss": loss, "seconds_before_resume": seconds_before},
        )
    final_eval = final_evaluation(trainer) if trainer.eval_dataset is not None else {}
    return result, final_eval


def run_metrics(trainer, result, final_eval: dict, data, *, trainable: int, total: int, device: str,
                started: float, base_eval: dict | None = None, **recipe_fields) -> dict:  # fmt: skip
    """The metrics `babl.json` records for a run; `recipe_fields` (a recipe's own) go before the device.

    `base_eval_loss` (from `base_evaluation`) stands beside `eval_loss`: the base model and the trained
    one on the same held-out rows.
    """
    base_eval = base_eval or {}
    return {
        "train_loss": round(result.training_loss, 6),
        "eval_loss": round(final_eval["eval_loss"], 6) if "eval_loss" in final_eval else None,
        "base_eval_loss": round(base_eval["eval_loss"], 6) if "eval_loss" in base_eval else None,
        "steps": result.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 3),
        "train_examples": len(data.train.rows),
        "eval_examples": len(data.eval.rows) if data.eval else 0,
        "trainable_parameters": trainable,
        "total_parameters": total,
        **recipe_fields,
        "device": device,
        "train_seconds": round(
            time.perf_counter() - started + result.metrics.get("seconds_before_resume", 0.0), 1
        ),
    }


def quiet_training_noise() -> None:
    """Silence warnings that are expected here and say nothing to the user.

    - With lm_head adapted, PEFT copies the frozen embeddings into every checkpoint and warns each
      time; the copies are harmless (resume reads them back) and the final adapter leaves them out.
    - transformers 5.23 deprecates `is_gradient_checkpointing`, which PEFT 0.21 still reads.
    """
    warnings.filterwarnings("ignore", message="Setting `save_embedding_layers` to `True`")
    warnings.filterwarnings(
        "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
    )


def keep_4bit_weights_trainable(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel; returns the count.

    bitsandbytes 0.50, on CPUs with AVX512-BF16, repacks a Linear4bit's weight the first time it runs
    in eval mode without gradients (the Trainer's evaluation does exactly that). The repacked layout is
    served by `gemv_4bit`, which has no autograd kernel: every later training step would silently lose
    the gradient through the frozen base, so LoRA layers below it stop learning correctly.
    """
    count = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count
