"""The ngrok tunnel (babl_core.web.tunnel) against a stand-in ngrok agent (tests/assets/fake_ngrok.py).

No test reaches the network: the stand-in serves pyngrok's agent API on 127.0.0.1, and the download
tests point pyngrok at a closed local proxy or a patched installer.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from pyngrok import installer, process
from pyngrok.exception import PyngrokNgrokInstallError

from babl_core.web import tunnel
from tests.servers import free_port

FAKE_NGROK = Path(__file__).parent / "assets" / "fake_ngrok.py"
TOKEN = "2babl_FAKE_ngrok_TOKEN_5c1e9d7b"  # recognisable wherever it might leak
PUBLIC_URL = "https://babl-test.ngrok.example"
PORT = 8123


def pid_alive(pid: int) -> bool:
    """Whether the process exists; an exited but unreaped (zombie) child still counts."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(autouse=True)
def tunnel_env(monkeypatch, tmp_path):
    for name in (
        "BABL_TUNNEL",
        "BABL_AUTH",
        "BABL_API_KEY",
        "BABL_ALLOW_ANONYMOUS_TUNNEL",
        "NGROK_AUTHTOKEN",
        "BABL_NGROK_PATH",
        "PYNGROK_NGROK_PATH",
        "FAKE_NGROK_MODE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BABL_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("BABL_TUNNEL", "1")
    monkeypatch.setenv("BABL_AUTH", "alice:pw")
    monkeypatch.setenv("BABL_API_KEY", "api-key")
    monkeypatch.setenv("NGROK_AUTHTOKEN", TOKEN)
    yield
    tunnel.close_tunnel()
    assert not process._current_processes, "a test left pyngrok tracking an ngrok process"


@pytest.fixture
def fake_ngrok(monkeypatch, tmp_path) -> Path:
    """The stand-in as an executable named `ngrok`, run by this venv's Python; returns its state dir."""
    binary = tmp_path / "bin" / "ngrok"
    binary.parent.mkdir()
    source = FAKE_NGROK.read_text().split("\n", 1)[1]
    binary.write_text(f"#!{sys.executable}\n{source}")
    binary.chmod(0o755)
    state = tmp_path / "state"
    state.mkdir()
    monkeypatch.setenv("BABL_NGROK_PATH", str(binary))
    monkeypatch.setenv("FAKE_NGROK_STATE_DIR", str(state))
    return state


def events(state: Path) -> list[dict]:
    path = state / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_nothing_happens_without_babl_tunnel(monkeypatch, fake_ngrok):
    monkeypatch.delenv("BABL_TUNNEL")
    result = tunnel.open_tunnel(PORT)
    assert result == tunnel.TunnelResult()
    assert not result.opened
    assert not (fake_ngrok / "pid").exists()


def test_opens_a_tunnel_with_the_token_only_in_the_environment(fake_ngrok, tmp_path):
    result = tunnel.open_tunnel(PORT, timeout_s=10)
    assert result.error is None, result.error
    assert result.url == PUBLIC_URL
    assert result.opened and result.warning is None
    assert tunnel.tunnel_url() == PUBLIC_URL
    # The tunnel forwards to the app on IPv4 loopback.
    assert events(fake_ngrok) == [
        {"event": "open", "name": f"babl-{PORT}", "upstream": {"url": f"http://127.0.0.1:{PORT}"}}
    ]
    # The token reached ngrok through its environment, not its command line (visible in `ps`).
    argv = json.loads((fake_ngrok / "argv.json").read_text())
    assert (fake_ngrok / "env_token").read_text() == "yes"
    assert TOKEN not in " ".join(argv) and "--authtoken" not in argv
    # Our own ngrok config, never the user's ~/.config/ngrok/ngrok.yml.
    assert argv[argv.index("--config") + 1] == str(tmp_path / "data" / "ngrok.yml")
    assert TOKEN not in (tmp_path / "data" / "ngrok.yml").read_text()
    # A second call for the same port reuses the tunnel instead of starting another ngrok.
    pid = (fake_ngrok / "pid").read_text()
    assert tunnel.open_tunnel(PORT).url == PUBLIC_URL
    assert (fake_ngrok / "pid").read_text() == pid


def test_close_disconnects_and_kills_ngrok(fake_ngrok):
    assert tunnel.open_tunnel(PORT, timeout_s=10).url == PUBLIC_URL
    pid = int((fake_ngrok / "pid").read_text())
    assert pid_alive(pid)
    tunnel.close_tunnel()
    assert [e["event"] for e in events(fake_ngrok)] == ["open", "close"]
    assert not pid_alive(pid)
    assert tunnel.tunnel_url() is None
    assert not process._current_processes
    tunnel.close_tunnel()  # idempotent


@pytest.mark.parametrize(
    ("unset", "named"),
    [
        (["BABL_AUTH"], "BABL_AUTH is not set"),
        (["BABL_API_KEY"], "BABL_API_KEY is not set"),
        (["BABL_AUTH", "BABL_API_KEY"], "BABL_AUTH and BABL_API_KEY are not set"),
    ],
)
def test_refuses_without_login_and_api_key(monkeypatch, fake_ngrok, unset, named):
    for name in unset:
        monkeypatch.delenv(name)
    result = tunnel.open_tunnel(PORT)
    assert result.url is None
    assert named in result.error
    assert "BABL_ALLOW_ANONYMOUS_TUNNEL=1" in result.error
    assert not (fake_ngrok / "pid").exists()  # ngrok was never started


def test_anonymous_tunnel_opens_with_a_warning(monkeypatch, fake_ngrok, caplog):
    monkeypatch.delenv("BABL_AUTH")
    monkeypatch.delenv("BABL_API_KEY")
    monkeypatch.setenv("BABL_ALLOW_ANONYMOUS_TUNNEL", "1")
    with caplog.at_level(logging.WARNING, logger="babl_core.web.tunnel"):
        result = tunnel.open_tunnel(PORT, timeout_s=10)
    assert result.url == PUBLIC_URL
    assert "BABL_ALLOW_ANONYMOUS_TUNNEL=1" in result.warning
    assert "BABL_ALLOW_ANONYMOUS_TUNNEL=1" in caplog.text


def test_missing_token_is_named(monkeypatch, fake_ngrok):
    monkeypatch.delenv("NGROK_AUTHTOKEN")
    result = tunnel.open_tunnel(PORT)
    assert "NGROK_AUTHTOKEN" in result.error and result.url is None
    assert not (fake_ngrok / "pid").exists()


def test_nonexistent_babl_ngrok_path_is_a_clean_error(monkeypatch, tmp_path):
    missing = tmp_path / "no" / "ngrok"
    monkeypatch.setenv("BABL_NGROK_PATH", str(missing))
    result = tunnel.open_tunnel(PORT)
    assert result.url is None
    assert f"BABL_NGROK_PATH={missing} does not exist" in result.error
    assert "\n" not in result.error
    assert not missing.exists()  # an explicit path is never downloaded to


def test_non_executable_babl_ngrok_path_is_a_clean_error(monkeypatch, tmp_path):
    path = tmp_path / "ngrok"
    path.write_text("not a program")
    monkeypatch.setenv("BABL_NGROK_PATH", str(path))
    assert "chmod +x" in tunnel.open_tunnel(PORT).error


def test_failed_download_is_one_clean_line(monkeypatch, tmp_path):
    """pyngrok's real installer, pointed at a missing binary, fails to download (a closed proxy
    stands in for being offline) with PyngrokNgrokInstallError."""
    missing = tmp_path / "pyngrok-home" / "ngrok"
    monkeypatch.setenv("PYNGROK_NGROK_PATH", str(missing))
    # urlopen's shared opener reads proxy variables once, when first built, so install one
    # explicitly: every download request goes to a closed local port, with or without network.
    proxy = f"http://127.0.0.1:{free_port()}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"https": proxy, "http": proxy}))
    monkeypatch.setattr(urllib.request, "_opener", opener)
    started = time.monotonic()
    result = tunnel.open_tunnel(PORT, timeout_s=5)
    assert time.monotonic() - started < 5
    assert result.url is None
    assert "could not be downloaded" in result.error
    assert "Connection refused" in result.error  # it went through our closed proxy, not the network
    assert "BABL_NGROK_PATH=/path/to/ngrok" in result.error
    assert "\n" not in result.error
    assert not missing.exists()


def test_installer_error_is_one_clean_line(monkeypatch, tmp_path):
    missing = tmp_path / "pyngrok-home" / "ngrok"
    monkeypatch.setenv("PYNGROK_NGROK_PATH", str(missing))
    calls = []

    def offline_installer(ngrok_path, ngrok_version="3", **kwargs):
        calls.append(ngrok_path)
        raise PyngrokNgrokInstallError(
            "An error occurred while downloading ngrok from https://bin.example/ngrok.tgz: "
            "<urlopen error [Errno -3] Temporary failure in name resolution>"
        )

    monkeypatch.setattr(installer, "install_ngrok", offline_installer)
    result = tunnel.open_tunnel(PORT)
    assert calls == [str(missing)]
    assert result.url is None
    assert "could not be downloaded" in result.error and "name resolution" in result.error
    assert "\n" not in result.error


def test_silent_binary_times_out_and_is_killed(monkeypatch, fake_ngrok):
    monkeypatch.setenv("FAKE_NGROK_MODE", "silent")
    started = time.monotonic()
    result = tunnel.open_tunnel(PORT, timeout_s=1)
    elapsed = time.monotonic() - started
    assert result.url is None
    assert "within 1 s" in result.error
    assert elapsed < 1 + 4, f"open_tunnel took {elapsed:.1f} s"
    pid = int((fake_ngrok / "pid").read_text())
    assert not pid_alive(pid)
    assert not process._current_processes


def test_binary_that_exits_at_once_is_reported(monkeypatch):
    monkeypatch.setenv("BABL_NGROK_PATH", shutil.which("true"))
    result = tunnel.open_tunnel(PORT, timeout_s=5)
    assert result.url is None
    assert "exited before reporting a running tunnel" in result.error


def test_ngrok_error_is_reported_with_the_token_masked(monkeypatch, fake_ngrok, caplog, capsys):
    """ngrok echoes a rejected authtoken (ERR_NGROK_105); it must not reach our line or any log."""
    monkeypatch.setenv("FAKE_NGROK_MODE", "error")
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="pyngrok")
    result = tunnel.open_tunnel(PORT, timeout_s=10)
    assert result.url is None
    assert "ngrok could not start" in result.error and "ERR_NGROK_105" in result.error
    assert "\n" not in result.error
    assert TOKEN not in result.error
    # pyngrok logged ngrok's error line, masked.
    assert any("Your authtoken" in r.getMessage() for r in caplog.records)
    assert TOKEN not in caplog.text
    assert all(TOKEN not in r.getMessage() for r in caplog.records)
    captured = capsys.readouterr()
    assert TOKEN not in captured.out and TOKEN not in captured.err


