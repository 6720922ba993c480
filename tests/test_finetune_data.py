"""finetune.data: rows mapped onto prompt-style fields, tokenized with the loss mask, split by seed."""

from __future__ import annotations

import json

import pytest

from babl_core.engine.prompts import STYLES
from finetune.config import DataArgs
from finetune.data import (
    IGNORE_INDEX,
    DataError,
    encode_causal,
    encode_seq2seq,
    example_fields,
    length_report,
    load_rows,
    render_example,
    resolve_columns,
    split_rows,
    value_at,
)


@pytest.fixture(scope="module")
def llama_tok(session_models_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(session_models_dir / "demo" / "demo-html")
    tok.padding_side = "right"
    return tok


@pytest.fixture(scope="module")
def t5_tok(session_models_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(session_models_dir / "demo" / "demo-t5")


def test_causal_labels_mask_the_prompt_and_end_with_eos(llama_tok):
    style = STYLES["alpaca-code"]
    rows = [{"instruction": "Add two numbers.", "input": "", "output": "def add(a, b):\n    return a + b"}]
    columns = {"instruction": "instruction", "input": "input", "output": "output"}
    encoded = encode_causal(llama_tok, rows, style=style, columns=columns, max_length=512)
    (example,) = encoded.rows
    prompt, target = style.training_pair(rows[0])
    # The prompt is tokenized alone, as the app tokenizes it before generating (alpaca has no BOS in
    # its text, so the tokenizer adds one).
    prompt_ids = llama_tok(prompt, add_special_tokens=True)["input_ids"]
    target_ids = llama_tok(target, add_special_tokens=False)["input_ids"] + [llama_tok.eos_token_id]
    assert example["input_ids"] == prompt_ids + target_ids
    assert example["labels"] == [IGNORE_INDEX] * len(prompt_ids) + target_ids
    assert example["attention_mask"] == [1] * len(example["input_ids"])
    assert encoded.lengths == [len(prompt_ids) + len(target_ids)]


def test_chat_template_prompts_get_one_bos_only(llama_tok):
    """codellama-inst renders BOS through the chat template, so the tokenizer must not add another."""
    style = STYLES["codellama-inst"]
    rows = [{"label": "A red button", "html": "<button style='color:red'>Go</button>"}]
    encoded = encode_causal(
        llama_tok, rows, style=style, columns={"instruction": "label", "response": "html"}, max_length=512
    )
    ids = encoded.rows[0]["input_ids"]
    assert ids[0] == llama_tok.bos_token_id
    assert ids.count(llama_tok.bos_token_id) == 1
    assert ids[-1] == llama_tok.eos_token_id


def test_loss_on_prompt_trains_every_token(llama_tok):
    rows = [{"instruction": "Say hi.", "output": "print('hi')"}]
    columns = {"instruction": "instruction", "output": "output"}
    encoded = encode_causal(
        llama_tok, rows, style=STYLES["alpaca-code"], columns=columns, max_length=512, loss_on_prompt=True
    )
    assert encoded.rows[0]["labels"] == encoded.rows[0]["input_ids"]


def test_truncation_cuts_the_answer_and_drops_prompts_that_fill_max_length(llama_tok):
    style = STYLES["alpaca-code"]
    columns = {"instruction": "instruction", "output": "output"}
    short = {"instruction": "Loop.", "output": "for i in range(10):\n    print(i)\n" * 20}
    prompt_len = len(llama_tok(style.training_pair(short)[0])["input_ids"])
    encoded = encode_causal(llama_tok, [short], style=style, columns=columns, max_length=prompt_len + 5)
    assert encoded.truncated == 1
    assert len(encoded.rows[0]["input_ids"]) == prompt_len + 5
    assert sum(label != IGNORE_INDEX for label in encoded.rows[0]["labels"]) == 5
    dropped = encode_causal(llama_tok, [short], style=style, columns=columns, max_length=prompt_len)
    assert dropped.rows == [] and dropped.dropped == {"prompt fills max_length": 1}


def test_rows_with_empty_required_fields_are_counted_not_trained(llama_tok):
    rows = [{"instruction": "", "output": "x = 1"}, {"instruction": "Set x.", "output": "x = 1"}]
    encoded = encode_causal(
        llama_tok, rows, style=STYLES["alpaca-code"], columns={"instruction": "instruction", "output": "output"},
        max_length=256,
    )  # fmt: skip
    assert len(encoded.rows) == 1
    assert encoded.dropped == {"empty instruction": 1}


def test_seq2seq_inputs_and_labels_end_with_t5_eos(t5_tok):
    style = STYLES["t5-qa"]
    row = {"question": "Who?", "context": "Ada wrote it.", "answers": {"text": ["Ada"], "answer_start": [0]}}
    columns = {"question": "question", "context": "context", "answer": "answers.text.0"}
    encoded = encode_seq2seq(
        t5_tok, [row], style=style, columns=columns, max_source_length=64, max_target_length=8
    )
    example = encoded.rows[0]
    assert t5_tok.decode(example["input_ids"]) == "question: Who? context: Ada wrote it.</s>"
    assert t5_tok.decode(example["labels"]) == "Ada</s>"
    # Cut inputs keep their final </s>, as tokenizer truncation does.
    cut = encode_seq2seq(
        t5_tok, [row], style=style, columns=columns, max_source_length=10, max_target_length=2
    )
    assert cut.truncated == 1
    assert len(cut.rows[0]["input_ids"]) == 10 and cut.rows[0]["input_ids"][-1] == t5_tok.eos_token_id
    assert cut.rows[0]["labels"] == [t5_tok("A")["input_ids"][0], t5_tok.eos_token_id]


def test_without_context_the_question_stands_alone(t5_tok):
    row = {"question": "Who?", "context": "Ada wrote it.", "answers": {"text": ["Ada"]}}
    columns = {"question": "question", "context": "context", "answer": "answers.text.0"}
    assert example_fields(row, columns, with_context=False) == {
        "question": "Who?",
        "context": None,
        "answer": "Ada",
    }
    encoded = encode_seq2seq(
        t5_tok, [row], style=STYLES["t5-qa"], columns=columns, max_source_length=64, max_target_length=8,
        with_context=False,
    )  # fmt: skip
    assert t5_tok.decode(encoded.rows[0]["input_ids"]) == "question: Who?</s>"


def test_value_at_reads_nested_columns():
    row = {"answers": {"text": ["two thousand", "2000"]}, "test_list": ["assert f(1)", "assert f(2)"]}
    assert value_at(row, "answers.text.0") == "two thousand"
    assert value_at(row, "answers.text.5") is None
    assert value_at(row, "answers.missing") is None
    # Lists of text become lines (e.g. MBPP's test_list).
    assert example_fields(row, {"tests": "test_list"}) == {"tests": "assert f(1)\nassert f(2)"}


def test_missing_columns_name_expected_and_found():
    style = STYLES["codellama-inst"]
    with pytest.raises(DataError) as info:
        resolve_columns(style, ["label", "html"], {}, source="html.jsonl")
    message = str(info.value)
    assert "expects the fields instruction, response" in message
    assert "found the columns label, html" in message
    assert "columns: {instruction: <column>, response: <column>}" in message
    with pytest.raises(DataError, match="mapped to column 'title', which does not exist"):
        resolve_columns(style, ["label", "html"], {"instruction": "title", "response": "html"}, source="x")
    assert resolve_columns(
        style, ["label", "html"], {"instruction": "label", "response": "html"}, source="x"
    ) == {
        "instruction": "label",
        "response": "html",
    }


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "parquet"])
def test_local_files_load_by_suffix(tmp_path, suffix):
    import pandas as pd

    rows = [{"instruction": f"task {i}", "output": f"x = {i}"} for i in range(5)]
    path = tmp_path / f"rows.{suffix}"
    frame = pd.DataFrame(rows)
    if suffix == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    elif suffix == "csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    dataset = load_rows(DataArgs(dataset=str(path)))
    assert dataset.column_names == ["instruction", "output"]
    assert dataset.to_list() == rows


