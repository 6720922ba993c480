"""The README.md of an adapter directory: a model card written by Babl from the run's own files.

PEFT's `save_pretrained` leaves a template full of "[More Information Needed]". Babl knows everything a
reader needs — base, data set and row counts, recipe and hyper-parameters, metrics, how to load it — so
the card is rendered from the directory's `babl.json` (what the app reads) and `finetune.yaml` (the
resolved run config). It is rendered again whenever `babl.json` changes (`finetune eval` adds metrics),
and it renders every metric `babl.json` holds, nested or not, so new metrics appear without code here.
"""

from __future__ import annotations

import json

CARD_FILE = "README.md"
MARKER = "<!-- written by Babl's finetune from babl.json and finetune.yaml; rewritten when they change -->"
PEFT_TEMPLATE_MARK = "[More Information Needed]"

TASKS = {
    "html": "writing HTML pages from a description",
    "python": "writing Python from an instruction",
    "code": "writing Python from a description",
    "email": "writing an email from its key points",
    "qa": "answering questions (with or without a context passage)",
    "chat": "chat",
}
EXAMPLE_MESSAGES = {
    "html": "Write an HTML page for a bakery with a menu and opening hours",
    "python": "Reverse a string",
    "code": "Return the largest number in a list",
    "email": "Key points: the office is closed on Friday",
    "qa": "Question: Who wrote Hamlet?",
    "chat": "Hello! What can you do?",
}
# Settings shown under "Recipe and hyper-parameters", in this order, when the run config has them.
HYPER_PARAMETERS = (
    "finetuning", "lora_r", "lora_alpha", "lora_dropout", "lora_bias", "target_modules", "quantization",
    "dtype", "gradient_checkpointing", "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay",
    "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
    "max_length", "max_target_length", "loss_on_prompt", "packing", "with_context", "seed",
)  # fmt: skip
# The task metrics' names, shared with eval's terminal table (finetune/evaluation.py: METRIC_LABELS).
TASK_METRIC_NAMES = {
    "exact_match": "exact match",
    "f1": "F1",
    "rouge1": "ROUGE-1",
    "rouge2": "ROUGE-2",
    "rougeL": "ROUGE-L",
    "html_valid_fraction": "valid HTML5",
}
METRIC_NAMES = {
    "train_loss": "train loss",
    "eval_loss": "eval loss",
    **TASK_METRIC_NAMES,
    "eval": "evaluation",
    "split": "held-out rows",
    "humaneval": "HumanEval",
}


def _name(key: str) -> str:
    return METRIC_NAMES.get(key, key.replace("_", " "))


def _value(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"  # 5.2955, 32.9, 0.05, 181.261
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def _flatten(metrics: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    flat: dict[tuple[str, ...], object] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, (*prefix, str(key))))
        else:
            flat[(*prefix, str(key))] = value
    return flat


def _base_twin(path: tuple[str, ...]) -> tuple[str, ...] | None:
    """The path of the adapter's own figure that a base-model figure compares with, else None:
    `base_x` pairs with `x`, and anything under a `base` level with the same path without it."""
    for index, part in enumerate(path):
        if part == "base":
            return path[:index] + path[index + 1 :]
        if part.startswith("base_") and part != "base_model":
            return (*path[:index], part.removeprefix("base_"), *path[index + 1 :])
    return None


def metrics_table(metrics: dict) -> list[str]:
    """Markdown rows for every metric in `metrics` (nested levels joined by ›); base-model figures
    paired with the adapter's in a second column when the record has them."""
    flat = _flatten(metrics)
    base_of = {}
    for path, value in flat.items():
        twin = _base_twin(path)
        if twin is not None and twin in flat:
            base_of[twin] = value
    paired = {_base_twin(path) for path in flat if _base_twin(path) in flat}
    shown = [path for path in flat if not (_base_twin(path) in paired and _base_twin(path) is not None)]
    if base_of:
        rows = ["| metric | this adapter | base model alone |", "|---|---|---|"]
        rows += [
            f"| {' › '.join(_name(p) for p in path)} | {_value(flat[path])} | "
            f"{_value(base_of[path]) if path in base_of else ''} |"
            for path in shown
        ]
    else:
        rows = ["| metric | value |", "|---|---|"]
        rows += [f"| {' › '.join(_name(p) for p in path)} | {_value(flat[path])} |" for path in shown]
    return rows


def _example_input(style_name: str, message: str) -> str | None:
    """The text the model is given for `message`, rendered by the run's prompt style as the app does."""
    try:
        from babl_core.engine.prompts import get_style

        return get_style(style_name).render([{"role": "user", "content": message}], tokenizer=None)
    except Exception:  # a custom style that needs its tokenizer: the card just leaves the example out
        return None


