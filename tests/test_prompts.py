"""Prompt formats: exact strings per style, the training == serving contract, and context trimming."""

from __future__ import annotations

import pytest

from babl_core.engine.prompts import (
    NOTE_NO_SYSTEM,
    STYLES,
    Prompt,
    PromptStyle,
    PromptTooLong,
    build_prompt,
    get_style,
    parse_email_request,
    parse_qa_request,
)

# Seed 002's block, written out by hand: the task and input each follow four spaces of indentation.
ALPACA_HEAD = (
    "### Instruction:\n"
    "    Use the Task below and the Input given to write the Response, which is a programming code "
    "that can solve the following Task:\n"
    "\n"
    "    ### Task:\n"
)


def alpaca_block(task: str, input_text: str = "") -> str:
    return ALPACA_HEAD + f"    {task}\n\n    ### Input:\n    {input_text}\n\n    ### Response:\n    "


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


@pytest.fixture(scope="module")
def causal_tok():
    """The demo models' byte-level BPE with its [INST] chat template (which writes <s> itself)."""
    from babl_core.demo import build_causal_tokenizer

    return build_causal_tokenizer()


@pytest.fixture
def plain_causal_tok(causal_tok, monkeypatch):
    """The same tokenizer with no chat template: its post-processor adds <s> instead."""
    monkeypatch.setattr(causal_tok, "chat_template", None)
    return causal_tok


@pytest.fixture(scope="module")
def t5_tok():
    from babl_core.demo import build_t5_tokenizer

    return build_t5_tokenizer()


# --- alpaca-code ------------------------------------------------------------------------------------


def test_alpaca_single_turn_is_the_seed_template():
    text = STYLES["alpaca-code"].render([user("Write a function that adds two numbers.")])
    assert text == (
        "### Instruction:\n"
        "    Use the Task below and the Input given to write the Response, which is a programming code "
        "that can solve the following Task:\n"
        "\n"
        "    ### Task:\n"
        "    Write a function that adds two numbers.\n"
        "\n"
        "    ### Input:\n"
        "    \n"
        "\n"
        "    ### Response:\n"
        "    "
    )


def test_alpaca_multi_turn_keeps_earlier_blocks_with_their_responses():
    text = STYLES["alpaca-code"].render(
        [user("Add two numbers."), assistant("def add(a, b):\n    return a + b"), user("Now subtract.")]
    )
    expected = (
        alpaca_block("Add two numbers.")
        + "def add(a, b):\n    return a + b"
        + "\n\n"
        + alpaca_block("Now subtract.")
    )
    assert text == expected


def test_alpaca_training_pair_carries_the_input_and_output():
    prompt, target = STYLES["alpaca-code"].training_pair(
        {"instruction": "Sum a list.", "input": "[1, 2, 3]", "output": "print(sum([1, 2, 3]))"}
    )
    assert prompt == alpaca_block("Sum a list.", "[1, 2, 3]")
    assert target == "print(sum([1, 2, 3]))"
    assert STYLES["alpaca-code"].stop_strings() == ["### Instruction:"]


def test_alpaca_drops_the_system_prompt_with_a_note(plain_causal_tok):
    prompt = build_prompt(
        "alpaca-code",
        [system("Be terse."), user("Reverse a string.")],
        plain_causal_tok,
        context_length=2048,
        max_new_tokens=64,
    )
    assert prompt.text == alpaca_block("Reverse a string.")
    assert "Be terse" not in prompt.text
    assert prompt.notes == [NOTE_NO_SYSTEM]


# --- codellama-inst -----------------------------------------------------------------------------------


def test_codellama_written_out_without_system():
    text = STYLES["codellama-inst"].render(
        [user("Make a header."), assistant("<h1>Hi</h1>"), user("Bigger.")]
    )
    assert text == "<s>[INST] Make a header. [/INST] <h1>Hi</h1> </s><s>[INST] Bigger. [/INST]"


def test_codellama_written_out_with_system():
    text = STYLES["codellama-inst"].render(
        [system("You write HTML."), user("A button."), assistant("<button>Go</button>"), user("Red.")]
    )
    assert text == (
        "<s>[INST] <<SYS>>\nYou write HTML.\n<</SYS>>\n\nA button. [/INST] <button>Go</button> </s>"
        "<s>[INST] Red. [/INST]"
    )