def test_unreadable_local_file_is_a_data_error(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"instruction": "a"\n')
    with pytest.raises(DataError, match="could not read"):
        load_rows(DataArgs(dataset=str(path)))


def test_split_is_seeded_and_disjoint():
    from datasets import Dataset

    dataset = Dataset.from_list([{"n": i} for i in range(50)])
    train_a, eval_a = split_rows(dataset, eval_fraction=0.2, seed=7)
    train_b, eval_b = split_rows(dataset, eval_fraction=0.2, seed=7)
    _, eval_c = split_rows(dataset, eval_fraction=0.2, seed=8)
    assert eval_a["n"] == eval_b["n"] and train_a["n"] == train_b["n"]
    assert eval_a["n"] != eval_c["n"]
    assert len(eval_a) == 10 and not set(eval_a["n"]) & set(train_a["n"])
    limited, none = split_rows(dataset, eval_fraction=0.0, seed=7, max_train=12)
    assert none is None and len(limited) == 12


def test_render_example_brackets_masked_tokens(llama_tok):
    example = encode_causal(
        llama_tok, [{"instruction": "Hi.", "output": "print(1)"}], style=STYLES["alpaca-code"],
        columns={"instruction": "instruction", "output": "output"}, max_length=256,
    ).rows[0]  # fmt: skip
    text = render_example(llama_tok, example, kind="causal")
    assert text.startswith("[[<s>### Instruction:")
    assert text.endswith("### Response:\n    ]]print(1)</s>")
    colored = render_example(llama_tok, example, kind="causal", color=True)
    assert colored.startswith("\x1b[2m<s>### Instruction:") and "[[" not in colored


def test_length_report_counts_what_is_cut():
    report = length_report([10, 20, 30, 40, 200], limit=100, what="lengths")
    assert "min 10  median 30" in report and "max 200" in report
    assert "over the limit (cut): 1 (20%)" in report
    bars = [line for line in report.splitlines() if "#" in line]
    assert sum(int(line.split()[-1]) for line in bars) == 5