def render(
    meta: dict, config: dict, *, location: str, model_id: str | None = None, python: str = "python"
) -> str:
    """The card's Markdown for an adapter's `babl.json` (`meta`) and resolved run config (`config`).

    Args:
        location: the directory as the reader should type it (e.g. models/adapters/<run>).
        model_id: the catalog id that serves it (a catalog entry it fills), default the run name.
        python: how to run Python here (e.g. .venv/bin/python).
    """
    run = meta.get("id") or config.get("run_name", "adapter")
    model_id = model_id or run
    task = meta.get("task") or config.get("task", "")
    base = meta.get("base") or config.get("base", "")
    metrics = meta.get("metrics") if isinstance(meta.get("metrics"), dict) else {}
    full = config.get("finetuning") == "full"
    seq2seq = config.get("kind") == "seq2seq"
    what = "fine-tuned model" if full else "LoRA adapter"
    message = EXAMPLE_MESSAGES.get(task, "Hello")

    lines = [
        "---",
        f"base_model: {json.dumps(base)}",
        "library_name: peft" if not full else "library_name: transformers",
        f"tags: [babl, {'full-fine-tune' if full else 'lora'}, {task or 'text'}]",
        "---",
        "",
        MARKER,
        "",
        f"# {meta.get('label') or run}",
        "",
        f"A {what} for {TASKS.get(task, task or 'text generation')}, trained with Babl's `finetune` "
        f"(recipe `{meta.get('recipe', 'custom')}`, run `{run}`) on {meta.get('created', 'an unknown date')}.",
        "",
        "## Base model and data",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base}` ({config.get('kind', 'auto')}) |",
    ]
    dataset = config.get("dataset")
    if dataset:
        source = f"`{dataset}`"
        if config.get("dataset_config"):
            source += f" ({config['dataset_config']})"
        lines.append(f"| data set | {source}, split `{config.get('dataset_split', 'train')}` |")
    if "train_examples" in metrics:
        lines.append(f"| training rows | {metrics['train_examples']} |")
    if "eval_examples" in metrics:
        lines.append(f"| held-out rows | {metrics['eval_examples']} (used for the eval loss and metrics) |")
    if config.get("columns"):
        mapping = ", ".join(f"{field} ← `{column}`" for field, column in config["columns"].items())
        lines.append(f"| columns | {mapping} |")
    example = _example_input(meta.get("prompt_style", ""), message)
    lines += ["", "## Recipe and hyper-parameters", "", "| setting | value |", "|---|---|"]
    lines += [f"| {key} | {_value(config[key])} |" for key in HYPER_PARAMETERS if key in config]
    lines += ["", "## Metrics", ""]
    if metrics:
        lines += metrics_table(metrics)
        lines += [
            "",
            "Losses are per answer token on this run's rows; `python -m finetune eval` adds the task's "
            "own metric (and re-writes this card).",
        ]
    else:
        lines.append(
            "No metrics recorded yet: `python -m finetune eval --adapter " + run + "` measures them."
        )
    lines += ["", "## Use it in Babl", ""]
    if full:
        lines.append(
            f"Add an entry with `base: {location}` to `configs/models.yaml`; it then appears in the app's "
            "model dropdown and in `babl_core models`."
        )
    else:
        lines += [
            f"It is listed as `{model_id}` in the app's model dropdown (`make run`) and by "
            f"`{python} -m babl_core models`. From the command line:",
            "",
            "```bash",
            f"{python} -m babl_core generate --model {model_id} {json.dumps(message)}",
            "```",
        ]
    if not full:
        auto = "AutoModelForSeq2SeqLM" if seq2seq else "AutoModelForCausalLM"
        prompt = example if example is not None else message
        lines += [
            "",
            "## Use it with plain PEFT",
            "",
            "```python",
            "from peft import PeftModel",
            f"from transformers import {auto}, AutoTokenizer",
            "",
            f"tokenizer = AutoTokenizer.from_pretrained({base!r})",
            f"model = PeftModel.from_pretrained({auto}.from_pretrained({base!r}), {location!r})",
            f"inputs = tokenizer({prompt!r}, return_tensors='pt')",
            "output = model.generate(**inputs, max_new_tokens=64)",
            "print(tokenizer.decode(output[0], skip_special_tokens=True))",
            "```",
        ]
        if example is not None:
            lines += [
                "",
                "The input above is the prompt format the adapter was trained on (Babl renders chat messages "
                "into it); other formats work less well.",
            ]
    return "\n".join(lines) + "\n"
