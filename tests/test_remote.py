"""Remote backend: `backend: openai` entries stream from a real `transformers serve` on loopback.

The server runs the session's demo-html directory, so a remote answer can be compared with the same
model served locally. Failures (server down, silent server, refused key, unknown model) use small
stand-in servers, so each error path is exercised for real over HTTP.
"""

from __future__ import annotations

import asyncio
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from babl_core.engine.availability import availability
from babl_core.engine.cache import ModelCache
from babl_core.engine.catalog import Catalog
from babl_core.engine.generation import GenerationParams
from babl_core.engine.loaded import ModelUnavailable
from babl_core.engine.remote import RemoteBackendError, RemoteStream, forget_probes
from babl_core.engine.service import ChatService, ChatSession

GREEDY = {"temperature": 0, "max_new_tokens": 30}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def serve_url(session_models_dir, tmp_path_factory):
    """`transformers serve <demo-html dir>` on a free loopback port (needs transformers[serving])."""
    exe = Path(sys.executable).with_name("transformers")
    if not exe.exists() and not shutil.which("transformers"):
        pytest.fail('the `transformers` CLI is missing: pip install "transformers[serving]==5.23.0"')
    model_dir = session_models_dir / "demo" / "demo-html"
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(exe) if exe.exists() else "transformers", "serve", str(model_dir),
             "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    import httpx

    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"transformers serve exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"transformers serve did not start in 90 s:\n{log.read_text()[-2000:]}")
            time.sleep(0.3)
        yield f"http://127.0.0.1:{port}/v1", str(model_dir)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def remote_entry(id_: str, base_url: str, model: str, **extra) -> dict:
    return {"id": id_, "task": "html", "backend": "openai", "base_url": base_url, "remote_model": model,
            "prompt_style": "codellama-inst", **extra}  # fmt: skip


@pytest.fixture
def make_service(tmp_path, session_models_dir):
    """A ChatService over a catalog of demo-html (local) plus the given remote entries."""

    def make(*entries: dict) -> ChatService:
        local = {"id": "demo-html", "task": "html", "base": str(session_models_dir / "demo" / "demo-html"),
                 "kind": "causal", "quantization": "none", "dtype": "float32", "prompt_style": "codellama-inst"}  # fmt: skip
        path = tmp_path / "models.yaml"
        path.write_text(yaml.safe_dump({"models": [local, *entries]}))
        forget_probes()
        return ChatService(Catalog.load(path), ModelCache())

    return make


async def collect(reply) -> str:
    return "".join([chunk async for chunk in reply])


@pytest.mark.e2e
@pytest.mark.slow
def test_remote_entry_streams_the_same_text_as_the_local_model(serve_url, make_service):
    url, model = serve_url
    service = make_service(remote_entry("remote-html", url, model))
    assert availability(service.spec("remote-html")).word == "local"
    local = ChatSession(model_id="demo-html", settings=GREEDY)
    remote = ChatSession(model_id="remote-html", settings=GREEDY)
    local_text = asyncio.run(collect(service.respond(local, "A login form")))
    reply = service.respond(remote, "A login form")
    chunks = []

    async def go():
        async for chunk in reply:
            chunks.append(chunk)

    asyncio.run(go())
    # Same weights, same chat template (the server renders it), greedy: the same answer.
    assert "".join(chunks) == local_text and len(chunks) > 5
    assert reply.stats.finish_reason == "length" and reply.stats.completion_tokens == 30
    assert reply.description.startswith("remote: ") and reply.prompt is None
    assert remote.messages[-1] == {"role": "assistant", "content": local_text, "model": "remote-html",
                                   "stopped": False}  # fmt: skip
    assert service.cache.loads == 1  # only the local entry loaded anything


@pytest.mark.e2e
@pytest.mark.slow
def test_stop_button_and_stop_strings_on_a_remote_answer(serve_url, make_service):
    url, model = serve_url
    service = make_service(remote_entry("remote-html", url, model))
    full = asyncio.run(
        collect(service.complete("remote-html", [{"role": "user", "content": "Hi"}], **GREEDY))
    )
    stop = full[8:12]
    reply = service.complete(
        "remote-html", [{"role": "user", "content": "Hi"}], stop=[stop], top_k=5, **GREEDY
    )
    assert asyncio.run(collect(reply)) == full[: full.index(stop)] and reply.stats.finish_reason == "stop"
    assert any("top_k" in note for note in reply.notes)  # not sent: not an OpenAI field

    event = threading.Event()
    long = service.complete(
        "remote-html",
        [{"role": "user", "content": "Hi"}],
        stop_event=event,
        temperature=0,
        max_new_tokens=1500,
    )

    async def stop_after_five():
        chunks = []
        async for chunk in long:
            chunks.append(chunk)
            if len(chunks) == 5:
                event.set()
        return "".join(chunks)

    start = time.monotonic()
    text = asyncio.run(stop_after_five())
    assert time.monotonic() - start < 20
    assert text and long.stats.finish_reason == "cancelled" and long.stats.completion_tokens < 1500


