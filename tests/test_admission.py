"""Admission control: request limits before any work, the bounded queue of waiting generations, the
per-client share, "busy, N ahead of you" in the chat, and 413/400/429 in OpenAI's shape."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from babl_core.engine.admission import Admission, Limits, RequestTooLarge, ServerBusy, check_request
from babl_core.engine.cache import ModelCache
from babl_core.engine.catalog import Catalog
from babl_core.engine.service import BadMessage, ChatService, ChatSession
from babl_core.web import runtime, ui
from babl_core.web.api import routes
from tests.conftest import REPO_ROOT

GREEDY = {"temperature": 0, "max_new_tokens": 8}


def service_with(limits: Limits) -> ChatService:
    return ChatService(
        Catalog.load(REPO_ROOT / "configs" / "models.yaml"),
        ModelCache(max_models=2),
        admission=Admission(limits),
    )


@pytest.fixture
def app_with(models_dir, monkeypatch):
    """A FastAPI app with the API on a fresh service whose limits the test chooses."""
    monkeypatch.delenv("BABL_API_KEY", raising=False)
    app = FastAPI()
    routes.register_api(app)

    def make(**limits) -> tuple[TestClient, ChatService]:
        service = service_with(Limits(**limits))
        runtime.reset_service(service)
        return TestClient(app), service

    yield make
    runtime.reset_service(None)


def chat_body(**extra) -> dict:
    return {"model": "demo-python", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}


def assert_openai_error(response, status: int, param: str | None, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"]) == (param, code)
    return error


def nothing_started(service: ChatService) -> bool:
    status = service.status()
    return status["bases"] == [] and status["admission"]["held"] == 0 and service.active_generations == 0


# --------------------------------------------------------------------------------------------------
# Limits of one request


def test_limits_come_from_the_environment(monkeypatch):
    assert Limits.from_env() == Limits()  # body 2 MB, 16 prompts, n x prompts 16, 64 queued, 4 per client
    assert (Limits().max_body_bytes, Limits().max_prompts, Limits().max_generations) == (2_000_000, 16, 16)
    assert (Limits().max_queued, Limits().max_per_client) == (64, 4)
    monkeypatch.setenv("BABL_MAX_QUEUED", "3")
    monkeypatch.setenv("BABL_MAX_PER_CLIENT", "9")
    monkeypatch.setenv("BABL_MAX_BODY_BYTES", "1000")
    limits = Limits.from_env()
    assert (limits.max_queued, limits.max_per_client, limits.max_body_bytes) == (3, 9, 1000)
    monkeypatch.setenv("BABL_MAX_PROMPTS", "0")
    with pytest.raises(ValueError, match="BABL_MAX_PROMPTS"):
        Limits.from_env()


def test_check_request_names_the_limit_and_the_field():
    limits = Limits()
    check_request(limits, prompts=16, n=1, chars=400_000)
    with pytest.raises(RequestTooLarge, match="2,000 prompts") as info:
        check_request(limits, prompts=2000, n=8)
    assert info.value.param == "prompt"
    with pytest.raises(RequestTooLarge, match="18 generations") as info:
        check_request(limits, prompts=3, n=6)
    assert info.value.param == "n"
    with pytest.raises(RequestTooLarge, match="BABL_MAX_REQUEST_CHARS") as info:
        check_request(limits, chars=400_001)
    assert info.value.param == "messages"


def test_body_over_the_limit_is_413_before_it_is_read(app_with):
    http, service = app_with(max_body_bytes=2000)
    big = chat_body(messages=[{"role": "user", "content": "x" * 3000}])
    for path in ("/v1/chat/completions", "/v1/completions", "/api/generate", "/"):
        error = assert_openai_error(http.post(path, json=big), 413, None, "request_too_large")
        assert "BABL_MAX_BODY_BYTES" in error["message"]

    def chunks():  # no Content-Length: the limit holds while the body streams in
        yield b'{"model": "demo-python", "prompt": "'
        for _ in range(10):
            yield b"y" * 500
        yield b'"}'

    response = http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_openai_error(response, 413, None, "request_too_large")
    assert http.post("/v1/chat/completions", json=chat_body()).status_code == 200  # a normal one still works
    assert service.status()["admission"]["held"] == 0


def test_many_prompts_times_n_is_400_before_any_work(app_with):
    http, service = app_with()
    flood = {"model": "demo-python", "prompt": ["x"] * 2000, "n": 8, "max_tokens": 1}
    for stream in (False, True):
        error = assert_openai_error(http.post("/v1/completions", json={**flood, "stream": stream}), 400, "prompt",
                                    "request_too_large")  # fmt: skip
        assert "2,000 prompts" in error["message"]
        too_many = {**flood, "prompt": ["x"] * 3, "n": 6, "stream": stream}
        assert_openai_error(http.post("/v1/completions", json=too_many), 400, "n", "request_too_large")
    assert nothing_started(service)


def test_characters_across_all_messages_are_bounded(app_with):
    http, service = app_with(max_request_chars=1000)
    history = [{"role": "user", "content": "a" * 600}, {"role": "assistant", "content": "b" * 600}]
    body = chat_body(messages=[*history, {"role": "user", "content": "and now?"}])
    for stream in (False, True):
        error = assert_openai_error(http.post("/v1/chat/completions", json={**body, "stream": stream}), 400,
                                    "messages", "request_too_large")  # fmt: skip
        assert "1,208 characters" in error["message"]
    assert nothing_started(service)


# --------------------------------------------------------------------------------------------------
# The queue and the per-client share


def test_admit_bounds_the_queue_and_each_client_share():
    admission = Admission(Limits(max_running=1, max_queued=2, max_per_client=4))
    first = (
        admission.admit("a", 1) + admission.admit("b", 1) + admission.admit("c", 1)
    )  # 1 running, 2 waiting
    with pytest.raises(ServerBusy) as info:
        admission.admit("d", 1)
    assert info.value.code == "queue_full" and info.value.retry_after > 0
    assert "2 answer(s) are waiting" in str(info.value)
    for ticket in first:
        ticket.release()
        ticket.release()  # a second release changes nothing
    assert admission.status()["held"] == 0

    share = Admission(Limits(max_running=16, max_queued=64, max_per_client=4))
    alone = share.admit("x", 6)  # a client with nothing in flight may send one request of up to 16
    with pytest.raises(ServerBusy) as info:
        share.admit("x", 1)
    assert info.value.code == "client_limit" and "at most 4" in str(info.value)
    share.admit("y", 4)  # other clients are not affected
    for ticket in alone:
        ticket.release()
    share.admit("x", 4)
    assert share.refused == {"client_limit": 1}
    share.admit(None, 10)  # a caller in this process (CLI, benchmark): the line applies, no share
    share.admit(None, 10)
    assert share.status()["held"] == 4 + 4 + 20


def test_waiting_generations_run_in_order_and_report_their_place():
    admission = Admission(Limits(max_running=1, max_queued=8))

    async def go():
        running, second, third = (admission.admit(c, 1)[0] for c in ("a", "b", "c"))
        await running.wait()
        places: dict[str, list[int]] = {"b": [], "c": []}
        waiting_b = asyncio.create_task(second.wait(places["b"].append))
        waiting_c = asyncio.create_task(third.wait(places["c"].append))
        await asyncio.sleep(0.05)
        assert places == {"b": [0], "c": [1]} and not waiting_b.done()
        assert admission.status()["waiting"] == 2
        waiting_c.cancel()  # a waiting client goes away: its place is given back
        await asyncio.gather(waiting_c, return_exceptions=True)
        assert admission.status()["held"] == 2
        running.release()
        await asyncio.wait_for(waiting_b, 5)
        assert second.running
        second.release()
        assert admission.status()["held"] == 0

    asyncio.run(go())


def test_a_full_queue_is_429_with_retry_after_and_a_client_share_too(app_with):
    http, service = app_with(max_running=1, max_queued=1, max_per_client=4)
    hold = service.admission.admit("someone-else", 2)  # one running, one waiting: the queue is full
    try:
        for path, body in (
            ("/v1/chat/completions", chat_body()),
            ("/v1/completions", {**chat_body(), "prompt": "x"}),
        ):
            for stream in (False, True):
                response = http.post(path, json={**body, "stream": stream})
                error = assert_openai_error(response, 429, None, "queue_full")
                assert int(response.headers["retry-after"]) > 0 and "BABL_MAX_QUEUED" in error["message"]
        seed_003 = {"prompt": "update on friday", "token_count": 4, "n_gen": 2}
        assert_openai_error(http.post("/", json=seed_003), 429, None, "queue_full")
    finally:
        for ticket in hold:
            ticket.release()
    assert nothing_started(service)

    http, service = app_with(max_per_client=2)
    mine = service.admission.admit("api:testclient", 1)  # TestClient's address
    try:
        response = http.post("/v1/chat/completions", json=chat_body(n=2))
        assert_openai_error(response, 429, None, "client_limit")
        assert http.post("/v1/chat/completions", json=chat_body(n=1)).status_code == 200
    finally:
        mine[0].release()
    assert service.status()["admission"]["held"] == 0


def test_the_chat_says_busy_with_its_place_then_answers(models_dir):
    service = service_with(Limits(max_running=1, max_queued=4))

    async def go():
        blocker = service.admission.admit("user:other", 1)[0]
        await blocker.wait()  # the only running slot is taken
        statuses: list[str] = []
        reply = service.respond(
            ChatSession(model_id="demo-python", settings=GREEDY),
            "hi",
            on_status=statuses.append,
            client="user:me",
        )
        answer = asyncio.create_task(asyncio.wait_for(_collect(reply), 60))
        await asyncio.sleep(0.3)
        assert statuses == ["Busy: you are next"] and not answer.done()
        blocker.release()
        text = await answer
        assert text and reply.stats.finish_reason in ("stop", "length")

    asyncio.run(go())
    assert service.status()["admission"]["held"] == 0


def test_a_full_queue_in_the_chat_is_a_plain_message(models_dir):
    service = service_with(Limits(max_running=1, max_queued=1))
    hold = service.admission.admit("user:other", 2)
    with pytest.raises(ServerBusy) as info:
        service.respond(ChatSession(model_id="demo-python", settings=GREEDY), "hi", client="user:me")
    text = ui.error_text(info.value)
    assert isinstance(info.value, ui.USER_ERRORS)
    assert text.startswith("The server is busy") and "Try again" in text
    for ticket in hold:
        ticket.release()


def test_a_reply_dropped_without_being_read_gives_its_place_back(models_dir):
    service = service_with(Limits())
    reply = service.respond(ChatSession(model_id="demo-python", settings=GREEDY), "hi", client="user:me")
    assert service.admission.status()["held"] == 1
    del reply
    assert service.admission.status()["held"] == 0


async def _collect(reply) -> str:
    return "".join([chunk async for chunk in reply])


# --------------------------------------------------------------------------------------------------
# Lone surrogates and trimming off the event loop


def test_lone_surrogate_is_400_in_the_api_and_a_plain_message_in_the_chat(app_with):
    http, service = app_with()
    headers = {"content-type": "application/json"}
    cases = [
        ("/v1/chat/completions", '{"model": "demo-python", "max_tokens": 4, "messages": [{"role": "user", '
         '"content": "hi \\ud800 there"}]%s}', "messages"),
        ("/v1/chat/completions", '{"model": "demo-python", "max_tokens": 4, "messages": [{"role": "system", '
         '"content": "\\udfff"}, {"role": "user", "content": "hi"}]%s}', "messages"),
        ("/v1/completions", '{"model": "demo-python", "max_tokens": 4, "prompt": "\\ud800"%s}', "prompt"),
        ("/", '{"prompt": "\\ud800 friday", "token_count": 4%s}', "prompt"),
    ]  # fmt: skip
    for path, template, param in cases:
        for stream in ("", ', "stream": true'):
            if path == "/" and stream:
                continue
            response = http.post(path, content=(template % stream).encode(), headers=headers)
            error = assert_openai_error(response, 400, param, "invalid_value")
            assert "\\ud800" in error["message"] or "surrogate" in error["message"]
    stop = '{"model": "demo-python", "max_tokens": 4, "prompt": "x", "stop": ["\\ud800"]}'
    response = http.post("/v1/completions", content=stop.encode(), headers=headers)
    assert response.status_code == 422 and response.json()["error"]["param"] == "stop"
    assert http.post("/v1/chat/completions", json=chat_body()).status_code == 200

    with pytest.raises(BadMessage) as info:
        service.respond(ChatSession(model_id="demo-python"), "bad \ud800 text")
    assert ui.error_text(info.value).startswith("The message contains an invalid character")


def test_the_prompt_is_rendered_off_the_event_loop(models_dir, monkeypatch):
    from babl_core.engine import service as chat

    service = service_with(Limits())
    threads: list[int] = []
    original = chat.render_prompt

    def spy(*args, **kwargs):
        threads.append(threading.get_ident())
        return original(*args, **kwargs)

    monkeypatch.setattr(chat, "render_prompt", spy)

    async def go() -> int:
        await _collect(service.respond(ChatSession(model_id="demo-python", settings=GREEDY), "hi"))
        return threading.get_ident()

    loop_thread = asyncio.run(go())
    assert threads and loop_thread not in threads


def test_status_shows_the_queue(app_with):
    http, _ = app_with(max_queued=7)
    data = http.get("/v1/status").json()["admission"]
    assert data["limits"]["max_queued"] == 7 and data["waiting"] == 0
    assert json.dumps(data)  # plain JSON