def test_codellama_uses_the_tokenizer_chat_template(causal_tok, monkeypatch):
    messages = [system("You write HTML."), user("A button."), assistant("<b>Go</b>"), user("Red.")]
    # The demo template writes CodeLlama-Instruct's Llama-2 layout, the same as the written-out fallback.
    expected = "<s>[INST] <<SYS>>\nYou write HTML.\n<</SYS>>\n\nA button. [/INST] <b>Go</b> </s><s>[INST] Red. [/INST]"
    assert STYLES["codellama-inst"].render(messages, causal_tok) == expected
    # A different template must be followed, not replaced by the fallback.
    marked = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    monkeypatch.setattr(causal_tok, "chat_template", marked)
    assert STYLES["codellama-inst"].render(messages, causal_tok) == (
        "<system>You write HTML.<user>A button.<assistant><b>Go</b><user>Red.<assistant>"
    )


def test_chat_template_with_bos_in_text_is_encoded_without_special_tokens(causal_tok):
    prompt = build_prompt(
        "codellama-inst", [user("A page.")], causal_tok, context_length=2048, max_new_tokens=10
    )
    assert prompt.text.startswith("<s>[INST]")
    assert prompt.add_special_tokens is False
    ids = causal_tok(prompt.text, add_special_tokens=False)["input_ids"]
    assert prompt.token_count == len(ids)
    # Exactly one BOS: the template's. Adding special tokens would have put a second one in front.
    assert ids[0] == causal_tok.bos_token_id and ids[1] != causal_tok.bos_token_id


def test_codellama_without_template_uses_tokenizer_bos_and_no_extra(plain_causal_tok):
    prompt = build_prompt(
        "codellama-inst", [user("A page.")], plain_causal_tok, context_length=2048, max_new_tokens=10
    )
    assert prompt.text == "<s>[INST] A page. [/INST]"
    assert prompt.add_special_tokens is False
    assert STYLES["codellama-inst"].uses_bos_in_text(None) is True


def test_plain_text_without_bos_is_encoded_with_special_tokens(plain_causal_tok):
    prompt = build_prompt(
        "plain-chat", [user("Hi")], plain_causal_tok, context_length=2048, max_new_tokens=10
    )
    assert prompt.text == "User: Hi\nAssistant:"
    assert prompt.add_special_tokens is True
    ids = plain_causal_tok(prompt.text)["input_ids"]
    assert ids[0] == plain_causal_tok.bos_token_id
    assert prompt.token_count == len(ids)


def test_codellama_training_target_follows_the_inst_format(causal_tok):
    style = STYLES["codellama-inst"]
    assert style.training_pair({"instruction": "A table.", "response": "<table></table>"}) == (
        "<s>[INST] A table. [/INST]",
        " <table></table> ",
    )
    # Through the chat template the target is cut from the template's own assistant turn, minus EOS.
    assert style.training_pair({"instruction": "A table.", "response": "<table></table>"}, causal_tok) == (
        "<s>[INST] A table. [/INST]",
        " <table></table> ",
    )


# --- t5-email -----------------------------------------------------------------------------------------


def test_t5_email_unlabelled_text_is_the_key_points():
    text = STYLES["t5-email"].render([user("system update on friday, back up your work")])
    assert text == "write email: system update on friday, back up your work"


def test_t5_email_labelled_lines_any_case_with_multiline_key_points():
    message = "FROM: Alice\nto:  Bob \nKey Points: update on friday\nback up your work"
    assert STYLES["t5-email"].render([user(message)]) == (
        "write email: update on friday\nback up your work\nfrom: Alice\nto: Bob"
    )
    assert parse_email_request(message) == {
        "key_points": "update on friday\nback up your work",
        "sender": "Alice",
        "recipient": "Bob",
    }


def test_t5_email_only_sender_and_unlabelled_points():
    assert STYLES["t5-email"].render([user("from: Carol\nlunch moved to noon")]) == (
        "write email: lunch moved to noon\nfrom: Carol"
    )


def test_t5_email_without_key_points_says_what_to_write():
    with pytest.raises(ValueError, match="key points"):
        STYLES["t5-email"].render([user("From: Alice\nTo: Bob")])


# --- t5-qa ----------------------------------------------------------------------------------------------


