"""Training examples: rows from a hub data set or a local file, mapped onto a prompt style's fields,
formatted by `babl_core.engine.prompts` and tokenized with their loss mask.

The prompt text comes only from `PromptStyle.training_pair`, the same code the app renders chat prompts
with, so a model is trained on exactly the format it is served with. The rules of that module apply:
a causal prompt is tokenized with `add_special_tokens = not style.uses_bos_in_text(tokenizer)`, the
target gets `eos_token_id` appended here, and T5 tokenizers add `</s>` themselves. Prompt and target
are tokenized separately, because at inference the prompt is tokenized alone and the model continues it.

Builders follow one shape: tokenizer first, everything else keyword-only.
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from babl_core import settings
from babl_core.engine import words
from finetune.config import LOCAL_DATA_SUFFIXES, DataArgs, FinetuneConfig, is_local_dataset

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value that PyTorch's cross-entropy (and so every HF model) skips


class DataError(ValueError):
    """The data set cannot feed this run (unreadable, or missing the columns the prompt style needs)."""


# --------------------------------------------------------------------------------------------------
# Rows


def load_rows(data: DataArgs, *, name: str | None = None):
    """The raw rows as a `datasets.Dataset`: a local file by its suffix, else a hub data set by name.

    Args:
        data: the data settings.
        name: another file to read with the same settings (the `eval_dataset`); default `data.dataset`.

    Raises:
        DataError: the file cannot be parsed, or the hub data set cannot be loaded (the message says why).
    """
    import datasets

    name = name or data.dataset
    if is_local_dataset(name):
        path = settings.resolve_path(name)
        builder = LOCAL_DATA_SUFFIXES.get(path.suffix.lower())
        if path.is_file() and _only_whitespace(path):
            # datasets' JSON reader ends in a bare StopIteration on an empty file.
            raise DataError(f"dataset: {settings.portable_path(path)} is empty: it has no rows to train on")
        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # a local file reads in milliseconds: no bar for that
        try:
            if path.is_dir():  # a folder of data files (e.g. parquet shards): datasets picks the builder
                return datasets.load_dataset(str(path), split="train")
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        except (OSError, ValueError, StopIteration, datasets.exceptions.DatasetGenerationError) as exc:
            if "corresponds to no data" in str(exc):  # a CSV with only its header line, for example
                raise DataError(f"dataset: {settings.portable_path(path)} has no rows to train on") from None
            raise DataError(f"dataset: could not read {settings.portable_path(path)}: {exc}") from exc
        finally:
            if bars:
                datasets.enable_progress_bars()
    try:
        return datasets.load_dataset(name, data.dataset_config, split=data.dataset_split)
    except Exception as exc:  # network, unknown name, bad config/split: all end in the same advice
        raise DataError(
            f"dataset: could not load {name!r} (config {data.dataset_config!r}, split {data.dataset_split!r}) "
            f"from the hub: {exc.__class__.__name__}: {exc}. Check the name and the network, or use a local "
            "file (dataset: path/to/rows.jsonl)"
        ) from exc


def _only_whitespace(path, chunk: int = 1 << 16) -> bool:
    """True when the file holds nothing but whitespace (read until the first other byte)."""
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            if block.strip():
                return False
    return True


def resolve_columns(
    style, column_names: list[str], mapping: dict[str, str], *, source: str
) -> dict[str, str]:
    """Map each of the style's fields to a column path (`answers.text.0` reads inside a column).

    A field not named in `mapping` uses the column of the same name when there is one.

    Raises:
        DataError: a required field has no column, or a mapping names a column the data set lacks; the
            message names the expected fields and the columns found.
    """
    columns: dict[str, str] = {}
    problems: list[str] = []
    for name in (*style.required_fields, *style.optional_fields):
        path = mapping.get(name) or (name if name in column_names else None)
        if path is None:
            if name in style.required_fields:
                problems.append(
                    f"field {name!r} has no column (no `columns: {{{name}: ...}}` and no column {name!r})"
                )
            continue
        head = path.split(".", 1)[0]
        if head not in column_names:
            problems.append(f"field {name!r} is mapped to column {head!r}, which does not exist")
            continue
        columns[name] = path
    if problems:
        optional = f" (optional: {', '.join(style.optional_fields)})" if style.optional_fields else ""
        raise DataError(
            f"dataset {source}: prompt style {style.name!r} expects the fields "
            f"{', '.join(style.required_fields)}{optional}; found the columns {', '.join(column_names)}.\n"
            + "\n".join(f"  - {p}" for p in problems)
            + "\nMap fields to columns in the config, e.g. `columns: {"
            + ", ".join(f"{n}: <column>" for n in style.required_fields)
            + "}`"
        )
    return columns


def value_at(row: dict, path: str) -> Any:
    """The value at a dotted path (`answers.text.0`), or None where the path leads nowhere."""
    value: Any = row
    for part in path.split("."):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, (list, tuple)) and part.lstrip("-").isdigit():
            index = int(part)
            value = value[index] if -len(value) <= index < len(value) else None
        else:
            return None
    return value


def example_fields(row: dict, columns: dict[str, str], *, with_context: bool = True) -> dict[str, str | None]:
    """The style's fields of one row: text, lists of text joined by newlines, None when absent."""
    fields: dict[str, str | None] = {}
    for name, path in columns.items():
        value = value_at(row, path)
        if isinstance(value, (list, tuple)):
            value = "\n".join(str(v) for v in value)
        elif value is not None and not isinstance(value, str):
            value = str(value)
        fields[name] = value
    if not with_context:
        fields["context"] = None  # seed 004's experiment: the question alone
    return fields


