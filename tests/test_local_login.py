"""babl_core.web.local_login on a small FastAPI app: in local-user mode an HTML page requested without a
valid session cookie comes with one (a chat's URL then opens in a fresh browser); other responses,
and requests that already carry a valid cookie, are left alone. The browser flow is in
test_app_remote_browser.py."""

from __future__ import annotations

from chainlit.auth import create_jwt
from chainlit.auth.jwt import decode_jwt
from chainlit.user import User
from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.testclient import TestClient

from babl_core.web import local_login


def client(monkeypatch) -> TestClient:
    monkeypatch.setenv("CHAINLIT_AUTH_SECRET", "a-test-secret-of-enough-length-for-hs256-signing")
    app = FastAPI()

    @app.get("/thread/{thread_id}")
    async def page(thread_id: str) -> HTMLResponse:
        return HTMLResponse("<!doctype html><div id=root></div>")

    @app.get("/user")
    async def user() -> dict:
        return {"identifier": "nobody"}

    local_login.install(app, lambda: User(identifier="local", metadata={"login": "local-user"}))
    local_login.install(app, lambda: User(identifier="someone else"))  # a second call adds nothing
    return TestClient(app)


def test_a_page_without_a_session_gets_the_local_users_cookie(monkeypatch):
    app = client(monkeypatch)
    response = app.get("/thread/abc")
    assert response.status_code == 200
    token = response.cookies.get("access_token")
    assert token and decode_jwt(token).identifier == "local"
    assert "httponly" in response.headers["set-cookie"].lower()


def test_a_valid_session_and_other_responses_are_left_alone(monkeypatch):
    app = client(monkeypatch)
    assert "set-cookie" not in app.get("/user").headers
    valid = create_jwt(User(identifier="local"))
    assert "set-cookie" not in app.get("/thread/abc", cookies={"access_token": valid}).headers
    refreshed = app.get("/thread/abc", cookies={"access_token": "forged"})
    assert decode_jwt(refreshed.cookies["access_token"]).identifier == "local"