def test_t5_qa_unlabelled_text_is_the_question():
    assert STYLES["t5-qa"].render([user("Who wrote the report?")]) == "question: Who wrote the report?"


def test_t5_qa_labelled_sections_with_multiline_context():
    message = "question: Who wrote it?\nCONTEXT: The report was written\nby the finance group."
    assert STYLES["t5-qa"].render([user(message)]) == (
        "question: Who wrote it? context: The report was written\nby the finance group."
    )
    assert parse_qa_request("Context: Paris is in France.\nQuestion: Where is Paris?") == {
        "question": "Where is Paris?",
        "context": "Paris is in France.",
    }


def test_t5_qa_one_line_seed_form():
    message = "Question: Where is Paris?   CONTEXT:Paris is the capital of France."
    assert parse_qa_request(message) == {
        "question": "Where is Paris?",
        "context": "Paris is the capital of France.",
    }
    assert STYLES["t5-qa"].render([user(message)]) == (
        "question: Where is Paris? context: Paris is the capital of France."
    )


def test_t5_qa_without_a_question_label_keeps_context_words_in_the_question():
    # Without a Question: label nothing is split: the whole text is the question.
    assert STYLES["t5-qa"].render([user("What is the context: of this?")]) == (
        "question: What is the context: of this?"
    )


def test_t5_qa_training_pairs_with_and_without_context():
    style = STYLES["t5-qa"]
    assert style.training_pair({"question": "Q?", "context": None, "answer": "A"}) == ("question: Q?", "A")
    assert style.training_pair({"question": "Q?", "answer": "A"}) == ("question: Q?", "A")
    assert style.training_pair({"question": "Q?", "context": "C.", "answer": "A"}) == (
        "question: Q? context: C.",
        "A",
    )


# --- t5-code and plain-chat -------------------------------------------------------------------------------


def test_t5_code_prefix():
    assert STYLES["t5-code"].render([user("Write a function to reverse a list.")]) == (
        "generate python: Write a function to reverse a list."
    )
    assert STYLES["t5-code"].training_pair({"text": "Reverse a list.", "code": "x[::-1]"}) == (
        "generate python: Reverse a list.",
        "x[::-1]",
    )


def test_plain_chat_written_out():
    style = STYLES["plain-chat"]
    assert style.render([user("Hi")]) == "User: Hi\nAssistant:"
    assert style.render([system("Be kind."), user("Hi"), assistant("Hello!"), user("How are you?")]) == (
        "System: Be kind.\n\nUser: Hi\nAssistant: Hello!\nUser: How are you?\nAssistant:"
    )
    assert style.training_pair({"prompt": "Hi", "response": "Hello!"}) == ("User: Hi\nAssistant:", " Hello!")


def test_plain_chat_uses_the_chat_template_when_present(causal_tok):
    prompt = build_prompt(
        "plain-chat", [system("Be kind."), user("Hi")], causal_tok, context_length=2048, max_new_tokens=10
    )
    assert prompt.text == "<s>[INST] <<SYS>>\nBe kind.\n<</SYS>>\n\nHi [/INST]"
    assert prompt.add_special_tokens is False
    assert prompt.notes == []


# --- chat-qa: seed 004's question answering on a causal chat model ---------------------------------------


def test_chat_qa_written_out_with_and_without_context():
    style = get_style("chat-qa")
    prompt, target = style.training_pair(
        {"question": "Who built it?", "context": "Ann built it.", "answer": "Ann "}
    )
    assert prompt == (
        "User: Context: Ann built it.\n\nQuestion: Who built it?\n\n"
        "Answer the question with a few words taken from the context.\nAssistant:"
    )
    assert target == " Ann"
    alone, _ = style.training_pair({"question": "Who built it?", "context": "", "answer": "Ann"})
    assert alone == "User: Question: Who built it?\n\nAnswer the question in a few words.\nAssistant:"
    assert style.stop_strings() == ["\nUser:"]


