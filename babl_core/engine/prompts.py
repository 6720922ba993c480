"""Prompt formats: the single source of every prompt Babl gives a model.

The chat app, the OpenAI-compatible API and the `finetune` trainer all render prompts through this
module; `finetune` imports it and formats each training example with `PromptStyle.training_pair`, so a
model sees at inference exactly the format it was trained on. No template is written down twice.

A `PromptStyle` turns chat messages (`{"role": "system"|"user"|"assistant", "content": str}`) into the
text a causal model continues, or a seq2seq model encodes. `build_prompt` adds the context budget: it
drops the oldest turns until the prompt fits with room for `max_new_tokens`, and says what it did in
`Prompt.notes`; only when the newest message alone cannot fit does it raise `PromptTooLong`.

Rules that training and serving share:
- Tokenize a prompt with `add_special_tokens=not style.uses_bos_in_text(tokenizer)`: chat templates
  write BOS into the text themselves, and a second one would shift every position.
- Training targets stop before the end-of-sequence token. For causal models `finetune` appends
  `tokenizer.eos_token_id`; T5 tokenizers append `</s>` on their own.
- For every style, the prompt half of `training_pair(fields)` equals `render()` of one user message
  carrying the same content (tests pin this).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, replace

from babl_core.engine.words import count

ROLES = ("system", "user", "assistant")

NOTE_NO_SYSTEM = "this model takes no system prompt; yours was not sent"


class PromptTooLong(ValueError):
    """The newest message (with the system prompt, where the style sends one) cannot fit the context.

    Attributes:
        needed_tokens: tokens of the smallest prompt that could be sent.
        available_tokens: tokens the prompt may use (the context, less max new tokens for causal models).
    """

    def __init__(self, message: str, *, needed_tokens: int, available_tokens: int):
        super().__init__(message)
        self.needed_tokens = needed_tokens
        self.available_tokens = available_tokens


@dataclass
class Prompt:
    """A rendered prompt, ready to tokenize and generate from."""

    text: str
    """What the model is given (causal: continue it; seq2seq: encoder input)."""
    add_special_tokens: bool
    """Pass to `tokenizer(...)`: False when `text` already carries BOS (chat templates)."""
    token_count: int
    """Tokens of `text` under that setting (0 when no tokenizer was given)."""
    dropped_turns: int = 0
    """Oldest user/assistant turns dropped to fit the context."""
    notes: list[str] = field(default_factory=list)
    """Human-readable remarks for the user: dropped turns, an unsent system prompt or history."""


@dataclass(frozen=True)
class Conversation:
    """Messages checked and split: the system prompt, earlier turns, and the message to answer."""

    system: str | None
    turns: tuple[tuple[str, str], ...]
    """Earlier (user, assistant) pairs, oldest first."""
    question: str
    """The newest user message."""

    def messages(self, *, answer: str | None = None) -> list[dict]:
        """Back to a message list (for chat templates); `answer` appends an assistant reply."""
        out = [{"role": "system", "content": self.system}] if self.system else []
        for user, assistant in self.turns:
            out += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        out.append({"role": "user", "content": self.question})
        if answer is not None:
            out.append({"role": "assistant", "content": answer})
        return out


def parse_conversation(messages: list[dict]) -> Conversation:
    """Check a message list and split it into system prompt, earlier turns and the newest message.

    System messages may only lead the list (several are joined by a blank line); after them roles must
    alternate user, assistant, user, ... and end with a user message, the one to answer.

    Raises:
        ValueError: empty list, malformed message, or roles out of order; the message says which.
    """
    if not messages:
        raise ValueError("messages is empty: send at least one user message to answer")
    for index, message in enumerate(messages):
        if (
            not isinstance(message, dict)
            or message.get("role") not in ROLES
            or not isinstance(message.get("content"), str)
        ):
            raise ValueError(
                f"message {index} must be a dict with 'role' one of {', '.join(ROLES)} and a string "
                f"'content'; got {message!r:.120}"
            )
    start = 0
    while start < len(messages) and messages[start]["role"] == "system":
        start += 1
    system = "\n\n".join(m["content"].strip() for m in messages[:start] if m["content"].strip()) or None
    rest = messages[start:]
    if not rest or rest[-1]["role"] != "user":
        raise ValueError("messages must end with a user message: that is the message the model answers")
    for offset, message in enumerate(rest):
        expected = "user" if offset % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ValueError(
                f"message {start + offset} has role {message['role']!r} where {expected!r} was expected: "
                "system messages come first, then roles alternate user, assistant, user, ... "
                "ending with a user message"
            )
    turns = tuple((rest[i]["content"], rest[i + 1]["content"]) for i in range(0, len(rest) - 1, 2))
    return Conversation(system=system, turns=turns, question=rest[-1]["content"])


def with_default_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """`messages` with `system_prompt` first, unless they already start with a system message of their
    own (a session's or an API client's system prompt overrides the catalog entry's)."""
    if not system_prompt or not system_prompt.strip():
        return list(messages)
    if messages and messages[0].get("role") == "system":
        return list(messages)
    return [{"role": "system", "content": system_prompt}, *messages]


def count_tokens(tokenizer, text: str, *, add_special_tokens: bool) -> int:
    """Tokens `tokenizer` makes of `text`, exactly as generation will encode it."""
    return len(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _require_fields(style: str, fields: dict, required: tuple[str, ...], optional: tuple[str, ...] = ()):
    """Check a training example's fields; the error names the style, the field and the fix."""
    missing = [key for key in required if fields.get(key) is None]
    if missing:
        wanted = ", ".join(required) + (f" (optional: {', '.join(optional)})" if optional else "")
        raise ValueError(
            f"prompt style {style!r} needs the training fields {wanted}; missing {', '.join(missing)}. "
            "Map your data set's columns to these names in the finetune config."
        )
    for key in (*required, *optional):
        value = fields.get(key)
        if value is not None and not isinstance(value, str):
            raise ValueError(
                f"prompt style {style!r}: training field {key!r} must be text, got {type(value).__name__}"
            )


def _user_only(content: str) -> Conversation:
    return Conversation(system=None, turns=(), question=content)


def _has_chat_template(tokenizer) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def _apply_chat_template(tokenizer, messages: list[dict], *, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _chat_template_target(tokenizer, conversation: Conversation, prompt: str, answer: str) -> str:
    """The text a chat template puts after the generation prompt for `answer`, without its EOS.

    Derived from the template itself (whole conversation minus the prompt), so the training target is
    what that template would show the model, whatever its layout.
    """
    full = _apply_chat_template(tokenizer, conversation.messages(answer=answer), generation_prompt=False)
    if not full.startswith(prompt):
        raise ValueError(
            "this tokenizer's chat template renders a finished conversation differently from its "
            "generation prompt, so a training target cannot be cut from it; use a template whose "
            "assistant turn continues the add_generation_prompt text"
        )
    target = full[len(prompt) :]
    eos = getattr(tokenizer, "eos_token", None)
    stripped = target.rstrip()
    # finetune appends EOS as a token id; leaving it in the text as well would train it twice.
    if eos and stripped.endswith(eos):
        target = stripped[: -len(eos)]
    return target


class PromptStyle:
    """One prompt format. Subclasses set the class attributes and implement `render_conversation`
    and `training_pair`."""

    name: str = ""
    supports_system: bool = False
    multi_turn: bool = False
    required_fields: tuple[str, ...] = ()
    """Fields `training_pair` needs (finetune maps data set columns onto these names)."""
    optional_fields: tuple[str, ...] = ()
    """Fields `training_pair` uses when present."""

    def render(self, messages: list[dict], tokenizer=None) -> str:
        """The text to give the model, ending where the answer begins.

        Args:
            messages: chat messages ending with the user message to answer.
            tokenizer: the model's tokenizer (styles that use a chat template need it; others ignore it).
        """
        return self.render_conversation(parse_conversation(messages), tokenizer)

    def render_conversation(self, conversation: Conversation, tokenizer=None) -> str:
        """`render` for an already parsed conversation (what `build_prompt` trims)."""
        raise NotImplementedError

    def training_pair(self, fields: dict, tokenizer=None) -> tuple[str, str]:
        """(prompt, target) for one training example; the prompt equals `render` of the same content.

        Args:
            fields: the example's columns, named as the style documents.
            tokenizer: the tokenizer that will be trained with, for styles that use its chat template.
        """
        raise NotImplementedError

    def stop_strings(self) -> list[str]:
        """Extra strings that end generation (the start of a new turn the model should not write)."""
        return []

    def uses_bos_in_text(self, tokenizer) -> bool:
        """True when rendered text already starts with BOS, so the tokenizer must not add another."""
        bos = getattr(tokenizer, "bos_token", None) if tokenizer is not None else None
        if not bos:
            return False
        return self.render_conversation(_user_only("hello"), tokenizer).startswith(bos)

    def __repr__(self) -> str:
        return f"<PromptStyle {self.name}>"


class AlpacaCodeStyle(PromptStyle):
    """Seed 002's instruction format (codegen-350M-mono + LoRA on python_code_instructions_18k_alpaca).

    Worded, broken into lines and indented exactly as the seed's `prompt_instruction_format`, because
    that is the text the published adapter was trained on. Earlier turns are complete blocks with their
    responses, separated by a blank line.
    """

    name = "alpaca-code"
    required_fields = ("instruction", "output")
    optional_fields = ("input",)
    supports_system = False
    multi_turn = True

    @staticmethod
    def block(instruction: str, input_text: str = "") -> str:
        """One block up to and including the indentation the response starts after."""
        return (
            "### Instruction:\n"
            "    Use the Task below and the Input given to write the Response, which is a programming code that can solve the following Task:\n"
            "\n"
            "    ### Task:\n"
            f"    {instruction}\n"
            "\n"
            "    ### Input:\n"
            f"    {input_text}\n"
            "\n"
            "    ### Response:\n"
            "    "
        )

    def render_conversation(self, conversation: Conversation, tokenizer=None) -> str:
        done = [self.block(user.strip()) + assistant.strip() for user, assistant in conversation.turns]
        return "\n\n".join([*done, self.block(conversation.question.strip())])

    def training_pair(self, fields: dict, tokenizer=None) -> tuple[str, str]:
        """Fields: `instruction`, `input` (optional, empty when absent), `output`."""
        _require_fields(self.name, fields, self.required_fields, self.optional_fields)
        prompt = self.block(fields["instruction"].strip(), (fields.get("input") or "").strip())
        return prompt, fields["output"]

    def stop_strings(self) -> list[str]:
        return ["### Instruction:"]


class CodeLlamaInstStyle(PromptStyle):
    """Llama-2 `[INST]` chat (seed 001's CodeLlama-7B-Instruct): the tokenizer's chat template when it has
    one, else the format written out with the tokenizer's BOS/EOS (`<s>`/`</s>` without a tokenizer)."""

    name = "codellama-inst"
    required_fields = ("instruction", "response")
    supports_system = True
    multi_turn = True

    @staticmethod
    def _special(tokenizer, attribute: str, default: str) -> str:
        if tokenizer is None:
            return default
        return getattr(tokenizer, attribute, None) or ""

    def render_conversation(self, conversation: Conversation, tokenizer=None) -> str:
        if _has_chat_template(tokenizer):
            return _apply_chat_template(tokenizer, conversation.messages(), generation_prompt=True)
        bos = self._special(tokenizer, "bos_token", "<s>")
        eos = self._special(tokenizer, "eos_token", "</s>")
        pending: list[tuple[str, str | None]] = [*conversation.turns, (conversation.question, None)]
        parts = []
        for index, (user, assistant) in enumerate(pending):
            user = user.strip()
            if index == 0 and conversation.system:
                user = f"<<SYS>>\n{conversation.system.strip()}\n<</SYS>>\n\n{user}"
            parts.append(f"{bos}[INST] {user} [/INST]")
            if assistant is not None:
                parts.append(f" {assistant.strip()} {eos}")
        return "".join(parts)

    def training_pair(self, fields: dict, tokenizer=None) -> tuple[str, str]:
        """Fields: `instruction`, `response`. The target is what the format puts after `[/INST]`
        (" response " in Llama-2's layout), without EOS."""
        _require_fields(self.name, fields, self.required_fields, self.optional_fields)
        conversation = _user_only(fields["instruction"])
        prompt = self.render_conversation(conversation, tokenizer)
        if _has_chat_template(tokenizer):
            return prompt, _chat_template_target(tokenizer, conversation, prompt, fields["response"])
        return prompt, f" {fields['response'].strip()} "

    def stop_strings(self) -> list[str]:
        return ["[INST]"]

    def uses_bos_in_text(self, tokenizer) -> bool:
        if tokenizer is None:
            return True  # the written-out format starts with "<s>"
        return super().uses_bos_in_text(tokenizer)


class PlainChatStyle(PromptStyle):
    """Generic chat for demo and general models: the tokenizer's chat template when present, else
    `System:` / `User:` / `Assistant:` lines."""

    name = "plain-chat"
    required_fields = ("prompt", "response")
    supports_system = True
    multi_turn = True

    def render_conversation(self, conversation: Conversation, tokenizer=None) -> str:
        if _has_chat_template(tokenizer):
            return _apply_chat_template(tokenizer, conversation.messages(), generation_prompt=True)
        parts = [f"System: {conversation.system.strip()}\n\n"] if conversation.system else []
        for user, assistant in conversation.turns:
            parts.append(f"User: {user.strip()}\nAssistant: {assistant.strip()}\n")
        parts.append(f"User: {conversation.question.strip()}\nAssistant:")
        return "".join(parts)

    def training_pair(self, fields: dict, tokenizer=None) -> tuple[str, str]:
        """Fields: `prompt`, `response`. Without a chat template the target is " response"."""
        _require_fields(self.name, fields, self.required_fields, self.optional_fields)
        conversation = _user_only(fields["prompt"])
        prompt = self.render_conversation(conversation, tokenizer)
        if _has_chat_template(tokenizer):
            return prompt, _chat_template_target(tokenizer, conversation, prompt, fields["response"])
        return prompt, f" {fields['response'].strip()}"

    def stop_strings(self) -> list[str]:
        return ["\nUser:"]


# --- T5 styles: one message in, one text out (seeds 000, 003, 004) -------------------------------

_EMAIL_LABEL = re.compile(r"^\s*(from|to|key[ _-]?points?)\s*:\s*(.*)$", re.IGNORECASE)
_QA_LABEL = re.compile(r"^\s*(question|context)\s*:\s*(.*)$", re.IGNORECASE)
_INLINE_CONTEXT = re.compile(r"\s+context\s*:\s*", re.IGNORECASE)


def parse_email_request(text: str) -> dict:
    """Split a chat message into `key_points`, `sender`, `recipient` for `t5-email`.

    Labelled lines, any case: `From: Alice`, `To: Bob`, `Key points: ...`. From/To take the rest of their
    line; every other line, after a `Key points:` label or unlabelled anywhere, is a key point.
    """
    sender = recipient = None
    key_lines: list[str] = []
    for line in text.splitlines():
        match = _EMAIL_LABEL.match(line)
        if not match:
            key_lines.append(line)
            continue
        label, value = match.group(1).lower(), match.group(2).strip()
        if label == "from":
            sender = value or None
        elif label == "to":
            recipient = value or None
        else:
            key_lines.append(value)
    return {"key_points": "\n".join(key_lines).strip(), "sender": sender, "recipient": recipient}


def parse_qa_request(text: str) -> dict:
    """Split a chat message into `question` and `context` (None when absent) for `t5-qa`.

    Labelled sections, any case, each running until the next label: `Question: ...`, `Context: ...`
    (several lines allowed). Without labels the whole text is the question. After a `Question:` label,
    the seed's one-line form `question: ... context: ...` is understood too.
    """
    sections: dict[str, list[str]] = {"lead": [], "question": [], "context": []}
    current = "lead"
    for line in text.splitlines():
        match = _QA_LABEL.match(line)
        if match:
            current = match.group(1).lower()
            sections[current].append(match.group(2))
        else:
            sections[current].append(line)
    question = "\n".join(sections["lead"] + sections["question"]).strip()
    context = "\n".join(sections["context"]).strip()
    if sections["question"] and not sections["context"]:
        head, *tail = _INLINE_CONTEXT.split(question, maxsplit=1)
        if tail:
            question, context = head.strip(), tail[0].strip()
    return {"question": question, "context": context or None}


def email_prompt(key_points: str, sender: str | None = None, recipient: str | None = None) -> str:
    """Seed 003's email-writer input: "write email: <key points>" plus "from:"/"to:" lines when given."""
    key_points = key_points.strip()
    if not key_points:
        raise ValueError(
            "This email model needs the key points of the email: write them in the message "
            "(e.g. 'Key points: system update on Friday, back up your work')"
        )
    text = "write email: " + key_points
    if sender and sender.strip():
        text += "\nfrom: " + sender.strip()
    if recipient and recipient.strip():
        text += "\nto: " + recipient.strip()
    return text


def qa_prompt(question: str, context: str | None = None) -> str:
    """Seed 004's SQuAD input: "question: <q> context: <c>", or "question: <q>" without context."""
    question = question.strip()
    if not question:
        raise ValueError(
            "This Q&A model needs a question: write it in the message (e.g. 'Question: who wrote it?')"
        )
    context = (context or "").strip()
    return f"question: {question} context: {context}" if context else f"question: {question}"


def code_prompt(text: str) -> str:
    """Seed 000's MBPP input: "generate python: <description>"."""
    text = text.strip()
    if not text:
        raise ValueError("This code model needs a description of the code to write; the message is empty")
    return f"generate python: {text}"


class T5EmailStyle(PromptStyle):
    """Seed 003: an email body written from key points (T5 trained on aeslc reversed)."""

    name = "t5-email"
    required_fields = ("key_points", "body")
    optional_fields = ("sender", "recipient")

    def render_conversation(self, conversation: Conversation, tokenizer=None) -> str:
        return email_prompt(**parse_email_request(conversation.question))

    def training_pair(self, fields: dict, tokenizer=None) -> tuple[str, str]:
        """Fields: `key_points`, `body`, optional `sender`, `recipient`."""
        _require_fields(self.name, fields, self.required_fields, self.optional_fields)
        prompt = email_prompt(fields["key_points"], fields.get("sender"), fields.get("recipient"))
        return prompt, fields["body"]


class T5QAStyle(PromptStyle):
    """Seed 004: SQuAD question answering, with or without a context passage."""

    name = "t5-qa"
    required_fields = ("question", "answer")
    optional_fields = ("context",)

    def render_conversation(self, conversation: Conversation, tokenizer=None) -> str:
        return qa_prompt(**parse_qa_request(conversation.question))

    def training_pair(self, fields: dict, tokenizer=None) -> tuple[str, str]:
        """Fields: `question`, `answer`, optional `context` (None or empty: question alone)."""
        _require_fields(self.name, fields, self.required_fields, self.optional_fields)
        return qa_prompt(fields["question"], fields.get("context")), fields["answer"]


class T5CodeStyle(PromptStyle):
    """Seed 000: Python code from a description (T5 on MBPP)."""

    name = "t5-code"
    required_fields = ("text", "code")

    def render_conversation(self, conversation: Conversation, tokenizer=None) -> str:
        return code_prompt(conversation.question)

    def training_pair(self, fields: dict, tokenizer=None) -> tuple[str, str]:
        """Fields: `text` (the description), `code`."""
        _require_fields(self.name, fields, self.required_fields, self.optional_fields)
        return code_prompt(fields["text"]), fields["code"]


QA_INSTRUCTION_WITH_CONTEXT = "Answer the question with a few words taken from the context."
QA_INSTRUCTION = "Answer the question in a few words."


def qa_message(question: str, context: str | None = None) -> str:
    """The user message `chat-qa` sends: the context (when given), the question, then how to answer.

    The labels are the ones the chat understands (`parse_qa_request`), so a message typed as
    "Question: … Context: …" and a training row with the same question and context give the same text.
    """
    question = question.strip()
    if not question:
        raise ValueError("chat-qa needs a question: write it in the message (e.g. 'Question: who wrote it?')")
    context = (context or "").strip()
    if context:
        return f"Context: {context}\n\nQuestion: {question}\n\n{QA_INSTRUCTION_WITH_CONTEXT}"
    return f"Question: {question}\n\n{QA_INSTRUCTION}"


class ChatQAStyle(PromptStyle):
    """Seed 004's question answering for causal chat models: one user message holding the context passage
    (optional) and the question, rendered through the tokenizer's chat template when it has one (else
    `User:` / `Assistant:` lines, as `plain-chat`). The answer is the short span itself.

    The causal twin of `t5-qa`: the same fields and the same `with_context` switch, so seed 004's
    experiment runs on a real chat model (SmolLM2) as well as on T5.
    """

    name = "chat-qa"
    required_fields = ("question", "answer")
    optional_fields = ("context",)
    supports_system = True

    def _conversation(self, question: str, context: str | None, system: str | None = None) -> Conversation:
        return Conversation(system=system, turns=(), question=qa_message(question, context))

    def render_conversation(self, conversation: Conversation, tokenizer=None) -> str:
        parsed = parse_qa_request(conversation.question)
        inner = self._conversation(parsed["question"], parsed["context"], conversation.system)
        return PlainChatStyle().render_conversation(inner, tokenizer)

    def training_pair(self, fields: dict, tokenizer=None) -> tuple[str, str]:
        """Fields: `question`, `answer`, optional `context` (None or empty: the question alone)."""
        _require_fields(self.name, fields, self.required_fields, self.optional_fields)
        conversation = self._conversation(fields["question"], fields.get("context"))
        prompt = PlainChatStyle().render_conversation(conversation, tokenizer)
        if _has_chat_template(tokenizer):
            return prompt, _chat_template_target(tokenizer, conversation, prompt, fields["answer"].strip())
        return prompt, f" {fields['answer'].strip()}"

    def stop_strings(self) -> list[str]:
        return ["\nUser:"]


STYLES: dict[str, PromptStyle] = {
    style.name: style
    for style in (
        AlpacaCodeStyle(),
        CodeLlamaInstStyle(),
        T5EmailStyle(),
        T5QAStyle(),
        T5CodeStyle(),
        PlainChatStyle(),
        ChatQAStyle(),
    )
}


def get_style(name: str) -> PromptStyle:
    """The registered style called `name`.

    Raises:
        ValueError: unknown name; the message suggests the closest known one and lists them all.
    """
    try:
        return STYLES[name]
    except (KeyError, TypeError):
        pass
    close = difflib.get_close_matches(str(name), STYLES, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"{name!r} is not a known prompt style (the catalog's `prompt_style` setting).{hint} "
        f"Known styles: {', '.join(STYLES)}."
    )


def build_prompt(
    style: PromptStyle | str,
    messages: list[dict],
    tokenizer,
    *,
    context_length: int,
    max_new_tokens: int,
    seq2seq: bool = False,
) -> Prompt:
    """Render `messages` in `style`, dropping the oldest turns until the prompt fits the context.

    A turn is a user message with the assistant reply after it; the system prompt is always kept.
    Causal models need `token_count + max_new_tokens <= context_length`; for seq2seq the decoder is
    separate, so only `token_count <= context_length`.

    Args:
        style: a `PromptStyle` or its registered name.
        messages: chat messages ending with the user message to answer.
        tokenizer: the model's tokenizer; None renders without counting or trimming.
        context_length: the model's context (encoder input length for seq2seq).
        max_new_tokens: room kept for the answer (causal models only).
        seq2seq: True for encoder-decoder models.

    Raises:
        PromptTooLong: even the newest message alone does not fit.
        ValueError: bad messages, style name or lengths.
    """
    if isinstance(style, str):
        style = get_style(style)
    if context_length <= 0:
        raise ValueError(f"context_length must be positive, got {context_length}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be zero or more, got {max_new_tokens}")
    conversation = parse_conversation(messages)
    notes = []
    if conversation.system and not style.supports_system:
        notes.append(NOTE_NO_SYSTEM)
    if not style.multi_turn and conversation.turns:
        notes.append("this model answers one message at a time; earlier turns were not sent")
        conversation = replace(conversation, turns=())
    add_special_tokens = not style.uses_bos_in_text(tokenizer)

    def attempt(drop: int) -> tuple[str, int]:
        text = style.render_conversation(replace(conversation, turns=conversation.turns[drop:]), tokenizer)
        if tokenizer is None:
            return text, 0
        return text, count_tokens(tokenizer, text, add_special_tokens=add_special_tokens)

    if tokenizer is None:
        text, _ = attempt(0)
        return Prompt(text, add_special_tokens, 0, 0, notes)
    available = context_length if seq2seq else context_length - max_new_tokens
    total = len(conversation.turns)
    text, count = attempt(total)  # the system prompt and the message alone
    if count > available:
        raise PromptTooLong(
            _too_long_message(style, conversation, count, available, context_length, max_new_tokens, seq2seq),
            needed_tokens=count,
            available_tokens=max(available, 0),
        )
    dropped = total
    if total:
        dropped, (text, count) = _fewest_dropped(attempt, conversation.turns, tokenizer, available, count)
    if dropped:
        plural = "turn" if dropped == 1 else "turns"
        notes.append(f"dropped {dropped} oldest {plural} to fit the {context_length}-token context")
    return Prompt(text, add_special_tokens, count, dropped, notes)


CHARS_PER_TOKEN_BOUND = 8
"""A text longer than (limit + 1) x this many characters is counted on such a prefix first: no tokenizer
here averages more characters per token, so the prefix alone already shows that it overflows."""
TURN_SLACK_TOKENS = 6
"""How far a turn counted on its own may differ from its tokens inside the rendered prompt."""


def _count_at_least(tokenizer, text: str, limit: int) -> int:
    """The tokens of `text`, or, when it surely has more than `limit`, a number above `limit`: a long
    text is counted on a prefix first, so a 1 MB message is not tokenized to learn that it overflows."""
    cut = (max(limit, 0) + TURN_SLACK_TOKENS + 1) * CHARS_PER_TOKEN_BOUND
    if len(text) > cut:
        prefix = count_tokens(tokenizer, text[:cut], add_special_tokens=False)
        if prefix > limit + TURN_SLACK_TOKENS:
            return prefix
    return count_tokens(tokenizer, text, add_special_tokens=False)


def _fewest_dropped(
    attempt, turns: tuple, tokenizer, available: int, alone: int
) -> tuple[int, tuple[str, int]]:
    """The fewest oldest turns to drop so the prompt fits, and `attempt(that number)`.

    Linear in the conversation's length: rendering and counting the whole history for each guess (a
    bisection) cost a 19 MB history tens of seconds. Here each turn is counted once, newest first, until
    the turns alone exceed the tokens left next to the system prompt and the message: older
    turns cannot fit, and their text is never tokenized (a long one only in part). That count ignores
    the template's tokens between turns, so the guess is then checked on the rendered prompt, which is
    never much longer than the context: one step down to confirm (unless the next turn overflows by
    far), galloping up while it does not fit, then bisection.
    Keeping fewer turns never makes the prompt longer, which makes the answer exact.

    Args:
        attempt: drop count -> (rendered text, token count).
        turns: the earlier (user, assistant) pairs, oldest first.
        tokenizer: counts each turn's text.
        available: tokens the prompt may have.
        alone: tokens of the prompt without any turn (dropping them all fits).
    """
    room = available - alone
    kept, used = 0, 0
    for user, assistant in reversed(turns):
        used += _count_at_least(tokenizer, user, room - used)
        used += _count_at_least(tokenizer, assistant, room - used)
        if used > room:
            break
        kept += 1
    total = len(turns)
    # Each turn's count may be off by a few tokens inside the template (merges at its edges, a prefix cut).
    surely_over = kept < total and used > room + TURN_SLACK_TOKENS * (kept + 1) + TURN_SLACK_TOKENS
    budget = available
    guess = total - kept
    result = attempt(guess)
    if result[1] <= budget:
        high, best, step = guess, result, 1
        if surely_over:  # the next older turn overflows by far: no need to render it to know
            return high, best
        while high > 0:  # usually one render: the turn before the guess did not fit on its own
            candidate = max(high - step, 0)
            tried = attempt(candidate)
            if tried[1] > budget:
                low = candidate
                break
            high, best, step = candidate, tried, step * 2
        else:
            return 0, best
    else:
        low, step = guess, 1
        while True:  # dropping every turn fits (checked by the caller)
            candidate = min(low + step, total)
            tried = attempt(candidate)
            if tried[1] <= budget:
                high, best = candidate, tried
                break
            low, step = candidate, step * 2
    while high - low > 1:  # invariant: dropping `low` turns does not fit, dropping `high` does
        middle = (low + high) // 2
        tried = attempt(middle)
        if tried[1] <= budget:
            high, best = middle, tried
        else:
            low = middle
    return high, best


def _too_long_message(
    style: PromptStyle,
    conversation: Conversation,
    needed: int,
    available: int,
    context_length: int,
    max_new_tokens: int,
    seq2seq: bool,
) -> str:
    with_system = bool(conversation.system and style.supports_system)
    what = "the message with the system prompt" if with_system else "the message"
    shorten = "shorten the message or the system prompt" if with_system else "shorten the message"
    if seq2seq:
        return (
            f"The prompt is too long: {what} needs {count(needed, 'token')} but the model reads at most "
            f"{context_length}. To fix it, {shorten}."
        )
    room = context_length - needed
    if room > 0:
        fix = f"{shorten} or lower max new tokens to {room} or less"
    else:
        fix = f"{shorten} (lowering max new tokens alone cannot help)"
    return (
        f"The prompt is too long: {what} needs {count(needed, 'token')} but only {max(available, 0)} "
        f"{'is' if max(available, 0) == 1 else 'are'} available "
        f"(a {context_length}-token context minus {max_new_tokens} max new tokens). To fix it, {fix}."
    )
