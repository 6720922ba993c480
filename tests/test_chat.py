"""ChatService: turns recorded, stop keeps the partial answer, switching keeps history, compare."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace

import pytest

from babl_core.engine.cache import ModelCache
from babl_core.engine.catalog import Catalog
from babl_core.engine.loaded import ModelUnavailable
from babl_core.engine.service import BadMessage, ChatService, ChatSession, coalesce
from tests.conftest import REPO_ROOT, install_adapter


@pytest.fixture
def service(models_dir):
    return ChatService(Catalog.load(REPO_ROOT / "configs" / "models.yaml"), ModelCache(max_models=3))


async def collect(reply) -> str:
    return "".join([chunk async for chunk in reply])


def run(coro):
    return asyncio.run(coro)


GREEDY = {"temperature": 0, "max_new_tokens": 24}


def test_respond_streams_and_records_the_turn(service):
    session = ChatSession(model_id="demo-python", settings=GREEDY)
    reply = service.respond(session, "def add(a, b):")
    text = run(collect(reply))
    assert text and reply.text == text
    assert session.messages[0] == {"role": "user", "content": "def add(a, b):"}
    assert session.messages[1]["role"] == "assistant" and session.messages[1]["content"] == text
    assert session.messages[1]["model"] == "demo-python" and session.messages[1]["stopped"] is False
    assert reply.stats.tokens_per_second > 0 and reply.description.startswith("float32 on cpu")
    assert service.active_generations == 0


def test_second_turn_prompt_contains_the_history(service):
    session = ChatSession(model_id="demo-python", settings=GREEDY)
    run(collect(service.respond(session, "first question")))
    reply = service.respond(session, "second question")
    run(collect(reply))
    assert "first question" in reply.prompt.text and "second question" in reply.prompt.text
    assert session.messages[1]["content"] in reply.prompt.text
    assert len(session.messages) == 4


def test_stop_keeps_the_partial_answer(service):
    session = ChatSession(model_id="demo-python", settings={"temperature": 0, "max_new_tokens": 1900})

    async def go():
        event = threading.Event()
        reply = service.respond(session, "class Widget:", stop_event=event)
        chunks = []
        async for chunk in reply:
            chunks.append(chunk)
            if len(chunks) == 10:
                event.set()
        return reply, "".join(chunks)

    reply, text = run(go())
    assert reply.stats.finish_reason == "cancelled"
    assert reply.stats.completion_tokens < 1900
    assert session.messages[-1]["content"] == text and session.messages[-1]["stopped"] is True


def test_cancelling_the_task_stops_generation_and_records_partial(service):
    session = ChatSession(model_id="demo-python", settings={"temperature": 0, "max_new_tokens": 1900})

    async def go():
        reply = service.respond(session, "import sys")
        seen = []

        async def consume():
            async for chunk in reply:
                seen.append(chunk)

        task = asyncio.create_task(consume())
        for _ in range(500):
            if seen or task.done():
                break
            await asyncio.sleep(0.01)
        assert seen, "no chunk arrived"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return reply

    start = time.perf_counter()
    reply = run(go())
    assert time.perf_counter() - start < 10
    assert reply.stats.finish_reason == "cancelled"
    assert session.messages[-1]["stopped"] is True
    assert service.active_generations == 0


def test_switch_keeps_history_and_rerenders_in_the_new_style(service):
    session = ChatSession(model_id="demo-python", settings=GREEDY)
    run(collect(service.respond(session, "Write a function that adds two numbers")))
    description = run(service.switch_model(session, "demo-html"))
    assert session.model_id == "demo-html" and "on cpu" in description
    reply = service.respond(session, "Now a web page")
    run(collect(reply))
    # The earlier turn is re-rendered in codellama-inst ([INST] blocks), not alpaca's "### Task:".
    assert "[INST] Write a function that adds two numbers [/INST]" in reply.prompt.text
    assert "### Task:" not in reply.prompt.text
    assert [m.get("model") for m in session.messages if m["role"] == "assistant"] == [
        "demo-python",
        "demo-html",
    ]
    # causal -> seq2seq: the T5 style answers one message at a time and says so.
    run(service.switch_model(session, "demo-qa"))
    reply = service.respond(session, "Question: who?\nContext: Ada wrote it.")
    run(collect(reply))
    assert reply.prompt.text == "question: who? context: Ada wrote it."
    assert any("earlier turns" in n for n in reply.notes)
    assert len(session.messages) == 6


def test_failed_switch_keeps_the_previous_model(service):
    session = ChatSession(model_id="demo-python")
    with pytest.raises(ModelUnavailable):
        run(service.switch_model(session, "html-codellama"))
    assert session.model_id == "demo-python"


def test_compare_with_base_while_another_session_streams(service, models_dir, html_adapters):
    install_adapter(html_adapters["ad-a"], models_dir, "html-lora")
    import json

    meta = models_dir / "adapters" / "html-lora" / "babl.json"
    data = json.loads(meta.read_text())
    data["base"] = "models/demo/demo-html"
    meta.write_text(json.dumps(data))

    session = ChatSession(model_id="html-lora", settings=GREEDY)
    other = ChatSession(model_id="demo-html", settings={"temperature": 0, "max_new_tokens": 400})

    async def go():
        adapter_text = await collect(service.respond(session, "A login form"))
        background = asyncio.create_task(collect(service.respond(other, "A pricing table")))
        compare = service.compare_with_base(session)
        base_text = await collect(compare)
        other_text = await background
        return adapter_text, base_text, other_text, compare

    adapter_text, base_text, other_text, compare = run(go())
    plain = ChatSession(model_id="demo-html", settings=GREEDY)
    reference = run(collect(service.respond(plain, "A login form")))
    assert base_text == reference and adapter_text != base_text
    assert other_text
    assert compare.model_id == "demo-html"  # the base, by the name of its own catalog entry
    assert len(session.messages) == 2  # the comparison is not recorded in the conversation
    assert service.cache.loads == 1  # adapter, base view and the other session share one base


def test_trimming_is_reported(service):
    session = ChatSession(model_id="demo-python", settings={"temperature": 0, "max_new_tokens": 1900})
    for i in range(3):
        session.messages += [
            {"role": "user", "content": f"question {i} " + "word " * 60},
            {"role": "assistant", "content": "answer " * 60, "model": "demo-python"},
        ]
    reply = service.respond(session, "the newest question")
    run(collect(reply))
    assert reply.prompt.dropped_turns >= 1
    assert any("dropped" in n for n in reply.notes)


def test_bad_input_is_a_clear_error_and_the_session_stays_usable(service):
    session = ChatSession(model_id="demo-python", settings=GREEDY)
    with pytest.raises(BadMessage, match="empty"):
        service.respond(session, "   ")
    with pytest.raises(BadMessage, match="characters"):
        service.respond(session, "x" * 1_000_000)
    with pytest.raises(BadMessage, match="tokens"):
        run(collect(service.respond(session, "word " * 3000)))  # longer than the 2048-token context alone
    assert session.messages == []
    assert run(collect(service.respond(session, "ok"))) is not None
    assert len(session.messages) == 2


def test_active_generation_count_is_visible_while_streaming(service):
    session = ChatSession(model_id="demo-python", settings={"temperature": 0, "max_new_tokens": 200})

    async def go():
        seen = []
        async for _ in service.respond(session, "go"):
            seen.append(service.active_generations)
        return seen

    assert max(run(go())) == 1
    assert service.active_generations == 0


def test_coalesce_limits_the_update_rate_and_loses_nothing():
    async def fast_source():
        for i in range(300):
            yield f"{i},"
            await asyncio.sleep(0.001)

    async def go():
        out = []
        start = time.monotonic()
        async for merged in coalesce(fast_source(), max_rate_hz=30):
            out.append(merged)
        return out, time.monotonic() - start

    out, elapsed = run(go())
    assert "".join(out) == "".join(f"{i}," for i in range(300))
    assert len(out) <= 30 * elapsed + 2


def test_coalesce_flushes_a_held_chunk_without_waiting_for_the_next():
    async def slow_source():
        yield "a"
        yield "b"  # arrives within the interval: held back...
        await asyncio.sleep(0.5)  # ...and must be flushed by the timer, not after this pause
        yield "c"

    async def go():
        stamps = []
        start = time.monotonic()
        async for merged in coalesce(slow_source(), max_rate_hz=30):
            stamps.append((merged, time.monotonic() - start))
        return stamps

    stamps = run(go())
    assert [s for s, _ in stamps] == ["a", "b", "c"]
    assert stamps[1][1] < 0.3


def test_complete_text_sends_the_prompt_as_is(service):
    reply = service.complete_text("demo-python", "def add(a, b):", temperature=0, max_new_tokens=16)
    text = run(collect(reply))
    assert reply.prompt.text == "def add(a, b):"  # no alpaca template around it
    assert reply.prompt.add_special_tokens is True and reply.prompt.token_count > 0
    assert reply.params.stop == ()  # alpaca-code's "### Instruction:" stop is not added to raw prompts
    assert text == reply.text and reply.stats.completion_tokens > 0
    styled = service.complete(
        "demo-python", [{"role": "user", "content": "def add(a, b):"}], max_new_tokens=16
    )
    run(collect(styled))
    assert styled.prompt.text != "def add(a, b):" and styled.params.stop  # the chat path keeps its style


def test_complete_text_matches_the_chat_path_with_the_same_prompt_and_seed(service):
    settings = {"temperature": 0.9, "seed": 11, "max_new_tokens": 20}
    first = run(collect(service.complete_text("demo-python", "x = ", **settings)))
    again = run(collect(service.complete_text("demo-python", "x = ", **settings)))
    assert first == again


def test_complete_text_too_long_names_the_budget(service):
    with pytest.raises(BadMessage, match="max new tokens") as info:
        run(collect(service.complete_text("demo-python", "word " * 3000, max_new_tokens=10)))
    assert info.value.__cause__.needed_tokens > info.value.__cause__.available_tokens
    with pytest.raises(BadMessage, match="empty"):
        service.complete_text("demo-python", "")
    assert service.active_generations == 0


def test_cancel_while_the_model_loads_gives_the_lease_back(models_dir):
    from babl_core.engine.loading import load_base

    gate = threading.Event()

    def slow_loader(spec, plan):
        gate.wait(10)
        return load_base(spec, plan)

    cache = ModelCache(max_models=1, loader=slow_loader)
    service = ChatService(Catalog.load(REPO_ROOT / "configs" / "models.yaml"), cache)

    async def go():
        reply = service.complete("demo-python", [{"role": "user", "content": "hi"}], max_new_tokens=4)
        task = asyncio.create_task(collect(reply))
        await asyncio.sleep(0.2)  # the task now waits for the load
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.set()
        for _ in range(200):
            if cache.status()["bases"] and cache.status()["bases"][0]["state"] == "ready":
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)  # the done-callback that gives the lease back

    run(go())
    status = cache.status()
    assert status["bases"] and status["bases"][0]["state"] == "ready"
    assert status["active_generations"] == 0  # an orphaned lease would keep the base busy forever
    assert service.active_generations == 0


def test_status_shows_bases_batches_generations_and_queue(service, capsys):
    """ChatService.status() while two sessions stream on one base; the CLI prints the same summary."""
    import http.server
    import json

    from babl_core.__main__ import main
    from babl_core.engine.service import format_status

    settings = {"temperature": 0, "max_new_tokens": 300}
    sessions = [ChatSession(model_id="demo-html", settings=settings) for _ in range(2)]

    async def go():
        replies = [service.respond(s, "A pricing table") for s in sessions]
        seen = []

        async def consume(reply):
            async for _ in reply:
                seen.append(service.status())

        await asyncio.gather(*(consume(r) for r in replies))
        return seen

    seen = run(go())
    busiest = max(seen, key=lambda s: s["bases"][0]["batch"]["active_rows"] if s["bases"][0]["batch"] else 0)
    assert busiest["active_generations"] == 2 and busiest["remote_active_generations"] == 0
    assert busiest["bases"][0]["batch"]["active_rows"] == 2 and busiest["bases"][0]["memory_mb"] > 0
    assert busiest["queue"] == 0 and service.status()["active_generations"] == 0
    text = format_status(busiest)
    assert "Loaded bases: 1 of 3 slots" in text and "batch: 2 of 16 rows decoding" in text
    assert "Active generations: 2" in text and "Queue: 0" in text
    assert busiest["admission"]["running"] == 2 and "Admission: 2 running of 16, 0 waiting of 64" in text

    class StatusHandler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps(busiest).encode()
            self.send_response(200 if self.path == "/v1/status" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StatusHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert main(["status", "--url", url]) == 0
        assert capsys.readouterr().out.strip() == text
        assert main(["status", "--url", url, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["bases"][0]["batch"]["active_rows"] == 2
    finally:
        server.shutdown()
        server.server_close()


def test_the_base_of_an_adapter_is_named_by_its_catalog_entry_or_its_own_name(service):
    adapter = replace(service.catalog.get("demo-html"), id="my-run", adapter="models/adapters/my-run")
    assert service.base_name(adapter) == "demo-html"  # the entry that serves that base without adapter
    # html-codellama has this base but also an adapter: no entry serves the bare base, so its own name.
    hub = replace(adapter, base="TinyPixel/CodeLlama-7B-Instruct-bf16-sharded")
    assert service.base_name(hub) == "CodeLlama-7B-Instruct-bf16-sharded"
    assert service.base_name(replace(adapter, base="/elsewhere/my-base/")) == "my-base"


def test_max_new_tokens_beyond_the_context_is_lowered_with_a_note(service):
    # 4096 new tokens on a 2048-token model: the chat answers with the room left, and says so.
    session = ChatSession(model_id="demo-python", settings={"temperature": 0, "max_new_tokens": 4096})
    run(collect(service.respond(session, "first question")))
    reply = service.respond(session, "second question")
    run(collect(reply))
    room = 2048 - reply.prompt.token_count
    assert reply.params.max_new_tokens == room < 2048
    assert reply.stats.completion_tokens <= room
    assert reply.notes[0] == (
        f"max new tokens lowered from 4096 to {room} for this answer: this model reads at most 2048 "
        "tokens, your message included"
    )
    assert session.messages[-1]["role"] == "assistant" and session.settings["max_new_tokens"] == 4096
    # A message that does not fit by itself is still an error, and the API keeps OpenAI's 400.
    with pytest.raises(BadMessage, match="too long"):
        run(collect(service.respond(session, "word " * 3000)))
    with pytest.raises(BadMessage, match="max new tokens"):
        run(
            collect(service.complete("demo-python", [{"role": "user", "content": "hi"}], max_new_tokens=4096))
        )