def test_chat_qa_uses_the_chat_template_and_the_chat_labels(causal_tok):
    style = get_style("chat-qa")
    fields = {"question": "Who built it?", "context": "Ann built it.", "answer": "Ann"}
    prompt, target = style.training_pair(fields, causal_tok)
    assert prompt == (
        "<s>[INST] Context: Ann built it.\n\nQuestion: Who built it?\n\n"
        "Answer the question with a few words taken from the context. [/INST]"
    )
    assert target.strip() == "Ann"
    # What a user types in the chat, labels in either order, renders exactly as the training prompt.
    typed = [user("Question: Who built it?\nContext: Ann built it.")]
    assert style.render(typed, causal_tok) == prompt
    assert style.render([user("Context: Ann built it.\nQuestion: Who built it?")], causal_tok) == prompt
    with_system = build_prompt(
        style, [system("Be brief."), *typed], causal_tok, context_length=512, max_new_tokens=16
    )
    assert with_system.text.startswith("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nContext: Ann built it.")
    with pytest.raises(ValueError, match="chat-qa needs a question"):
        style.render([user("Context: only a passage")])


# --- the contract: training prompt == serving prompt --------------------------------------------------------

CONTENT = "Write a greeting card for Sam"
TRAINING_FIELDS = {
    "alpaca-code": {"instruction": CONTENT, "input": "", "output": "print('hi')"},
    "codellama-inst": {"instruction": CONTENT, "response": "<p>hi</p>"},
    "t5-email": {"key_points": CONTENT, "body": "Dear Sam, ..."},
    "t5-qa": {"question": CONTENT, "context": None, "answer": "a card"},
    "t5-code": {"text": CONTENT, "code": "print('card')"},
    "plain-chat": {"prompt": CONTENT, "response": "Sure."},
    "chat-qa": {"question": CONTENT, "context": None, "answer": "a card"},
}


def test_every_style_has_training_fields_in_this_test():
    assert set(TRAINING_FIELDS) == set(STYLES)


@pytest.mark.parametrize("name", sorted(STYLES))
@pytest.mark.parametrize("with_tokenizer", [False, True])
def test_training_prompt_equals_serving_prompt(name, with_tokenizer, causal_tok):
    tokenizer = causal_tok if with_tokenizer else None
    style = STYLES[name]
    prompt, target = style.training_pair(TRAINING_FIELDS[name], tokenizer)
    assert prompt == style.render([user(CONTENT)], tokenizer)
    assert target.strip()


def test_labelled_chat_messages_match_their_training_fields():
    email = STYLES["t5-email"]
    assert (
        email.render([user("From: Ann\nTo: Ben\nKey points: budget due Monday")])
        == email.training_pair(
            {"key_points": "budget due Monday", "sender": "Ann", "recipient": "Ben", "body": "Hi Ben"}
        )[0]
    )
    qa = STYLES["t5-qa"]
    assert (
        qa.render([user("Question: Who?\nContext: Ann did it.")])
        == qa.training_pair({"question": "Who?", "context": "Ann did it.", "answer": "Ann"})[0]
    )


def test_training_pair_names_missing_fields():
    with pytest.raises(ValueError, match=r"alpaca-code.*missing output"):
        STYLES["alpaca-code"].training_pair({"instruction": "x"})
    with pytest.raises(ValueError, match="must be text"):
        STYLES["t5-code"].training_pair({"text": "x", "code": 3})


# --- build_prompt: trimming, errors, notes ---------------------------------------------------------------------


def conversation(turns: int) -> list[dict]:
    messages = [system("Answer briefly.")]
    for index in range(turns):
        messages += [user(f"question number {index} about html"), assistant(f"answer number {index} here")]
    return [*messages, user("the final question")]


def test_trimming_drops_the_fewest_oldest_turns_and_keeps_the_system_prompt(plain_causal_tok):
    tok = plain_causal_tok
    kept_one = (
        "System: Answer briefly.\n\n"
        "User: question number 3 about html\nAssistant: answer number 3 here\n"
        "User: the final question\nAssistant:"
    )
    needed = len(tok(kept_one)["input_ids"])
    prompt = build_prompt("plain-chat", conversation(4), tok, context_length=needed + 100, max_new_tokens=100)
    assert prompt.text == kept_one
    assert prompt.token_count == needed
    assert prompt.dropped_turns == 3
    assert prompt.notes == [f"dropped 3 oldest turns to fit the {needed + 100}-token context"]

    # One token less and the last earlier turn must go too; the system prompt stays.
    tighter = build_prompt("plain-chat", conversation(4), tok, context_length=needed + 99, max_new_tokens=100)
    assert tighter.dropped_turns == 4
    assert tighter.text == "System: Answer briefly.\n\nUser: the final question\nAssistant:"
    assert tighter.notes == [f"dropped 4 oldest turns to fit the {needed + 99}-token context"]


