"""Recipe: T5 (encoder-decoder) with a LoRA adapter or full fine-tuning — seeds 000, 003 and 004.

Setup → train → save, top to bottom:
1. Load the base through `babl_core.engine.loading` (T5 is small: unquantized, as the catalog serves it).
2. Format every example with the run's T5 style (`t5-email`, `t5-qa`, `t5-code` from
   `babl_core.engine.prompts`): the prompt is the encoder input, the target the labels (T5 adds `</s>`).
3. Wrap the model in a `SEQ_2_SEQ_LM` LoRA, or train every weight (`finetuning: full`).
4. Train with transformers' Seq2SeqTrainer; checkpoints every `save_steps`, `--resume` continues.
5. Save atomically: a LoRA to models/adapters/<run_name>/ (where the catalog's email/qa/code entries
   wait for it), a full fine-tune to models/finetuned/<run_name>/ (a complete model directory).
"""

from __future__ import annotations

import logging
import time

from finetune.config import FinetuneConfig
from finetune.outputs import TrainResult

log = logging.getLogger("finetune")


def train(config: FinetuneConfig) -> TrainResult:
    """Run the whole recipe for `config` (already checked by `finetune.config.load_config`)."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments, set_seed

    from babl_core.engine.loading import load_base, plan_load
    from finetune import factories, outputs
    from finetune.data import IGNORE_INDEX, prepare_data

    started = time.perf_counter()
    factories.quiet_training_noise()
    set_seed(config.train.seed)
    full = config.adapter.finetuning == "full"

    # --- 1. the base, loaded as the app would load it ------------------------------------------------
    base = factories.base_weights(config)
    plan = plan_load(base, factories.training_device())
    loaded = load_base(base, plan)
    model, tokenizer = loaded.model, loaded.tokenizer
    log.info("base %s: %s", config.model.base, loaded.describe())

    # --- 2. data in the T5 style the app serves with ---------------------------------------------------
    data = prepare_data(tokenizer, config, kind="seq2seq")
    eval_rows = len(data.eval.rows) if data.eval else 0
    log.info(
        "data %s: %d train / %d eval examples, %d cut to max_length %d / max_target_length %d, style %s",
        config.data.dataset, len(data.train.rows), eval_rows, data.train.truncated, config.data.max_length,
        config.data.max_target_length, data.style.name,
    )  # fmt: skip

    # --- 3. LoRA, or every weight ---------------------------------------------------------------------------
    model.config.use_cache = False
    if loaded.plan.quantization in ("nf4", "int8"):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        factories.keep_4bit_weights_trainable(model)  # evaluations must not break later gradients
    if config.model.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if full:
        model.requires_grad_(True)
    else:
        model = get_peft_model(model, factories.lora_config(config, "SEQ_2_SEQ_LM"))
    trainable, total = factories.count_parameters(model)
    log.info(
        "trainable parameters: %s of %s (%.3f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total
    )

    # --- 4. train ------------------------------------------------------------------------------------------
    checkpoint_dir = outputs.start_checkpoint_dir(config)
    train_set = data.train.to_dataset()
    eval_set = data.eval.to_dataset() if data.eval else None
    args = factories.training_arguments(
        config, cls=Seq2SeqTrainingArguments, plan=loaded.plan, output_dir=checkpoint_dir,
        has_eval=eval_set is not None, predict_with_generate=False,
    )  # fmt: skip
    # T5 shifts the labels right into decoder inputs itself (-100 becomes pad), so the collator only pads.
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX)
    trainer = Seq2SeqTrainer(
        model=model, args=args, train_dataset=train_set, eval_dataset=eval_set, data_collator=collator
    )
    factories.honest_loss_scaling(trainer)  # T5's loss is a batch mean: see the function
    base_eval = factories.base_evaluation(trainer)  # the base on the same held-out rows, for comparison
    result, final_eval = factories.train_and_evaluate(trainer, config, checkpoint_dir, started=started)

    # --- 5. save: every process takes part, the main one writes -------------------------------------------
    metrics = factories.run_metrics(
        trainer, result, final_eval, data, trainable=trainable, total=total, device=loaded.plan.device,
        started=started, base_eval=base_eval, finetuning=config.adapter.finetuning,
        with_context=config.data.with_context if "context" in data.style.optional_fields else None,
    )  # fmt: skip

    def save(unwrapped, staging, state_dict) -> None:
        if full:
            # A complete model directory (weights + tokenizer) that the catalog can use as a base.
            unwrapped.save_pretrained(staging, state_dict=state_dict)
            tokenizer.save_pretrained(staging)
        else:
            unwrapped.save_pretrained(staging, state_dict=state_dict, save_embedding_layers=False)

    return outputs.save_and_publish(trainer, config, metrics, save, what="model" if full else "adapter")
