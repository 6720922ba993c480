"""babl_core.web.page_policy on a small FastAPI app shaped like Chainlit's (GZip inside, an HTML index with
inline scripts and links to other origins, JSON and streamed routes). The browser side is in
test_app_remote_browser.py and test_preview_browser.py."""

from __future__ import annotations

import base64
import hashlib

from fastapi import FastAPI
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.responses import HTMLResponse, StreamingResponse
from fastapi.testclient import TestClient

from babl_core.web import page_policy

INDEX = (
    """<!doctype html><html><head>
<link rel="preconnect" href="https://fonts.googleapis.com" />
<link
  href="https://fonts.googleapis.com/css2?family=Inter&display=swap"
  rel="stylesheet"
/>
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/katex/dist/katex.min.css" />
<script>
undefined
</script>
<script>const global = globalThis;</script>
<script type="module" crossorigin src="/assets/index.js"></script>
<link rel="stylesheet" crossorigin href="/assets/index.css">
</head><body><div id="root"></div>"""
    + "<!-- padding so GZip compresses -->" * 40
    + "</body></html>"
)


def sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def client(monkeypatch, scripts: bool = False) -> TestClient:
    monkeypatch.setenv("BABL_PREVIEW_SCRIPTS", "1" if scripts else "0")
    app = FastAPI()
    app.add_middleware(GZipMiddleware)

    @app.get("/")
    async def index() -> HTMLResponse:
        return HTMLResponse(INDEX)

    @app.get("/json")
    async def json_route() -> dict:
        return {"ok": True}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks():
            for i in range(3):
                yield f"data: {i}\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    page_policy.install(app)
    page_policy.install(app)  # a second call adds nothing
    return TestClient(app)


def test_the_index_page_gets_the_policy_and_loses_its_links_to_other_origins(monkeypatch):
    response = client(monkeypatch).get("/", headers={"Accept-Encoding": "gzip"})
    assert response.status_code == 200
    policy = response.headers["content-security-policy"]
    directives = dict(d.split(" ", 1) for d in policy.split("; "))
    assert directives["default-src"] == "'self'"
    assert directives["img-src"] == "'self' data: blob:"
    assert directives["connect-src"] == "'self'" and directives["object-src"] == "'none'"
    # The two inline scripts by hash, no 'unsafe-inline'; react-runner needs eval.
    assert (
        directives["script-src"]
        == f"'self' 'unsafe-eval' {sha256(chr(10) + 'undefined' + chr(10))} {sha256('const global = globalThis;')}"
    )
    body = response.text
    assert "googleapis" not in body and "jsdelivr" not in body
    assert '<script type="module" crossorigin src="/assets/index.js"></script>' in body
    assert response.headers["content-length"] == str(len(response.content))
    assert "content-encoding" not in response.headers


def test_with_preview_scripts_the_page_allows_inline_scripts_for_the_previews(monkeypatch):
    policy = client(monkeypatch, scripts=True).get("/").headers["content-security-policy"]
    assert "script-src 'self' 'unsafe-eval' 'unsafe-inline';" in policy
    assert "sha256" not in policy  # a hash would make browsers ignore 'unsafe-inline'


def test_other_responses_pass_through_untouched(monkeypatch):
    app = client(monkeypatch)
    assert "content-security-policy" not in app.get("/json").headers
    with app.stream("GET", "/stream") as response:
        assert "content-security-policy" not in response.headers
        assert "".join(response.iter_text()) == "data: 0\n\ndata: 1\n\ndata: 2\n\n"