def split_rows(
    dataset, *, eval_fraction: float, seed: int, max_train: int | None = None, max_eval: int | None = None,
    eval_dataset=None,
):  # fmt: skip
    """Seeded train/eval split of the raw rows; returns (train, eval or None).

    With `eval_dataset` (rows held out by their own file, e.g. by module) nothing is cut from `dataset`:
    both are shuffled by `seed`, so `max_train`/`max_eval` take a seeded sample of each.
    """
    if eval_dataset is not None:
        train, evaluation = dataset.shuffle(seed=seed), eval_dataset.shuffle(seed=seed)
    elif eval_fraction > 0 and len(dataset) >= 2:
        parts = dataset.train_test_split(test_size=eval_fraction, seed=seed, shuffle=True)
        train, evaluation = parts["train"], parts["test"]
    else:
        train, evaluation = dataset.shuffle(seed=seed), None
    if max_train is not None and len(train) > max_train:
        train = train.select(range(max_train))
    if evaluation is not None and max_eval is not None and len(evaluation) > max_eval:
        evaluation = evaluation.select(range(max_eval))
    return train, evaluation


# --------------------------------------------------------------------------------------------------
# Tokenized examples


@dataclass
class EncodedSet:
    """Tokenized examples plus what happened on the way (for the dry run and the logs)."""

    rows: list[dict]
    """{"input_ids", "attention_mask", "labels"} per kept example."""
    lengths: list[int] = field(default_factory=list)
    """Untruncated tokens per kept example: prompt + answer + EOS (causal) or the encoder input (seq2seq)."""
    target_lengths: list[int] = field(default_factory=list)
    """Seq2seq: untruncated label tokens per kept example."""
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    """Reason -> rows left out (empty fields, a prompt that alone fills max_length)."""
    texts: list[tuple[str, str]] = field(default_factory=list)
    """(prompt, target) per kept example, as the style rendered them."""

    def to_dataset(self):
        from datasets import Dataset

        if not self.rows:
            return Dataset.from_dict({"input_ids": [], "attention_mask": [], "labels": []})
        return Dataset.from_list(self.rows)


def _pairs(tokenizer, rows: list[dict], *, style, columns, with_context: bool, dropped: dict[str, int]):
    """(prompt, target) per usable row; rows with an empty required field are counted and skipped."""
    pairs = []
    for row in rows:
        fields = example_fields(row, columns, with_context=with_context)
        empty = [name for name in style.required_fields if not (fields.get(name) or "").strip()]
        if empty:
            reason = f"empty {', '.join(empty)}"
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        pairs.append(style.training_pair(fields, tokenizer))
    return pairs


