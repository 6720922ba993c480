"""SmolLM2-135M-Instruct, real weights with no hub: the shipped smollm2-* entries end to end.

One real-model load per test session (the `smollm2` fixture in conftest); answers are greedy, so each
is the same on every run. Answers are kept short: on 2 CPU cores this model writes ~15 tokens/s.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from babl_core import settings
from babl_core.engine import gguf
from babl_core.engine.generation import GenerationParams
from babl_core.engine.service import ChatSession, render_prompt
from babl_core.web.render import extract_html, format_answer
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

PARIS = "What is the capital of France?"


def answer(service, model_id: str, text: str, **overrides) -> str:
    async def run() -> str:
        reply = service.respond(ChatSession(model_id=model_id), text, **overrides)
        return "".join([chunk async for chunk in reply])

    return asyncio.run(run())


def test_the_real_model_knows_the_capital_of_france(smollm2, smollm2_service):
    _catalog, _spec, loaded = smollm2
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert loaded.model.config.num_hidden_layers == 30 and loaded.model.config.num_key_value_heads == 3
    assert 134e6 < sum(p.numel() for p in loaded.model.parameters()) < 135e6
    assert "Paris" in answer(smollm2_service, "smollm2-chat", PARIS, max_new_tokens=24)


def test_multi_turn_rendering_through_the_chat_template_with_and_without_a_system_prompt(smollm2):
    catalog, _spec, loaded = smollm2
    spec = catalog.get("smollm2-email")
    params = GenerationParams(max_new_tokens=32)
    turns = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "Write to Ben."},
    ]
    expected_turns = (
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi! How can I help?<|im_end|>\n"
        "<|im_start|>user\nWrite to Ben.<|im_end|>\n<|im_start|>assistant\n"
    )
    # The entry's task system prompt, through the model's own template.
    entry = render_prompt(spec, loaded, turns, params)
    assert entry.text == f"<|im_start|>system\n{spec.system_prompt}<|im_end|>\n{expected_turns}"
    assert not entry.add_special_tokens  # the template writes the special tokens itself
    # The session's system prompt replaces the entry's.
    own = render_prompt(spec, loaded, [{"role": "system", "content": "Answer in French."}, *turns], params)
    assert own.text == f"<|im_start|>system\nAnswer in French.<|im_end|>\n{expected_turns}"
    # No system prompt at all: the template's own default, then the same turns.
    bare = render_prompt(replace(spec, system_prompt=None), loaded, turns, params)
    assert bare.text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert bare.text.endswith(expected_turns)
    assert bare.token_count == len(loaded.tokenizer(bare.text, add_special_tokens=False)["input_ids"])


def test_each_task_entry_renders_a_real_answer(smollm2_service):
    html = answer(
        smollm2_service,
        "smollm2-html",
        "Write a web page with a red heading that says Hello.",
        max_new_tokens=96,
    )
    document = extract_html(html, partial=True)
    assert document and "Hello" in document and "<" in document
    assert format_answer("html", html).lstrip().startswith("```html")

    python = answer(
        smollm2_service,
        "smollm2-python",
        "Write a Python function that returns the sum of a list of numbers.",
        max_new_tokens=48,
    )
    shown = format_answer("python", python, partial=True)
    assert "```python" in shown and "def " in shown and "return" in shown

    email = answer(
        smollm2_service,
        "smollm2-email",
        "From: Ana\nTo: Ben\nKey points: the team meeting moves to Friday at 10",
        max_new_tokens=96,
    )
    assert "Ben" in email and "meeting" in email
    shown = format_answer("email", email)
    paragraphs = [p for p in email.strip().split("\n\n") if p.strip()]
    assert len(paragraphs) >= 2 and shown.count("\n\n") == len(paragraphs) - 1  # the email's layout kept


def test_a_second_load_reuses_the_converted_folder_without_reading_the_gguf(smollm2, monkeypatch):
    from babl_core.engine.loading import load_base, plan_load

    _catalog, spec, first = smollm2
    folder = gguf.converted_dir(spec, "float32")
    assert folder.parent == settings.gguf_dir() and folder.name.endswith("-float32")
    assert (folder / "model.safetensors").is_file() and (folder / gguf.MARKER).is_file()

    def must_not_read(*args, **kwargs):
        raise AssertionError("the GGUF file was read again")

    for reader in ("file_sha256", "gguf_parameter_count", "_convert_with_transformers"):
        monkeypatch.setattr(gguf, reader, must_not_read)
    again = load_base(spec, plan_load(spec))
    assert again.model is not first.model
    assert again.model.config.num_hidden_layers == 30


def test_cli_generate_answers_paris_from_the_converted_folder(smollm2, session_models_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith("BABL_")}
    env.update(PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1", BABL_MODELS_DIR=str(session_models_dir))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "babl_core",
            "generate",
            "--model",
            "smollm2-chat",
            "--max-new-tokens",
            "24",
            PARIS,
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Paris" in result.stdout
    assert "Converting" not in result.stderr  # the session's conversion was reused