@pytest.mark.e2e
@pytest.mark.slow
def test_a_raw_prompt_goes_to_the_text_completions_route(serve_url, make_service):
    from babl_core.engine.batching import generate_text

    url, model = serve_url
    service = make_service(remote_entry("remote-html", url, model))
    params = GenerationParams(max_new_tokens=25, temperature=0)
    remote = RemoteStream(service.spec("remote-html"), [], params, prompt="<body><h1>")
    assert remote.route == "/completions"
    text = "".join(remote)
    with service.cache.lease(service.spec("demo-html")) as loaded:
        assert text == generate_text(loaded, "<body><h1>", params) and text
    assert remote.stats.completion_tokens == 25 and remote.stats.finish_reason == "length"

    # The API's text completions take the same route through ChatService.complete_text.
    seen = []

    def spy(*args, **kwargs):
        stream = RemoteStream(*args, **kwargs)
        seen.append(stream.route)
        return stream

    service.remote_stream_fn = spy
    reply = service.complete_text("remote-html", "<body><h1>", max_new_tokens=25, temperature=0)

    async def collect():
        return "".join([chunk async for chunk in reply])

    assert asyncio.run(collect()) == text and seen == ["/completions"]


@pytest.mark.e2e
@pytest.mark.slow
def test_unknown_remote_model_names_the_field(serve_url, make_service):
    url, _ = serve_url
    service = make_service(remote_entry("remote-bad", url, "no-such-model"))
    with pytest.raises(RemoteBackendError, match=r"remote_model \('no-such-model'\)"):
        asyncio.run(collect(service.complete("remote-bad", [{"role": "user", "content": "Hi"}], **GREEDY)))


def test_server_down_is_unavailable_with_the_reason(make_service):
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    service = make_service(remote_entry("remote-down", url, "m"))
    avail = availability(service.spec("remote-down"))
    assert avail.word == "unavailable" and "remote server down" in avail.reason and url in avail.reason
    with pytest.raises(ModelUnavailable, match="remote server down"):
        service.respond(ChatSession(model_id="remote-down"), "hi")
    stream = RemoteStream(
        service.spec("remote-down"), [{"role": "user", "content": "hi"}], GenerationParams()
    )
    with pytest.raises(RemoteBackendError, match=r"could not reach .* fix base_url"):
        list(stream)
    assert stream.stats.finish_reason == "error"


class _StandIn(http.server.BaseHTTPRequestHandler):
    """A stand-in server: `/models` answers; POST either hangs (silent) or answers 401."""

    mode = "silent"

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"data": []}')

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.mode == "silent":
            time.sleep(3)
            return
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error": "invalid api key"}')

    def log_message(self, *args):
        pass


@pytest.fixture
def stand_in():
    servers = []

    def start(mode: str) -> str:
        handler = type("Handler", (_StandIn,), {"mode": mode})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/v1"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_a_silent_server_times_out_with_the_setting_named(stand_in, make_service, monkeypatch):
    monkeypatch.setenv("BABL_REMOTE_TIMEOUT_S", "0.5")
    service = make_service(remote_entry("remote-silent", stand_in("silent"), "m"))
    start = time.monotonic()
    with pytest.raises(RemoteBackendError, match=r"did not send anything for 0.5 s.*BABL_REMOTE_TIMEOUT_S"):
        asyncio.run(collect(service.complete("remote-silent", [{"role": "user", "content": "hi"}])))
    assert time.monotonic() - start < 2.5


def test_api_key_missing_or_refused_names_the_variable(stand_in, make_service, monkeypatch):
    monkeypatch.delenv("BABL_TEST_REMOTE_KEY", raising=False)
    url = stand_in("refuse")
    service = make_service(remote_entry("remote-key", url, "m", api_key_env="BABL_TEST_REMOTE_KEY"))
    avail = availability(service.spec("remote-key"))
    assert avail.word == "unavailable" and "BABL_TEST_REMOTE_KEY" in avail.reason
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(RemoteBackendError, match=r"BABL_TEST_REMOTE_KEY .* is not set"):
        list(RemoteStream(service.spec("remote-key"), messages, GenerationParams()))
    monkeypatch.setenv("BABL_TEST_REMOTE_KEY", "wrong")
    forget_probes()
    assert availability(service.spec("remote-key")).word == "local"  # /models answers without a key check
    with pytest.raises(RemoteBackendError, match=r"refused the request \(401\); set BABL_TEST_REMOTE_KEY"):
        asyncio.run(collect(service.complete("remote-key", messages)))


def test_a_chat_session_switches_to_and_answers_with_a_remote_entry(make_service):
    """The chat path (switch in the settings, then answer) on `backend: openai` entries: nothing is
    loaded here, the answer streams from the server, the turn is recorded."""
    from tests.openai_stand_in import OpenAIStandIn

    with OpenAIStandIn() as server:
        service = make_service(remote_entry("remote-a", server.base_url, "model-a", task="chat"))
        session = ChatSession(model_id="demo-html", settings=GREEDY)

        async def go():
            description = await service.switch_model(session, "remote-a")
            assert service.is_ready(service.spec("remote-a"))
            return description, await collect(service.respond(session, "hello"))

        description, text = asyncio.run(go())
    assert description == f"remote: model-a at {server.base_url}"
    assert session.model_id == "remote-a" and text == "Hello from model-a."
    assert session.messages[-1] == {
        "role": "assistant",
        "content": text,
        "model": "remote-a",
        "stopped": False,
    }
    assert server.requests[-1]["messages"][-1] == {"role": "user", "content": "hello"}
    assert service.cache.status()["bases"] == []  # nothing was loaded for it