def encode_causal(
    tokenizer, rows: list[dict], *, style, columns: dict[str, str], max_length: int,
    loss_on_prompt: bool = False, with_context: bool = True,
) -> EncodedSet:  # fmt: skip
    """Prompt + target + EOS per row, cut to `max_length`; labels mask the prompt unless `loss_on_prompt`.

    A row whose prompt alone fills `max_length` is dropped (it would teach nothing but the prompt).
    """
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token: causal training needs one to end each answer")
    dropped: dict[str, int] = {}
    pairs = _pairs(tokenizer, rows, style=style, columns=columns, with_context=with_context, dropped=dropped)
    add_special_tokens = not style.uses_bos_in_text(tokenizer)
    prompts = [p for p, _ in pairs]
    targets = [t for _, t in pairs]
    prompt_ids = tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"] if pairs else []
    target_ids = tokenizer(targets, add_special_tokens=False)["input_ids"] if pairs else []
    out = EncodedSet(rows=[], dropped=dropped)
    for (prompt, target), p_ids, t_ids in zip(pairs, prompt_ids, target_ids, strict=True):
        t_ids = [*t_ids, tokenizer.eos_token_id]
        if len(p_ids) >= max_length:
            out.dropped["prompt fills max_length"] = out.dropped.get("prompt fills max_length", 0) + 1
            continue
        full = len(p_ids) + len(t_ids)
        if full > max_length:
            out.truncated += 1
            t_ids = t_ids[: max_length - len(p_ids)]
        input_ids = p_ids + t_ids
        labels = list(input_ids) if loss_on_prompt else [IGNORE_INDEX] * len(p_ids) + t_ids
        out.rows.append({"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels})
        out.lengths.append(full)
        out.texts.append((prompt, target))
    return out


def encode_seq2seq(
    tokenizer, rows: list[dict], *, style, columns: dict[str, str], max_source_length: int,
    max_target_length: int, with_context: bool = True,
) -> EncodedSet:  # fmt: skip
    """Encoder input and labels per row; the tokenizer appends `</s>` to both (T5's own rule).

    Too long inputs and labels are cut, keeping their final `</s>` (as `truncation=True` would).
    """
    dropped: dict[str, int] = {}
    pairs = _pairs(tokenizer, rows, style=style, columns=columns, with_context=with_context, dropped=dropped)
    sources = tokenizer([p for p, _ in pairs])["input_ids"] if pairs else []
    targets = tokenizer(text_target=[t for _, t in pairs])["input_ids"] if pairs else []
    out = EncodedSet(rows=[], dropped=dropped)

    def cut(ids: list[int], limit: int) -> list[int]:
        return ids if len(ids) <= limit else [*ids[: limit - 1], ids[-1]]

    for pair, source, target in zip(pairs, sources, targets, strict=True):
        if len(source) > max_source_length or len(target) > max_target_length:
            out.truncated += 1
        input_ids = cut(source, max_source_length)
        out.rows.append(
            {
                "input_ids": input_ids,
                "attention_mask": [1] * len(input_ids),
                "labels": cut(target, max_target_length),
            }
        )
        out.lengths.append(len(source))
        out.target_lengths.append(len(target))
        out.texts.append(pair)
    return out


@dataclass
class PreparedData:
    """Both splits, tokenized, with the facts the dry run and the logs report."""

    train: EncodedSet
    eval: EncodedSet | None
    style: Any
    columns: dict[str, str]
    total_rows: int
    column_names: list[str]


@dataclass
class SplitRows:
    """The raw rows of both splits (before tokenizing), and how the prompt style reads them."""

    train: Any
    """`datasets.Dataset` of the training rows."""
    eval: Any | None
    """`datasets.Dataset` of the held-out rows, or None when `eval_fraction` is 0."""
    style: Any
    columns: dict[str, str]
    total_rows: int
    column_names: list[str]


def load_split(config: FinetuneConfig) -> SplitRows:
    """Load the config's data set, map its columns and cut the seeded train/eval split.

    Training and evaluation both call this, so `eval` and `predict` see exactly the rows the run held
    out (same data set, `eval_fraction`, `seed` and sample limits give the same split).

    Raises:
        DataError: unreadable data or missing columns.
    """
    from babl_core.engine.prompts import get_style

    data = config.data
    style = get_style(config.style_name)
    raw = load_rows(data)
    if len(raw) == 0:
        raise DataError(
            f"dataset {data.dataset}: it has no rows (only a header, or nothing); add examples to it"
        )
    columns = resolve_columns(style, list(raw.column_names), data.columns, source=data.dataset)
    held_out = None
    if data.eval_dataset:
        held_out = load_rows(data, name=data.eval_dataset)
        eval_columns = resolve_columns(
            style, list(held_out.column_names), data.columns, source=data.eval_dataset
        )
        if eval_columns != columns:
            raise DataError(
                f"eval_dataset {data.eval_dataset}: its columns map to the prompt style's fields differently "
                f"({eval_columns}) than the dataset's ({columns}); give both files the same columns"
            )
    train_rows, eval_rows = split_rows(
        raw, eval_fraction=data.eval_fraction, seed=config.train.seed,
        max_train=data.max_train_samples, max_eval=data.max_eval_samples, eval_dataset=held_out,
    )  # fmt: skip
    total = len(raw) + (len(held_out) if held_out is not None else 0)
    return SplitRows(train_rows, eval_rows, style, columns, total, list(raw.column_names))


def encode_rows(
    tokenizer, rows: list[dict], config: FinetuneConfig, *, style, columns, kind: str
) -> EncodedSet:
    """Tokenize raw rows for a causal or seq2seq model with the config's lengths and options."""
    data = config.data
    if kind == "seq2seq":
        return encode_seq2seq(
            tokenizer, rows, style=style, columns=columns, max_source_length=data.max_length,
            max_target_length=data.max_target_length, with_context=data.with_context,
        )  # fmt: skip
    return encode_causal(
        tokenizer, rows, style=style, columns=columns, max_length=data.max_length,
        loss_on_prompt=data.loss_on_prompt, with_context=data.with_context,
    )  # fmt: skip


def prepare_data(tokenizer, config: FinetuneConfig, *, kind: str) -> PreparedData:
    """Load, map, split and tokenize the config's data set for a causal or seq2seq model.

    Raises:
        DataError: unreadable data, missing columns, or no usable training example left.
    """
    split = load_split(config)
    source = config.data.dataset

    def encode(rows) -> EncodedSet:
        return encode_rows(
            tokenizer, rows.to_list(), config, style=split.style, columns=split.columns, kind=kind
        )

    train = encode(split.train)
    if not train.rows:
        raise DataError(
            f"dataset {source}: no usable training example among {words.count(len(split.train), 'row')} "
            f"(left out: {_describe_dropped(train.dropped) or 'none'}); check `columns` and raise max_length"
        )
    evaluation = encode(split.eval) if split.eval is not None else None
    if evaluation is not None and not evaluation.rows:
        evaluation = None
    return PreparedData(train, evaluation, split.style, split.columns, split.total_rows, split.column_names)


def _describe_dropped(dropped: dict[str, int]) -> str:
    return ", ".join(f"{count} ({reason})" for reason, count in dropped.items())


# --------------------------------------------------------------------------------------------------
# The dry run: what the trainer will see


MASK_OPEN, MASK_CLOSE = "[[", "]]"
DIM, RESET = "\x1b[2m", "\x1b[0m"
EXAMPLES_SHOWN = 3
EXAMPLE_CHARS = 1500


def render_example(tokenizer, example: dict, *, kind: str, color: bool = False) -> str:
    """The example's tokens as text, with the tokens that carry no loss dimmed (color) or in [[ ]].

    Causal: one sequence, the masked prompt then the trained answer. Seq2seq: the encoder input (never
    in the loss) and the labels on separate lines.
    """

    def masked(text: str) -> str:
        return f"{DIM}{text}{RESET}" if color else f"{MASK_OPEN}{text}{MASK_CLOSE}"

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    input_ids, labels = example["input_ids"], example["labels"]
    if kind == "seq2seq":
        return f"input (encoder, no loss): {masked(decode(input_ids))}\ntarget (loss):            {decode(labels)}"
    parts: list[str] = []
    start = 0
    for index in range(1, len(input_ids) + 1):
        if index == len(input_ids) or (labels[index] == IGNORE_INDEX) != (labels[start] == IGNORE_INDEX):
            text = decode(input_ids[start:index])
            parts.append(masked(text) if labels[start] == IGNORE_INDEX else text)
            start = index
    return "".join(parts)


def _clip(text: str, limit: int = EXAMPLE_CHARS) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text) - limit} more characters)"


