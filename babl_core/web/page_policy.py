"""The app page's Content-Security-Policy: the chat page loads nothing from another origin.

Answers are Markdown rendered on the app's page; an image in one would be fetched from wherever its
URL points, carrying whatever the URL holds (a model, or a prompt injection in a pasted document,
could put the conversation there). `render.images_as_links` turns answer images into links; this
policy is the wall behind it, for anything rendered on the page (user messages too): images, fonts,
styles, scripts, frames and connections only from the app's own origin, images also as `data:` and
`blob:` URLs.

What the page itself needs, and why each source is there:
- `script-src 'self' 'unsafe-eval'` plus the hash of each inline `<script>` of Chainlit's index page:
  Chainlit runs custom elements (`public/elements/HtmlPreview.jsx`) with react-runner, which
  compiles them in the browser and evaluates the result.
- `style-src 'self' 'unsafe-inline'`: React and the preview's generated pages use inline styles.
- HTML previews are `srcdoc` frames, which inherit this policy on top of their own
  (`render.content_security_policy`): with `BABL_PREVIEW_SCRIPTS=1` the page also allows inline
  scripts (`'unsafe-inline'`), or the previews' scripts could not run. The app page itself never
  holds model-written HTML (Chainlit's `unsafe_allow_html` stays false).

Chainlit's index page links Google Fonts and a KaTeX stylesheet on a CDN (another origin, fetched
by every visit; LaTeX is off here): those links are removed from the page, which then uses the
system font.

`install(app)` adds a small ASGI middleware to Chainlit's FastAPI app; it rewrites only HTML
responses (the index page, a few KB, sent uncompressed) and leaves every other response, streams
included, untouched.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import re
from collections.abc import Sequence

from babl_core.web.render import scripts_enabled

HEADER = "Content-Security-Policy"

# Chainlit 2.12's index.html: the font and KaTeX links (with their preconnects) to other origins.
_EXTERNAL_LINK = re.compile(r"<link\b[^>]*\bhref=\"https?://[^\"]*\"[^>]*/?>", re.IGNORECASE | re.DOTALL)
_INLINE_SCRIPT = re.compile(r"<script\b(?![^>]*\bsrc=)[^>]*>(.*?)</script\s*>", re.IGNORECASE | re.DOTALL)


def script_hashes(html: str) -> list[str]:
    """CSP sources (`'sha256-…'`) for the inline scripts of `html`, in order."""
    return [
        "'sha256-" + base64.b64encode(hashlib.sha256(body.encode("utf-8")).digest()).decode("ascii") + "'"
        for body in _INLINE_SCRIPT.findall(html)
    ]


def policy(*, inline_script_hashes: Sequence[str] = (), preview_scripts: bool | None = None) -> str:
    """The app page's policy.

    Args:
        inline_script_hashes: `script_hashes` of the page (Chainlit's index has two inline scripts).
        preview_scripts: previews run inline scripts (`'unsafe-inline'`; hashes are then left out,
            since a browser ignores 'unsafe-inline' when a hash is present); None reads
            `BABL_PREVIEW_SCRIPTS`.
    """
    scripts = scripts_enabled() if preview_scripts is None else preview_scripts
    script_src = ["'self'", "'unsafe-eval'"]
    script_src += ["'unsafe-inline'"] if scripts else list(inline_script_hashes)
    directives = [
        "default-src 'self'",
        f"script-src {' '.join(script_src)}",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data: blob:",
        "font-src 'self' data:",
        "media-src 'self' data: blob:",
        "connect-src 'self'",
        "frame-src 'self'",
        "worker-src 'self' blob:",
        "object-src 'none'",
        "base-uri 'self'",
        "form-action 'self'",
        "frame-ancestors 'self'",
    ]
    return "; ".join(directives)


def secure_page(html: str) -> tuple[str, str]:
    """Chainlit's index page without its links to other origins, and the policy for it."""
    cleaned = _EXTERNAL_LINK.sub("", html)
    return cleaned, policy(inline_script_hashes=script_hashes(cleaned))


class PagePolicyMiddleware:
    """Pure ASGI (no buffering of streamed API answers): HTML responses get `secure_page`."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start: dict | None = None
        chunks: list[bytes] = []

        async def send_secured(message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers") or [])
                content_type = headers.get(b"content-type", b"").lower()
                if content_type.startswith(b"text/html") and HEADER.lower().encode() not in headers:
                    start = message  # held until the body is complete
                    return
                await send(message)
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            raw = b"".join(chunks)
            if dict(start.get("headers") or []).get(b"content-encoding", b"").lower() == b"gzip":
                raw = gzip.decompress(raw)  # Chainlit's GZip middleware runs inside this one
            page, csp = secure_page(raw.decode("utf-8", errors="replace"))
            body = page.encode("utf-8")
            dropped = (b"content-length", b"content-encoding", HEADER.lower().encode())
            headers = [
                (name, value) for name, value in start.get("headers") or [] if name.lower() not in dropped
            ]
            headers += [(b"content-length", str(len(body)).encode()), (HEADER.lower().encode(), csp.encode())]
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})

        await self.app(scope, receive, send_secured)


def install(app) -> None:
    """Add the policy to Chainlit's FastAPI app (call at import, before it serves); once per app."""
    if getattr(app.state, "babl_page_policy", False):
        return
    app.add_middleware(PagePolicyMiddleware)
    app.state.babl_page_policy = True