def test_token_never_appears_in_logs_or_output(fake_ngrok, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="pyngrok")
    assert tunnel.open_tunnel(PORT, timeout_s=10).url == PUBLIC_URL
    tunnel.close_tunnel()
    assert any(r.name.startswith("pyngrok") for r in caplog.records)  # there were logs to leak into
    assert TOKEN not in caplog.text
    assert all(TOKEN not in r.getMessage() for r in caplog.records)
    captured = capsys.readouterr()
    assert TOKEN not in captured.out and TOKEN not in captured.err


def test_pyngrok_info_lines_are_quiet_by_default(fake_ngrok):
    pyngrok_logger = logging.getLogger("pyngrok")
    saved = pyngrok_logger.level
    pyngrok_logger.setLevel(logging.NOTSET)
    try:
        assert tunnel.open_tunnel(PORT, timeout_s=10).url == PUBLIC_URL
        assert pyngrok_logger.level == logging.WARNING
        pyngrok_logger.setLevel(logging.INFO)  # a level the user chose is kept
        tunnel.close_tunnel()
        assert tunnel.open_tunnel(PORT, timeout_s=10).url == PUBLIC_URL
        assert pyngrok_logger.level == logging.INFO
    finally:
        pyngrok_logger.setLevel(saved)


def test_mask_filter_covers_arguments_and_tracebacks():
    mask = tunnel.SecretMaskFilter()
    mask.add(TOKEN)
    mask.add("abc")  # too short to mask safely: ignored
    logger = logging.getLogger("test_tunnel.mask")
    try:
        raise RuntimeError(f"bad token {TOKEN}")
    except RuntimeError:
        record = logger.makeRecord(
            logger.name, logging.ERROR, __file__, 1, "token=%s abc", (TOKEN,), sys.exc_info()
        )
    assert mask.filter(record) is True
    assert TOKEN not in record.getMessage() and "abc" in record.getMessage()
    assert TOKEN not in logging.Formatter().format(record)
    assert "RuntimeError" in logging.Formatter().format(record)
