"""A bad-input corpus against a running server (`chainlit run app.py`): each case gets its clear error in
OpenAI's shape, and after each the server is alive (`/health` within 10 s) and answers a normal request.
Every /v1 case is sent twice, with and without `stream: true`."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.servers import chainlit_server, server_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

HEALTH_S = 10  # the bound for a test; bench/soak.py measures the real latency
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def server(session_models_dir, tmp_path_factory) -> str:
    """The app as users start it, with the default limits."""
    env = server_env(session_models_dir, tmp_path_factory.mktemp("reliability-data"))
    log_path = tmp_path_factory.mktemp("reliability-server") / "chainlit.log"
    with chainlit_server(env=env, log_path=log_path) as url:
        yield url


def chat(**extra) -> dict:
    return {"model": "demo-python", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}


def text(**extra) -> dict:
    return {"model": "demo-python", "prompt": "def f(x):", "max_tokens": 4, **extra}


def user(content: str) -> dict:
    return chat(messages=[{"role": "user", "content": content}])


CHAT, TEXT = "/v1/chat/completions", "/v1/completions"
MB = 1_000_000

# (name, path, body: a dict sent as JSON, or raw bytes sent as is, headers, statuses allowed, the error
# `param` expected or None). A dict body to /v1 is sent once more with "stream": true.
CASES = [
    # #17 item 1: one small request became 16,000 generations; a 19 MB history froze the loop
    ("2,000 prompts × n 8", TEXT, text(prompt=["x"] * 2000, n=8, max_tokens=1), {}, {400}, "prompt"),
    ("17 prompts", TEXT, text(prompt=["x"] * 17), {}, {400}, "prompt"),
    ("n × prompts 24", TEXT, text(prompt=["x"] * 3, n=8), {}, {400}, "n"),
    ("19 MB history", CHAT, chat(messages=[{"role": "user", "content": "word " * 60_000},
                                           {"role": "assistant", "content": "ok " * 60_000}] * 40
                                          + [{"role": "user", "content": "and?"}]), {}, {413}, None),
    ("500 kB history", CHAT, chat(messages=[{"role": "user", "content": "a" * 250_000},
                                            {"role": "assistant", "content": "b" * 250_000},
                                            {"role": "user", "content": "and?"}]), {}, {400}, "messages"),
    # item 6: a lone surrogate
    ("lone surrogate", CHAT, b'{"model": "demo-python", "max_tokens": 4, "messages": '
     b'[{"role": "user", "content": "hi \\ud800"}]}', JSON, {400}, "messages"),
    ("lone surrogate, streamed", CHAT, b'{"model": "demo-python", "max_tokens": 4, "stream": true, '
     b'"messages": [{"role": "user", "content": "\\udfff"}]}', JSON, {400}, "messages"),
    # item 7: temperature 100 / Infinity refused like NaN
    ("temperature 100", CHAT, chat(temperature=100), {}, {422}, "temperature"),
    ("temperature 1e999 (Infinity)", CHAT, b'{"model": "demo-python", "max_tokens": 4, "temperature": 1e999, '
     b'"messages": [{"role": "user", "content": "hi"}]}', JSON, {422}, "temperature"),
    ("temperature Infinity literal", CHAT, b'{"model": "demo-python", "temperature": Infinity, '
     b'"messages": [{"role": "user", "content": "hi"}]}', JSON, {422}, None),
    ("temperature NaN literal", CHAT, b'{"model": "demo-python", "temperature": NaN, '
     b'"messages": [{"role": "user", "content": "hi"}]}', JSON, {422}, None),
    ("temperature -1", CHAT, chat(temperature=-1), {}, {422}, "temperature"),
    ("top_p 2", CHAT, chat(top_p=2), {}, {422}, "top_p"),
    # the rest of the corpus
    ("empty messages", CHAT, chat(messages=[]), {}, {422}, "messages"),
    ("missing messages", CHAT, {"model": "demo-python"}, {}, {422}, "messages"),
    ("empty message", CHAT, user(""), {}, {400}, "messages"),
    ("1 MB message", CHAT, user("x" * MB), {}, {400}, "messages"),
    ("10 MB message", CHAT, user("x" * 10 * MB), {}, {413}, None),
    ("prompt longer than the context", CHAT, user("word " * 3000), {}, {400}, "messages"),
    ("prompt longer than the context, raw", TEXT, text(prompt="word " * 3000), {}, {400}, "prompt"),
    ("max_tokens 0", CHAT, chat(max_tokens=0), {}, {422}, "max_tokens"),
    ("max_tokens -1", CHAT, chat(max_tokens=-1), {}, {422}, "max_tokens"),
    ("max_tokens 10^6", CHAT, chat(max_tokens=10**6), {}, {422}, "max_tokens"),
    ('max_tokens "abc"', CHAT, chat(max_tokens="abc"), {}, {422}, "max_tokens"),
    ("n 0", CHAT, chat(n=0), {}, {422}, "n"),
    ("n 1000", CHAT, chat(n=1000), {}, {422}, "n"),
    ("seed 2^64", CHAT, chat(seed=2**64), {}, {422}, "seed"),
    ("unknown model", CHAT, chat(model="no-such-model"), {}, {404}, "model"),
    ("a path as model", CHAT, chat(model="../../etc/passwd"), {}, {404}, "model"),
    ("an absolute path as model", TEXT, text(model="/work/models/demo/demo-python"), {}, {404}, "model"),
    ("malformed JSON", CHAT, b'{"model": "demo-python", "messages": [', JSON, {422}, None),
    ("wrong content type", CHAT, json.dumps(chat()).encode(), {"content-type": "text/plain"}, {422}, None),
    ("1,000 stop strings", CHAT, chat(stop=[f"s{i}" for i in range(1000)]), {}, {422}, "stop"),
    ("NUL bytes", CHAT, user("a\x00b\x00" * 10), {}, {200}, None),
    ("NUL bytes, raw", TEXT, text(prompt="\x00" * 50), {}, {200}, None),
    ("seed 003 n_gen 10^4", "/", {"prompt": "update on friday", "n_gen": 10**4}, {}, {422}, "n_gen"),
    ("seed 003 token_count 10^6", "/", {"prompt": "update on friday", "token_count": 10**6}, {}, {422},
     "token_count"),
    ("seed 003 lone surrogate", "/api/generate", b'{"prompt": "\\ud800", "token_count": 4}', JSON, {400},
     "prompt"),
]  # fmt: skip


def expand(cases):
    for name, path, body, headers, statuses, param in cases:
        yield pytest.param(path, body, headers, statuses, param, id=name)
        if path.startswith("/v1/") and isinstance(body, dict):
            yield pytest.param(
                path, {**body, "stream": True}, headers, statuses, param, id=f"{name}, streamed"
            )


def alive(server: str, http: httpx.Client) -> None:
    """`/health` within 10 s, then a normal request answered with text."""
    start = time.monotonic()
    health = http.get(f"{server}/health", timeout=HEALTH_S)
    assert health.status_code == 200 and time.monotonic() - start < HEALTH_S
    answer = http.post(f"{server}{CHAT}", json=chat(temperature=0), timeout=60)
    assert answer.status_code == 200, answer.text[:300]
    assert answer.json()["choices"][0]["message"]["content"] is not None


@pytest.fixture(scope="module")
def http():
    with httpx.Client() as client:
        yield client


@pytest.mark.parametrize(("path", "body", "headers", "statuses", "param"), list(expand(CASES)))
def test_bad_input_gets_a_clear_error_and_the_server_stays_up(
    server, http, path, body, headers, statuses, param
):
    if isinstance(body, dict):
        response = http.post(f"{server}{path}", json=body, headers=headers, timeout=60)
    else:
        response = http.post(f"{server}{path}", content=body, headers=headers, timeout=60)
    assert response.status_code in statuses, response.text[:500]
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        if param is not None:
            assert error["param"] == param, error
    elif isinstance(body, dict) and body.get("stream"):
        assert response.text.rstrip().endswith("data: [DONE]")
    alive(server, http)


def test_openapi_schema_and_docs(server, http):
    schema = http.get(f"{server}/openapi.json", timeout=30)
    assert schema.status_code == 200 and CHAT in schema.json()["paths"]
    docs = http.get(f"{server}/docs", timeout=30)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    alive(server, http)


def test_health_answers_while_requests_flood_in(server):
    """The review's freezing request, ten at once with a few normal streams: /health keeps answering."""
    import concurrent.futures

    flood = text(prompt=["x"] * 2000, n=8, max_tokens=1)

    def send(body: dict) -> int:
        with httpx.Client() as client:
            return client.post(f"{server}{TEXT}", json=body, timeout=120).status_code

    with concurrent.futures.ThreadPoolExecutor(max_workers=14) as pool:
        futures = [pool.submit(send, flood) for _ in range(10)]
        futures += [pool.submit(send, text(max_tokens=32, stream=True)) for _ in range(4)]
        latencies = []
        with httpx.Client() as client:
            while not all(f.done() for f in futures):
                start = time.monotonic()
                assert client.get(f"{server}/health", timeout=HEALTH_S).status_code == 200
                latencies.append(time.monotonic() - start)
                time.sleep(0.05)
        statuses = sorted(f.result() for f in futures)
    assert statuses.count(400) == 10, statuses  # the floods are refused before any work
    assert all(s in (200, 429) for s in statuses if s != 400), (
        statuses
    )  # the streams: served or told to retry
    assert latencies and max(latencies) < HEALTH_S