class CountingTokenizer:
    """Wraps a tokenizer and counts the characters it is asked to encode."""

    def __init__(self, tok):
        self.tok = tok
        self.chars = 0

    def __call__(self, text, **kwargs):
        self.chars += len(text)
        return self.tok(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_trimming_a_huge_history_tokenizes_about_what_fits_not_the_history(plain_causal_tok):
    # A long chat (or a 19 MB API history) once was rendered and tokenized whole for every guess, on the
    # event loop: trimming must cost about what fits in the context, whatever lies beyond it.
    history = []
    for i in range(400):
        history += [user(f"question {i} " + "words " * 500), {"role": "assistant", "content": "reply " * 500}]
    messages = [*history, user("the final question")]
    history_chars = sum(len(m["content"]) for m in messages)
    counting = CountingTokenizer(plain_causal_tok)
    prompt = build_prompt("plain-chat", messages, counting, context_length=4096, max_new_tokens=256)
    reference = build_prompt(
        "plain-chat", messages[-9:], plain_causal_tok, context_length=4096, max_new_tokens=256
    )
    assert prompt.dropped_turns == 400 - 4 + reference.dropped_turns  # the fewest, as before
    assert prompt.token_count <= 4096 - 256
    assert counting.chars < history_chars / 20, (counting.chars, history_chars)


def test_one_huge_old_turn_is_counted_only_in_part(plain_causal_tok):
    huge = [user("a huge paste " + "lorem ipsum " * 100_000), {"role": "assistant", "content": "noted"}]
    recent = [user("short question"), {"role": "assistant", "content": "short answer"}]
    messages = [*huge, *recent, user("the final question")]
    counting = CountingTokenizer(plain_causal_tok)
    prompt = build_prompt("plain-chat", messages, counting, context_length=2048, max_new_tokens=256)
    assert prompt.dropped_turns == 1 and "short answer" in prompt.text
    assert counting.chars < 100_000, counting.chars  # the 1.2M-character turn was never tokenized whole


def test_nothing_dropped_when_it_fits(plain_causal_tok):
    prompt = build_prompt(
        "plain-chat", conversation(3), plain_causal_tok, context_length=2048, max_new_tokens=256
    )
    assert prompt.dropped_turns == 0 and prompt.notes == []
    assert prompt.text.count("User:") == 4
    assert prompt.token_count == len(plain_causal_tok(prompt.text)["input_ids"])


def test_one_dropped_turn_is_singular(plain_causal_tok):
    tok = plain_causal_tok
    full = build_prompt("plain-chat", conversation(2), tok, context_length=4096, max_new_tokens=0)
    prompt = build_prompt(
        "plain-chat", conversation(2), tok, context_length=full.token_count - 1, max_new_tokens=0
    )
    assert prompt.dropped_turns == 1
    assert prompt.notes == [f"dropped 1 oldest turn to fit the {full.token_count - 1}-token context"]


def test_prompt_too_long_reports_the_numbers_and_the_fix(plain_causal_tok):
    tok = plain_causal_tok
    alone = "System: Answer briefly.\n\nUser: the final question\nAssistant:"
    needed = len(tok(alone)["input_ids"])
    with pytest.raises(PromptTooLong) as caught:
        build_prompt("plain-chat", conversation(2), tok, context_length=needed + 5, max_new_tokens=10)
    error = caught.value
    assert isinstance(error, ValueError)
    assert (error.needed_tokens, error.available_tokens) == (needed, needed - 5)
    message = str(error)
    assert f"needs {needed} tokens" in message and f"only {needed - 5} are available" in message
    assert "shorten the message or the system prompt or lower max new tokens to 5 or less" in message


def test_seq2seq_budget_ignores_max_new_tokens(t5_tok):
    text = "question: Where is Paris?"
    needed = len(t5_tok(text)["input_ids"])  # ByT5 appends </s>
    assert needed == len(text.encode()) + 1
    prompt = build_prompt(
        "t5-qa", [user("Where is Paris?")], t5_tok, context_length=needed, max_new_tokens=500, seq2seq=True
    )
    assert (prompt.text, prompt.token_count, prompt.add_special_tokens) == (text, needed, True)
    with pytest.raises(PromptTooLong) as caught:
        build_prompt(
            "t5-qa",
            [user("Where is Paris?")],
            t5_tok,
            context_length=needed - 1,
            max_new_tokens=0,
            seq2seq=True,
        )
    assert (caught.value.needed_tokens, caught.value.available_tokens) == (needed, needed - 1)
    assert "max new tokens" not in str(caught.value)
    assert "shorten the message" in str(caught.value)


def test_single_turn_styles_note_history_only_when_there_was_some(t5_tok):
    with_history = build_prompt(
        "t5-qa",
        [user("Who?"), assistant("Ann."), user("Where is Paris?")],
        t5_tok,
        context_length=1024,
        max_new_tokens=64,
        seq2seq=True,
    )
    assert with_history.text == "question: Where is Paris?"
    assert with_history.notes == ["this model answers one message at a time; earlier turns were not sent"]
    assert with_history.dropped_turns == 0
    alone = build_prompt(
        "t5-qa", [user("Where?")], t5_tok, context_length=1024, max_new_tokens=64, seq2seq=True
    )
    assert alone.notes == []
    both = build_prompt(
        "t5-code",
        [system("Be careful."), user("Sort."), assistant("sorted(x)"), user("Reverse.")],
        t5_tok,
        context_length=1024,
        max_new_tokens=64,
        seq2seq=True,
    )
    assert both.text == "generate python: Reverse."
    assert both.notes == [
        NOTE_NO_SYSTEM,
        "this model answers one message at a time; earlier turns were not sent",
    ]


def test_without_a_tokenizer_nothing_is_counted():
    prompt = build_prompt("t5-code", [user("Sort a list.")], None, context_length=8, max_new_tokens=8)
    assert prompt == Prompt("generate python: Sort a list.", True, 0, 0, [])


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "empty"),
        ([user("hi"), assistant("hello")], "end with a user message"),
        ([system("only a system prompt")], "end with a user message"),
        ([user("a"), user("b")], "'assistant' was expected"),
        ([user("a"), assistant("b"), system("late"), user("c")], "system messages come first"),
        ([{"role": "robot", "content": "x"}], "'role' one of system, user, assistant"),
        ([{"role": "user", "content": None}], "string 'content'"),
    ],
)
def test_bad_messages_are_refused(messages, match):
    with pytest.raises(ValueError, match=match):
        build_prompt("plain-chat", messages, None, context_length=64, max_new_tokens=8)


