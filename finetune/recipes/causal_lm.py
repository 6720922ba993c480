"""Recipe: LoRA or QLoRA on a causal (decoder-only) model — seed 002's CodeGen, seed 001's CodeLlama.

Setup → train → save, top to bottom:
1. Load the base through `babl_core.engine.loading` (the app's quantization and device policy: nf4 double
   quant with the config's compute dtype where CUDA is present or the config asks for it).
2. Format every example with the run's prompt style (`babl_core.engine.prompts`) and tokenize it with the loss
   on the answer only, unless `loss_on_prompt`.
3. Prepare a k-bit base for training, wrap it in LoRA, and log how many weights train.
4. Train with transformers' Trainer (dynamic padding), or TRL's SFTTrainer when `packing` is on;
   checkpoints every `save_steps`, `--resume` continues from the last one.
5. Save the adapter atomically into models/adapters/<run_name>/ with babl.json and the loss curve.

Runs unchanged under `accelerate launch -m finetune train ...`: the Trainer handles the processes, and
only the main process writes the adapter.
"""

from __future__ import annotations

import logging
import time

from finetune.config import FinetuneConfig
from finetune.outputs import TrainResult

log = logging.getLogger("finetune")


def train(config: FinetuneConfig) -> TrainResult:
    """Run the whole recipe for `config` (already checked by `finetune.config.load_config`)."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import DataCollatorForSeq2Seq, Trainer, set_seed

    from babl_core.engine.loading import load_base, plan_load
    from finetune import factories, outputs
    from finetune.data import IGNORE_INDEX, prepare_data

    started = time.perf_counter()
    factories.quiet_training_noise()
    set_seed(config.train.seed)

    # --- 1. the base, loaded as the app would load it ------------------------------------------------
    base = factories.base_weights(config)
    plan = plan_load(base, factories.training_device())
    loaded = load_base(base, plan)
    model, tokenizer = loaded.model, loaded.tokenizer
    log.info("base %s: %s", config.model.base, loaded.describe())
    tokenizer.padding_side = "right"  # training pads after the answer; the app pads left to generate
    quantized = loaded.plan.quantization in ("nf4", "int8")

    # --- 2. data in the prompt style the app serves with ---------------------------------------------
    data = prepare_data(tokenizer, config, kind="causal")
    eval_rows = len(data.eval.rows) if data.eval else 0
    log.info(
        "data %s: %d train / %d eval examples, %d cut to max_length %d, prompt style %s",
        config.data.dataset, len(data.train.rows), eval_rows, data.train.truncated,
        config.data.max_length, data.style.name,
    )  # fmt: skip

    # --- 3. LoRA (on a k-bit base: QLoRA) --------------------------------------------------------------
    model.config.use_cache = False  # the KV cache only helps generation and warns with checkpointing
    if quantized:
        # Casts norms/embeddings to float32 and makes the frozen 4-bit base safe to backpropagate through.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        factories.keep_4bit_weights_trainable(model)  # evaluations must not break later gradients
    if config.model.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, factories.lora_config(config, "CAUSAL_LM"))
    trainable, total = factories.count_parameters(model)
    log.info(
        "trainable parameters: %s of %s (%.3f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total
    )

    # --- 4. train ------------------------------------------------------------------------------------------
    checkpoint_dir = outputs.start_checkpoint_dir(config)
    train_set = data.train.to_dataset()
    eval_set = data.eval.to_dataset() if data.eval else None
    common = dict(plan=loaded.plan, output_dir=checkpoint_dir, has_eval=eval_set is not None)
    if config.data.packing:
        # TRL packs the already tokenized rows (input_ids + labels, so the answer-only mask survives)
        # into full-length rows without padding.
        from trl import SFTConfig, SFTTrainer

        args = factories.training_arguments(
            config, cls=SFTConfig, packing=True, max_length=config.data.max_length, **common
        )
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=train_set.remove_columns("attention_mask"),
            eval_dataset=eval_set.remove_columns("attention_mask") if eval_set is not None else None,
            processing_class=tokenizer,
        )  # fmt: skip
    else:
        args = factories.training_arguments(config, **common)
        collator = DataCollatorForSeq2Seq(
            tokenizer,
            label_pad_token_id=IGNORE_INDEX,
            pad_to_multiple_of=8 if torch.cuda.is_available() else None,
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=train_set, eval_dataset=eval_set, data_collator=collator
        )
    base_eval = factories.base_evaluation(trainer)  # the base on the same held-out rows, for comparison
    result, final_eval = factories.train_and_evaluate(trainer, config, checkpoint_dir, started=started)

    # --- 5. save: every process takes part, the main one writes -------------------------------------------
    metrics = factories.run_metrics(
        trainer, result, final_eval, data, trainable=trainable, total=total, device=loaded.plan.device,
        started=started, base_eval=base_eval, quantization=loaded.plan.quantization,
        with_context=config.data.with_context if "context" in data.style.optional_fields else None,
    )  # fmt: skip

    def save(unwrapped, staging, state_dict) -> None:
        # LoRA weights only: PEFT would also copy the (unchanged) embeddings when lm_head is adapted.
        unwrapped.save_pretrained(staging, state_dict=state_dict, save_embedding_layers=False)

    return outputs.save_and_publish(trainer, config, metrics, save)
