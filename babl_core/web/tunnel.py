"""Share the running app on a public ngrok URL (pyngrok), only when it is safe to.

`open_tunnel(port)` never raises and never blocks longer than its timeout: it returns a
`TunnelResult` with the public URL, or one line saying why there is none, and the app keeps serving
locally either way. `close_tunnel()` closes the tunnel and stops ngrok; call it from the app's
shutdown hook, because Chainlit ends with `os._exit`, which skips the `atexit` hook registered here.

Settings:
- `BABL_TUNNEL=1`: open a tunnel (otherwise `open_tunnel` does nothing).
- `NGROK_AUTHTOKEN`: the only source of the token. ngrok reads it from the environment it inherits;
  it is never put on ngrok's command line (visible in `ps`), never written to a file, and masked in
  every log record of pyngrok and this module, and in our error lines.
- `BABL_AUTH` and `BABL_API_KEY` must both be set, unless `BABL_ALLOW_ANONYMOUS_TUNNEL=1`: without
  them a public URL would give anyone the local user's chats and an open API.
- `BABL_NGROK_PATH`: an installed ngrok executable (relative paths from the repo root). Unset,
  pyngrok's own location is used (`PYNGROK_NGROK_PATH`, else its per-user directory) and ngrok is
  downloaded there on first use.
The ngrok config file is `data/ngrok.yml` (written by pyngrok), so a token in the user's own
`~/.config/ngrok/ngrok.yml` is never picked up.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from babl_core import settings

log = logging.getLogger(__name__)

TOKEN_ENV = "NGROK_AUTHTOKEN"
NGROK_CONFIG_NAME = "ngrok.yml"
TOKEN_HELP = "https://dashboard.ngrok.com/get-started/your-authtoken"
LOCAL_ONLY = "the app keeps running locally"
# After a start times out and ngrok is killed, how long pyngrok's start thread gets to notice.
_KILL_GRACE_S = 5.0
_MASK_TEXT = "********"


@dataclass(frozen=True)
class TunnelResult:
    """What `open_tunnel` did.

    Attributes:
        url: The public URL when a tunnel is open.
        error: One line saying why no tunnel was opened (BABL_TUNNEL was set); None otherwise.
        warning: Set when the tunnel is open without login/API key (BABL_ALLOW_ANONYMOUS_TUNNEL=1).
    Both `url` and `error` are None when BABL_TUNNEL is not set.
    """

    url: str | None = None
    error: str | None = None
    warning: str | None = None

    @property
    def opened(self) -> bool:
        return self.url is not None


class SecretMaskFilter(logging.Filter):
    """Replaces registered secrets in a log record's message and traceback text.

    A defence in depth: pyngrok does not log the token itself, but it logs every line ngrok prints,
    and ngrok echoes a rejected authtoken in its error (ERR_NGROK_105).
    """

    def __init__(self) -> None:
        super().__init__()
        self._secrets: set[str] = set()

    def add(self, secret: str) -> None:
        """Mask `secret` from now on (very short strings are ignored: they would mask ordinary text)."""
        if len(secret) >= 6:
            self._secrets.add(secret)

    def mask(self, text: str) -> str:
        """`text` with every registered secret replaced."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, _MASK_TEXT)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secrets:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a malformed logging call: let the handler report it as usual
            return True
        masked = self.mask(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            # Formatters reuse exc_text when it is set, so masking it here covers the traceback.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.mask(record.exc_text)
        if record.stack_info:
            record.stack_info = self.mask(record.stack_info)
        return True


_MASK = SecretMaskFilter()
_PYNGROK_LOGGERS = (
    "pyngrok",
    "pyngrok.ngrok",
    "pyngrok.process",
    "pyngrok.process.ngrok",
    "pyngrok.installer",
    "pyngrok.conf",
    "pyngrok.agent",
)


def _install_mask(token: str) -> None:
    """Mask `token` in pyngrok's and our records, and in whatever reaches the root handlers.

    A logger's filters only see records logged on that very logger, hence the list of names.
    """
    _MASK.add(token)
    names = set(_PYNGROK_LOGGERS) | {__name__}
    names |= {name for name in list(logging.root.manager.loggerDict) if name.startswith("pyngrok.")}
    for target in [logging.getLogger(name) for name in names] + list(logging.getLogger().handlers):
        if _MASK not in target.filters:
            target.addFilter(_MASK)
    # ngrok logs a line per request at INFO, which pyngrok forwards; keep warnings and errors only,
    # unless the user configured pyngrok's level themselves.
    pyngrok_logger = logging.getLogger("pyngrok")
    if pyngrok_logger.level == logging.NOTSET:
        pyngrok_logger.setLevel(logging.WARNING)


def _error_line(text: str) -> str:
    """One masked line: ngrok's multi-line messages (with literal `\\n`s) collapsed."""
    text = _MASK.mask(text.replace("\\n", " "))
    return re.sub(r"\s+", " ", text).strip()


def tunnel_refusal() -> str | None:
    """Why BABL_TUNNEL may not open a tunnel with the current settings, or None when it may."""
    if settings.env_flag("BABL_ALLOW_ANONYMOUS_TUNNEL"):
        return None
    missing = [name for name in ("BABL_AUTH", "BABL_API_KEY") if not os.environ.get(name, "").strip()]
    if not missing:
        return None
    verb = "is" if len(missing) == 1 else "are"
    return (
        "Tunnel not opened: a public URL needs both BABL_AUTH (login) and BABL_API_KEY (API key), and "
        f"{' and '.join(missing)} {verb} not set. Set both, or set BABL_ALLOW_ANONYMOUS_TUNNEL=1 to open "
        f"it without them; {LOCAL_ONLY}."
    )


def _configured_ngrok_path() -> str | None:
    value = os.environ.get("BABL_NGROK_PATH", "").strip()
    return str(settings.resolve_path(value)) if value else None


@dataclass
class _OpenTunnel:
    config: Any  # pyngrok.conf.PyngrokConfig (pyngrok is imported lazily)
    url: str
    port: int


_state_lock = threading.Lock()
_active: _OpenTunnel | None = None
_atexit_registered = False


def open_tunnel(port: int, *, timeout_s: float = 15) -> TunnelResult:
    """Open an ngrok tunnel to `http://127.0.0.1:<port>` when BABL_TUNNEL asks for one.

    Args:
        port: The local port the app listens on.
        timeout_s: How long ngrok may take to start and open the tunnel. A binary that never says
            it is ready is killed after this (pyngrok's own start-up wait can block forever).

    Returns:
        The public URL, or one line explaining why there is none. Never raises for ngrok problems.
    """
    global _active, _atexit_registered
    if not settings.env_flag("BABL_TUNNEL"):
        return TunnelResult()
    refusal = tunnel_refusal()
    if refusal:
        return TunnelResult(error=refusal)
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        return TunnelResult(
            error=f"Tunnel not opened: set {TOKEN_ENV} to your ngrok authtoken ({TOKEN_HELP}); {LOCAL_ONLY}."
        )
    _install_mask(token)
    warning = None
    if not (os.environ.get("BABL_AUTH", "").strip() and os.environ.get("BABL_API_KEY", "").strip()):
        warning = (
            "The tunnel is open without a login or API key because BABL_ALLOW_ANONYMOUS_TUNNEL=1: "
            "anyone with the URL uses the app and its API."
        )

    with _state_lock:
        if _active is not None:
            if _active.port == port:
                return TunnelResult(url=_active.url, warning=warning)
            _close_locked()
        try:
            url, config = _start(port, timeout_s)
        except _TunnelFailure as failure:
            return TunnelResult(error=_error_line(f"Tunnel not opened: {failure}; {LOCAL_ONLY}."))
        _active = _OpenTunnel(config, url, port)
        if not _atexit_registered:
            atexit.register(close_tunnel)
            _atexit_registered = True
    if warning:
        log.warning(warning)
    return TunnelResult(url=url, warning=warning)


class _TunnelFailure(Exception):
    """Carries the one line `open_tunnel` reports."""


def _start(port: int, timeout_s: float) -> tuple[str, Any]:
    """Install (when missing) and start ngrok, then open the tunnel: (public url, pyngrok config).

    Raises:
        _TunnelFailure: With the line to report; ngrok is not left running.
    """
    from pyngrok import conf, ngrok
    from pyngrok.exception import PyngrokError, PyngrokNgrokInstallError

    path = _configured_ngrok_path()
    if path is not None and not Path(path).is_file():
        raise _TunnelFailure(
            f"BABL_NGROK_PATH={path} does not exist; point it at the ngrok executable, or unset it to let "
            "pyngrok download ngrok"
        )
    if path is not None and not os.access(path, os.X_OK):
        raise _TunnelFailure(f"BABL_NGROK_PATH={path} is not executable; run `chmod +x {path}`")

    config = conf.PyngrokConfig(
        ngrok_path=path,
        config_path=str(settings.data_dir() / NGROK_CONFIG_NAME),
        startup_timeout=max(1, math.ceil(timeout_s)),
        request_timeout=min(4.0, timeout_s),
        # The monitor thread keeps reading ngrok's output; without it the pipe fills and ngrok blocks.
        monitor_thread=True,
    )
    # PyngrokConfig copies NGROK_AUTHTOKEN into auth_token, which pyngrok then passes as
    # `--authtoken TOKEN`: readable by every local user in `ps`. ngrok reads the same variable from
    # the environment it inherits, so keep it off the command line.
    config.auth_token = None
    where = config.ngrok_path

    try:
        # Downloads ngrok when missing (bounded by pyngrok's socket timeouts; offline it fails at
        # once) and writes data/ngrok.yml. Done here, outside the start timeout, so a slow but
        # working download is not cut short and cannot start ngrok after we gave up.
        ngrok.install_ngrok(config)
    except PyngrokNgrokInstallError as exc:
        raise _TunnelFailure(
            f"ngrok is not installed at {where} and could not be downloaded ({exc}); install ngrok and "
            "set BABL_NGROK_PATH=/path/to/ngrok"
        ) from None
    except (PyngrokError, OSError) as exc:
        raise _TunnelFailure(f"could not prepare ngrok at {where} ({exc})") from None

    outcome: dict[str, Any] = {}
    cancelled = threading.Event()

    def connect() -> None:
        try:
            # An explicit upstream on IPv4 loopback (the app binds 127.0.0.1; "localhost" may be ::1),
            # and our own name: pyngrok's default name embeds the address, slashes and all.
            tunnel = ngrok.connect(
                addr=f"http://127.0.0.1:{port}", proto="http", name=f"babl-{port}", pyngrok_config=config
            )
        except Exception as exc:  # handed to the calling thread, which reports it
            outcome["error"] = exc
            ngrok.kill(config)  # the process may be up even though the tunnel failed
            return
        if cancelled.is_set():  # we gave up while it was finishing: do not leave it running
            ngrok.kill(config)
            return
        outcome["url"] = tunnel.public_url

    # pyngrok waits for ngrok's start-up lines with a blocking readline(): a binary that prints
    # nothing blocks it forever. Run it in a daemon thread and kill the process on our deadline.
    worker = threading.Thread(target=connect, name="babl-ngrok-start", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        cancelled.set()
        _kill_starting_process(config)
        worker.join(_KILL_GRACE_S)
        if worker.is_alive():
            log.warning("pyngrok's start thread still runs after ngrok was killed; it is a daemon thread")
        else:
            ngrok.kill(config)  # clears pyngrok's bookkeeping; its lock is free now
        raise _TunnelFailure(
            f"ngrok at {where} did not report a running tunnel within {timeout_s:g} s and was stopped; "
            "check that it is ngrok v3 and that this machine can reach ngrok.com"
        )
    if "error" in outcome:
        raise _TunnelFailure(_describe_failure(outcome["error"], where))
    return outcome["url"], config


def _kill_starting_process(config: Any) -> None:
    """Kill the ngrok process pyngrok is still starting.

    `ngrok.kill()` cannot be used here: it takes the lock that the blocked start holds. pyngrok
    9.1 records the process in `process._current_processes` before it starts waiting, so kill
    it from there; its start loop then sees end-of-file and gives up on its own.
    """
    from pyngrok import process

    starting = process._current_processes.get(config.ngrok_path)
    if starting is None:
        return
    proc = starting.proc
    if proc.poll() is None:
        log.info("Killing ngrok (pid %s): it did not finish starting in time", proc.pid)
        proc.kill()
    try:
        proc.wait(timeout=_KILL_GRACE_S)
    except Exception as exc:  # TimeoutExpired: reported, not fatal to the app
        log.warning("ngrok (pid %s) did not exit after SIGKILL: %s", proc.pid, exc)


def _describe_failure(exc: BaseException, where: str) -> str:
    from pyngrok.exception import PyngrokError, PyngrokNgrokError, PyngrokNgrokHTTPError, PyngrokNgrokURLError

    if isinstance(exc, PyngrokNgrokHTTPError | PyngrokNgrokURLError):
        detail = f"ngrok started but its local API did not open the tunnel ({exc})"
    elif isinstance(exc, PyngrokNgrokError):
        ngrok_error = getattr(exc, "ngrok_error", None)
        if ngrok_error:
            detail = f"ngrok could not start: {ngrok_error}"
        else:
            detail = f"ngrok at {where} exited before reporting a running tunnel ({exc}); check that it is ngrok v3"
    elif isinstance(exc, PyngrokError):
        detail = f"ngrok failed: {exc}"
    elif isinstance(exc, OSError):
        detail = f"could not run ngrok at {where}: {exc}"
    else:
        log.warning("Unexpected error while opening the ngrok tunnel", exc_info=exc)
        detail = f"unexpected {type(exc).__name__} while opening the tunnel: {exc}"
    return detail


def tunnel_url() -> str | None:
    """The public URL of the open tunnel, or None."""
    active = _active
    return active.url if active else None


def close_tunnel() -> None:
    """Close the tunnel and stop ngrok. Safe to call when none is open, and more than once."""
    with _state_lock:
        _close_locked()


def _close_locked() -> None:
    global _active
    if _active is None:
        return
    from pyngrok import ngrok
    from pyngrok.exception import PyngrokError

    active, _active = _active, None
    try:
        ngrok.disconnect(active.url, pyngrok_config=active.config)
    except PyngrokError as exc:
        log.warning(
            "Could not close the ngrok tunnel %s cleanly (%s); stopping ngrok anyway", active.url, exc
        )
    finally:
        ngrok.kill(active.config)