def test_bad_style_name_suggests_the_closest():
    with pytest.raises(
        ValueError, match=r"'t5_qa' is not a known prompt style.*Did you mean 't5-qa'\?"
    ) as caught:
        get_style("t5_qa")
    assert "alpaca-code, codellama-inst, t5-email, t5-qa, t5-code, plain-chat" in str(caught.value)
    with pytest.raises(ValueError, match="Known styles"):
        build_prompt("zzz", [user("x")], None, context_length=64, max_new_tokens=8)


def test_registry_is_keyed_by_style_name():
    assert all(isinstance(style, PromptStyle) and style.name == name for name, style in STYLES.items())
    assert get_style("alpaca-code") is STYLES["alpaca-code"]
    support = {name: (style.supports_system, style.multi_turn) for name, style in STYLES.items()}
    assert support == {
        "alpaca-code": (False, True),
        "codellama-inst": (True, True),
        "t5-email": (False, False),
        "t5-qa": (False, False),
        "t5-code": (False, False),
        "plain-chat": (True, True),
        "chat-qa": (True, False),
    }


@pytest.mark.parametrize("name", sorted(STYLES))
def test_declared_training_fields_are_exactly_what_training_pair_needs(name):
    """finetune maps data set columns onto `required_fields`/`optional_fields`, so they must be true."""
    style = STYLES[name]
    assert style.required_fields, name
    complete = {key: "some text" for key in (*style.required_fields, *style.optional_fields)}
    prompt, target = style.training_pair(complete)
    assert prompt and target
    # Optional fields may be left out; every required one is needed.
    style.training_pair({key: "some text" for key in style.required_fields})
    for missing in style.required_fields:
        fields = {key: value for key, value in complete.items() if key != missing}
        with pytest.raises(ValueError, match=missing):
            style.training_pair(fields)