def length_report(lengths: list[int], *, limit: int, what: str, bins: int = 8) -> str:
    """Summary statistics and a text histogram of token lengths, with how many exceed `limit`."""
    if not lengths:
        return f"{what}: no examples"
    ordered = sorted(lengths)

    def pct(p: float) -> int:
        return ordered[min(len(ordered) - 1, math.ceil(p * len(ordered)) - 1)]

    over = sum(length > limit for length in lengths)
    lines = [
        f"{what} ({words.count(len(lengths), 'example')}, limit {limit}):",
        f"  min {ordered[0]}  median {int(statistics.median(ordered))}  p90 {pct(0.9)}  p95 {pct(0.95)}  "
        f"max {ordered[-1]}  mean {statistics.fmean(ordered):.0f}",
        f"  over the limit (cut): {over} ({100 * over / len(lengths):.0f}%)",
    ]
    low, high = ordered[0], ordered[-1]
    width = max(1, math.ceil((high - low + 1) / bins))
    counts = [0] * bins
    for length in ordered:
        counts[min(bins - 1, (length - low) // width)] += 1
    top = max(counts)
    for i, count in enumerate(counts):
        start = low + i * width
        if start > high:
            break
        bar = "#" * (round(30 * count / top) if count else 0)
        lines.append(f"  {start:>6}-{start + width - 1:<6} {bar} {count}")
    return "\n".join(lines)


def describe_preview(
    tokenizer, prepared: PreparedData, config: FinetuneConfig, *, kind: str, color: bool
) -> str:
    """The dry run's report: data, a few formatted examples with their loss mask, token lengths."""
    data = config.data
    train, evaluation = prepared.train, prepared.eval
    eval_count = len(evaluation.rows) if evaluation else 0
    lines = [
        f"dry run of {config.source or 'the config'}: nothing is trained",
        f"  base {config.model.base} ({kind}), prompt style {prepared.style.name}, data {data.dataset}",
        f"  columns: {', '.join(f'{k} <- {v}' for k, v in prepared.columns.items())}",
        f"  rows: {prepared.total_rows} -> {len(train.rows)} train, {eval_count} eval "
        + (
            f"(held out by {data.eval_dataset}, seed {config.train.seed})"
            if data.eval_dataset
            else f"(eval_fraction {data.eval_fraction}, seed {config.train.seed})"
        ),
    ]
    if train.dropped:
        lines.append(f"  left out of training: {_describe_dropped(train.dropped)}")
    if kind == "causal":
        trained = sum(sum(label != IGNORE_INDEX for label in row["labels"]) for row in train.rows)
        total = sum(len(row["input_ids"]) for row in train.rows)
        what = "every token" if data.loss_on_prompt else "the answer tokens only (loss_on_prompt: false)"
        lines.append(f"  loss on {what}: {trained} of {total} tokens ({100 * trained / max(total, 1):.0f}%)")
    legend = "dimmed" if color else f"inside {MASK_OPEN} {MASK_CLOSE}"
    lines.append(f"  tokens {legend} carry no loss (the model reads them but is not trained to write them)")
    for index, row in enumerate(train.rows[:EXAMPLES_SHOWN]):
        trained = sum(label != IGNORE_INDEX for label in row["labels"])
        lines += [
            "",
            f"--- example {index + 1} of {len(train.rows)}: {len(row['input_ids'])} input tokens, "
            f"{trained} with loss ---",
            _clip(render_example(tokenizer, row, kind=kind, color=color)),
        ]
    lines.append("")
    if kind == "seq2seq":
        lines.append(
            length_report(train.lengths, limit=data.max_length, what="input token lengths (max_length)")
        )
        lines.append(
            length_report(
                train.target_lengths,
                limit=data.max_target_length,
                what="target token lengths (max_target_length)",
            )
        )
    else:
        lines.append(
            length_report(
                train.lengths, limit=data.max_length, what="token lengths, prompt + answer + EOS (max_length)"
            )
        )
    return "\n".join(lines)
