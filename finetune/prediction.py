"""`predict`: a trained model's answers to seeded random rows of its data set, or to your own queries
(seed 000's two prediction functions), each shown with its input and reference answer.

Both go through the app's path. Rows are rendered by the prompt style as training rendered them (the
same `finetune.evaluation.examples_from_rows` that `eval` scores), queries as a chat message
(`babl_core.engine.service.render_prompt`, so a query reads exactly as it would in the app), and answers come from
`babl_core.engine.generation` with the entry's settings.
"""

from __future__ import annotations

import random
import textwrap
from dataclasses import asdict, dataclass

from finetune.evaluation import EvalError, EvalTarget, Example, examples_from_rows, generation_params

SPLITS = ("eval", "train")
SHOWN_CHARS = 600  # per field in the printed view; --json has everything
WRAP_WIDTH = 100


@dataclass
class Prediction:
    """One answer, with what the model was asked and what was expected."""

    input: dict[str, str | None]
    """The prompt style's fields (a query: {"query": text})."""
    reference: str | list[str] | None
    """The data set's answer (qa: every accepted answer); None for a query."""
    prediction: str
    prompt: str
    """The exact text the model was given."""
    id: str | None = None
    """The row's id (None for a query)."""
    notes: list[str] | None = None
    """What the app would say about the prompt (e.g. an unsent system prompt)."""

    def to_dict(self) -> dict:
        return asdict(self)


def sample_examples(target: EvalTarget, tokenizer, *, num: int, split: str = "eval") -> list[Example]:
    """`num` rows drawn at random (seeded by `eval_seed`) from the run's held-out or training rows.

    Raises:
        EvalError: `split` is unknown, or holds no usable row.
    """
    from finetune.data import load_split

    if split not in SPLITS:
        raise EvalError(f"--split {split}: use one of {', '.join(SPLITS)}")
    if num < 1:
        raise EvalError(f"--num {num}: ask for at least 1 example")
    data = load_split(target.config)
    rows = data.eval if split == "eval" else data.train
    if rows is None or len(rows) == 0:
        raise EvalError(
            f"{target.name} held out no rows (eval_fraction {target.config.data.eval_fraction}); "
            "use --split train, or ask your own questions with --query"
        )
    order = list(range(len(rows)))
    random.Random(target.config.eval.eval_seed).shuffle(order)
    examples: list[Example] = []
    for index in order:  # row by row: rows with an empty field are skipped, as training skips them
        found, _ = examples_from_rows(
            [rows[index]], target.config, tokenizer, style=data.style, columns=data.columns
        )
        examples += found
        if len(examples) == num:
            break
    if not examples:
        raise EvalError(f"no usable row in the {split} split of {target.config.data.dataset}")
    return examples


def predict(
    target: EvalTarget, *, queries: list[str] | None = None, num: int = 3, split: str = "eval", loaded=None
) -> list[Prediction]:
    """Answers to your `queries`, or to `num` random rows of `split` when there are none.

    Args:
        target: from `finetune.evaluation.resolve_target`.
        queries: your own messages, rendered by the model's prompt style as in the chat.
        num: rows to draw when no queries are given.
        split: "eval" (the held-out rows) or "train".
        loaded: the model already loaded (else loaded here and released at the end).

    Raises:
        EvalError: nothing to draw from.
        BadMessage: a query that the app would refuse (empty, or too long for the context).
    """
    from babl_core.engine.loading import release
    from babl_core.engine.service import render_prompt
    from finetune.evaluation import generate_answers, load_target_model, model_answer_fn

    own_model = loaded is None
    loaded = loaded or load_target_model(target)
    try:
        params = generation_params(target)
        notes: list[list[str]] = []
        if queries:
            examples = []
            for number, query in enumerate(queries, 1):
                if not query.strip():
                    raise EvalError(f"--query number {number} is empty; write a question or an instruction")
                prompt = render_prompt(target.spec, loaded, [{"role": "user", "content": query}], params)
                examples.append(Example("", {"query": query}, prompt.text, prompt.add_special_tokens, None))
                notes.append(prompt.notes)
        else:
            examples = sample_examples(target, loaded.tokenizer, num=num, split=split)
            notes = [[] for _ in examples]
        answers = generate_answers(
            examples, model_answer_fn(loaded), params, seed=target.config.eval.eval_seed, desc="predicting"
        )
    finally:
        if own_model:
            release(loaded)
    return [
        Prediction(
            input=example.fields,
            reference=example.reference,
            prediction=example_answers[0],
            prompt=example.prompt,
            id=example.id or None,
            notes=example_notes or None,
        )
        for example, example_answers, example_notes in zip(examples, answers, notes, strict=True)
    ]


def _block(text: str, *, wrap: bool = False) -> str:
    text = text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + f" … ({len(text):,} characters)"
    if wrap:  # prose inputs (a context passage) read better wrapped; answers and code keep their lines
        lines = text.splitlines() or [""]
        text = "\n".join(
            "\n".join(textwrap.wrap(line, WRAP_WIDTH, break_long_words=False, replace_whitespace=False))
            or line
            for line in lines
        )
    return textwrap.indent(text.rstrip() or "(empty)", "  ")


def format_predictions(predictions: list[Prediction], *, title: str = "") -> str:
    """Each prediction as input / reference / prediction blocks, separated by rules."""
    parts = [title] if title else []
    for number, item in enumerate(predictions, 1):
        head = f"── {number}/{len(predictions)}" + (f" · row {item.id}" if item.id else " · your query")
        parts.append(head + " " + "─" * max(4, 60 - len(head)))
        parts.append("input")
        if set(item.input) == {"query"}:
            parts.append(_block(item.input["query"] or "", wrap=True))
        else:
            for name, value in item.input.items():
                if value is not None:
                    parts.append(_block(f"{name}: {value}", wrap=True))
        if item.reference is not None:
            parts.append("reference")
            reference = item.reference
            parts.append(_block(" | ".join(reference) if isinstance(reference, list) else reference))
        parts.append("prediction")
        parts.append(_block(item.prediction))
        for note in item.notes or []:
            parts.append(f"  note: {note}")
    return "\n".join(parts)
