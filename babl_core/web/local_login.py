"""Local-user mode (no `BABL_AUTH` on a loopback host): the app's pages carry the login cookie.

Chainlit's web app asks `GET /user` first; without its cookie that is a 401, and the app then reloads
itself at `/login`, logs in through the header callback and goes to `/`: a chat's URL
(`/thread/<id>`) opened in a fresh browser showed an empty new chat instead of that chat. Here every
visitor is the one local user anyway, so an HTML page requested without a valid session cookie is
answered with the cookie Chainlit's `/auth/header` would have set (same token, same cookie settings):
`/user` then answers at once and the chat's URL opens that chat. With `BABL_AUTH` (passwords) nothing
changes: the login page comes first.
"""

from __future__ import annotations

from collections.abc import Callable

from chainlit.auth import create_jwt, get_token_from_cookies, set_auth_cookie
from chainlit.auth.jwt import decode_jwt
from chainlit.user import User
from starlette.requests import Request
from starlette.responses import Response


def _has_valid_session(request: Request) -> bool:
    token = get_token_from_cookies(dict(request.cookies))
    if not token:
        return False
    try:
        decode_jwt(token)
    except Exception:  # expired, signed with another secret, malformed
        return False
    return True


class LocalUserCookieMiddleware:
    """Pure ASGI: adds the session cookie to HTML responses of GET requests that have none."""

    def __init__(self, app, user: Callable[[], User]) -> None:
        self.app = app
        self.user = user

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if _has_valid_session(request):
            await self.app(scope, receive, send)
            return

        async def send_with_cookie(message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                content_type = dict(headers).get(b"content-type", b"").lower()
                if content_type.startswith(b"text/html"):
                    carrier = Response()
                    set_auth_cookie(request, carrier, create_jwt(self.user()))
                    headers += [(k, v) for k, v in carrier.raw_headers if k == b"set-cookie"]
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_cookie)


def install(app, user: Callable[[], User]) -> None:
    """Add the middleware to Chainlit's FastAPI app (local-user mode only); once per app."""
    if getattr(app.state, "babl_local_login", False):
        return
    app.add_middleware(LocalUserCookieMiddleware, user=user)
    app.state.babl_local_login = True
