"""Login users, the users file, host policy, Chainlit's secret and the API key (babl_core.web.auth)."""

from __future__ import annotations

import logging
import os
import stat

import pytest

from babl_core import settings
from babl_core.web import auth

tomllib = auth.tomllib  # the stdlib parser, or tomli on Python 3.10

PASSWORD = "S3cret-Pw:with,odd"  # recognisable in any message it might leak into
PAIR_PASSWORD = "Pa55:word"  # BABL_AUTH passwords may contain ':' (not ',')
API_KEY = "babl-test-api-key-7f3a9c"


def clear_env(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Unset variables so that teardown also undoes writes the code makes to os.environ itself."""
    for name in names:
        monkeypatch.setenv(name, "placeholder")  # records the original state for teardown
        monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, tmp_path):
    clear_env(
        monkeypatch,
        "BABL_AUTH",
        "BABL_API_KEY",
        "BABL_ALLOW_ANONYMOUS",
        "CHAINLIT_AUTH_SECRET",
        "BABL_MODELS_DIR",
    )
    monkeypatch.setenv("BABL_DATA_DIR", str(tmp_path / "data"))
    return tmp_path


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# --- BABL_AUTH pairs -------------------------------------------------------------------------


def test_no_babl_auth_means_no_login(monkeypatch):
    assert auth.load_users() is None
    monkeypatch.setenv("BABL_AUTH", "   ")
    assert auth.load_users() is None


def test_pairs_verify_right_wrong_and_unknown(monkeypatch):
    monkeypatch.setenv("BABL_AUTH", f"alice:{PAIR_PASSWORD}, bob:hunter2")
    store = auth.load_users()
    assert store is not None
    assert store.names == ["alice", "bob"]
    assert store.verify("alice", PAIR_PASSWORD)
    assert store.verify("bob", "hunter2")
    assert not store.verify("alice", "hunter2")
    assert not store.verify("alice", PAIR_PASSWORD + " ")
    assert not store.verify("alice", "")
    assert not store.verify("carol", PAIR_PASSWORD)
    assert not store.verify("Alice", PAIR_PASSWORD)  # names are case-sensitive


def test_pairs_compare_in_constant_time_including_unknown_users(monkeypatch):
    monkeypatch.setenv("BABL_AUTH", "alice:hunter2")
    store = auth.load_users()
    calls = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(
        auth.hmac, "compare_digest", lambda a, b: calls.append((len(a), len(b))) or real(a, b)
    )
    assert store.verify("alice", "hunter2")
    assert not store.verify("alice", "x")
    assert not store.verify("nobody", "hunter2")
    # Every check, unknown user included, goes through compare_digest on equal-length digests.
    assert calls == [(32, 32)] * 3


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (PASSWORD.replace(":", "").replace(",", ""), "has no ':'"),
        (f":{PASSWORD}", "empty user name"),
        ("alice:", "empty password"),
        (f"al ice:{PASSWORD}", "user name must be"),
        (f"alice:{PAIR_PASSWORD},alice:{PAIR_PASSWORD}x", "appears twice"),
        (f"alice:{PAIR_PASSWORD},", "entry 2 of 2"),
    ],
)
def test_malformed_babl_auth_is_clear_and_never_echoes_the_password(monkeypatch, value, expected):
    monkeypatch.setenv("BABL_AUTH", value)
    with pytest.raises(auth.AuthConfigError) as info:
        auth.load_users()
    message = str(info.value)
    assert "BABL_AUTH" in message
    assert expected in message
    for secret in (PASSWORD, PASSWORD.replace(":", "").replace(",", ""), PAIR_PASSWORD):
        assert secret not in message


def test_malformed_message_shows_the_expected_form(monkeypatch):
    monkeypatch.setenv("BABL_AUTH", "justaword")
    with pytest.raises(
        auth.AuthConfigError, match=r"user:password\[,user:password\.\.\.\].*@path/users\.toml"
    ):
        auth.load_users()


def test_user_store_repr_hides_passwords(monkeypatch):
    monkeypatch.setenv("BABL_AUTH", f"alice:{PAIR_PASSWORD}")
    text = repr(auth.load_users())
    assert "alice" in text
    assert PAIR_PASSWORD not in text
    assert "Pa55" not in text


# --- users file ------------------------------------------------------------------------------


def test_add_user_then_verify_through_babl_auth_file(monkeypatch, tmp_path):
    path = tmp_path / "users.toml"
    auth.add_user("alice", PASSWORD, path)
    auth.add_user("bob", PASSWORD, path)
    monkeypatch.setenv("BABL_AUTH", f"@{path}")
    store = auth.load_users()
    assert store.names == ["alice", "bob"]
    assert store.verify("alice", PASSWORD)
    assert store.verify("bob", PASSWORD)
    assert not store.verify("alice", "wrong")
    assert not store.verify("mallory", PASSWORD)

    text = path.read_text()
    assert PASSWORD not in text
    users = tomllib.loads(text)["users"]
    assert set(users) == {"alice", "bob"}
    for value in users.values():
        scheme, n, r, p, _salt, _digest = value.split("$")
        assert (scheme, int(n), int(r), int(p)) == ("scrypt", auth.SCRYPT_N, auth.SCRYPT_R, auth.SCRYPT_P)
    # Same password, fresh salts: different hashes.
    assert users["alice"] != users["bob"]


def test_add_user_updates_an_existing_user(monkeypatch, tmp_path):
    path = tmp_path / "users.toml"
    auth.add_user("alice", "old-password", path)
    auth.add_user("alice", "new-password", path)
    monkeypatch.setenv("BABL_AUTH", f"@{path}")
    store = auth.load_users()
    assert store.names == ["alice"]
    assert store.verify("alice", "new-password")
    assert not store.verify("alice", "old-password")


def test_users_file_mode_is_0600(tmp_path):
    path = tmp_path / "sub" / "users.toml"
    auth.add_user("alice", PASSWORD, path)
    assert mode_of(path) == 0o600
    path.chmod(0o644)
    auth.add_user("bob", PASSWORD, path)  # a rewrite restores the private mode
    assert mode_of(path) == 0o600


def test_users_file_write_is_atomic(monkeypatch, tmp_path):
    path = tmp_path / "users.toml"
    auth.add_user("alice", PASSWORD, path)
    before = path.read_bytes()

    def failing_replace(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(auth.os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        auth.add_user("bob", PASSWORD, path)
    assert path.read_bytes() == before  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users.toml"]  # no temp file left behind


@pytest.mark.parametrize(
    ("name", "password", "expected"),
    [
        ("", PASSWORD, "user name is empty"),
        ("bad name", PASSWORD, "user name must be"),
        ("a:b", PASSWORD, "user name must be"),
        ("a,b", PASSWORD, "user name must be"),
        ("x" * 65, PASSWORD, "user name must be"),
        ("alice", "", "password for 'alice' is empty"),
    ],
)
def test_add_user_rejects_invalid_input(tmp_path, name, password, expected):
    path = tmp_path / "users.toml"
    with pytest.raises(auth.AuthConfigError, match=expected):
        auth.add_user(name, password, path)
    assert not path.exists()


def test_add_user_refuses_to_drop_other_tables(tmp_path):
    path = tmp_path / "users.toml"
    path.write_text('[users]\n[roles]\nalice = "admin"\n')
    with pytest.raises(auth.AuthConfigError, match="roles"):
        auth.add_user("alice", PASSWORD, path)
    assert "roles" in path.read_text()


def test_users_file_path_is_relative_to_the_repo_root(monkeypatch, tmp_path):
    monkeypatch.setattr(settings, "REPO_ROOT", tmp_path)
    auth.add_user("alice", PASSWORD, "conf/users.toml")
    assert (tmp_path / "conf" / "users.toml").is_file()
    monkeypatch.setenv("BABL_AUTH", "@conf/users.toml")
    assert auth.load_users().verify("alice", PASSWORD)


def test_missing_users_file_says_how_to_create_it(monkeypatch, tmp_path):
    monkeypatch.setenv("BABL_AUTH", f"@{tmp_path / 'nope.toml'}")
    with pytest.raises(auth.AuthConfigError, match=r"does not exist.*adduser"):
        auth.load_users()
    monkeypatch.setenv("BABL_AUTH", "@")
    with pytest.raises(auth.AuthConfigError, match="names no file"):
        auth.load_users()


def test_malformed_hash_names_the_user_but_not_the_value(monkeypatch, tmp_path):
    path = tmp_path / "users.toml"
    path.write_text(f'[users]\nalice = "{PASSWORD}"\n')
    path.chmod(0o600)
    monkeypatch.setenv("BABL_AUTH", f"@{path}")
    with pytest.raises(auth.AuthConfigError) as info:
        auth.load_users()
    assert "'alice'" in str(info.value)
    assert "adduser alice" in str(info.value)
    assert PASSWORD not in str(info.value)


def test_absurd_scrypt_parameters_in_a_file_are_refused(monkeypatch, tmp_path):
    path = tmp_path / "users.toml"
    auth.add_user("alice", PASSWORD, path)
    text = path.read_text().replace(f"scrypt${auth.SCRYPT_N}$", "scrypt$1073741824$")
    path.write_text(text)
    monkeypatch.setenv("BABL_AUTH", f"@{path}")
    with pytest.raises(auth.AuthConfigError, match="out of range"):
        auth.load_users()


def test_file_users_cost_the_same_scrypt_work_known_or_unknown(monkeypatch, tmp_path):
    path = tmp_path / "users.toml"
    auth.add_user("alice", PASSWORD, path)
    monkeypatch.setenv("BABL_AUTH", f"@{path}")
    store = auth.load_users()
    calls = []
    real = auth._scrypt
    monkeypatch.setattr(auth, "_scrypt", lambda *a: calls.append(a[2:]) or real(*a))
    assert not store.verify("alice", "wrong")
    assert not store.verify("nobody", "wrong")
    assert store.verify("alice", PASSWORD)
    # One scrypt per check, with the same cost parameters, whether or not the user exists.
    assert calls == [(auth.SCRYPT_N, auth.SCRYPT_R, auth.SCRYPT_P, auth.SCRYPT_DKLEN)] * 3


def test_group_readable_users_file_is_warned_about(monkeypatch, tmp_path, caplog):
    path = tmp_path / "users.toml"
    auth.add_user("alice", PASSWORD, path)
    path.chmod(0o644)
    monkeypatch.setenv("BABL_AUTH", f"@{path}")
    with caplog.at_level(logging.WARNING, logger="babl_core.web.auth"):
        auth.load_users()
    assert "chmod 600" in caplog.text


def test_toml_writer_round_trips_awkward_strings():
    users = {'we"ird\\name\n': 'va"lue\\with\tcontrol\x7f', "plain": "scrypt$1$2$3$a$b"}
    assert tomllib.loads(auth._render_users_file(users))["users"] == users


# --- adduser ---------------------------------------------------------------------------------


def fake_getpass(monkeypatch, answers):
    prompts = []
    answers = iter(answers)

    def ask(prompt=""):
        prompts.append(prompt)
        return next(answers)

    monkeypatch.setattr(auth.getpass, "getpass", ask)
    return prompts


def test_adduser_interactive_writes_the_default_file_and_says_how_to_use_it(monkeypatch, tmp_path, capsys):
    prompts = fake_getpass(monkeypatch, [PASSWORD, PASSWORD])
    written = auth.adduser_interactive("alice")
    assert written == tmp_path / "data" / "users.toml"
    assert mode_of(written) == 0o600
    assert len(prompts) == 2 and "alice" in prompts[0]
    out = capsys.readouterr().out
    assert f"BABL_AUTH=@{written}" in out
    assert PASSWORD not in out
    monkeypatch.setenv("BABL_AUTH", f"@{written}")
    assert auth.load_users().verify("alice", PASSWORD)


def test_adduser_prints_a_repo_relative_path_for_the_default_data_dir(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(settings, "REPO_ROOT", tmp_path)
    monkeypatch.delenv("BABL_DATA_DIR")
    fake_getpass(monkeypatch, [PASSWORD, PASSWORD])
    auth.adduser_interactive("alice")
    assert "BABL_AUTH=@data/users.toml" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("answers", "expected"), [([PASSWORD, PASSWORD + "x"], "differ"), (["", ""], "empty")]
)
def test_adduser_interactive_writes_nothing_on_bad_answers(monkeypatch, tmp_path, answers, expected):
    fake_getpass(monkeypatch, answers)
    target = tmp_path / "users.toml"
    with pytest.raises(auth.AuthConfigError, match=expected):
        auth.adduser_interactive("alice", target)
    assert not target.exists()


# --- host policy -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.4.5.6", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("LocalHost.", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.20", False),
        ("10.0.0.1", False),
        ("example.com", False),
        ("localhost.example.com", False),
        ("", False),
        (None, False),
    ],
)
def test_is_loopback(host, loopback):
    assert auth.is_loopback(host) is loopback


@pytest.mark.parametrize(
    ("host", "babl_auth", "allow_anonymous", "expected"),
    [
        ("127.0.0.1", None, None, auth.AuthMode.LOCAL_USER),
        ("localhost", None, "1", auth.AuthMode.LOCAL_USER),
        ("::1", "alice:pw", None, auth.AuthMode.PASSWORD),
        ("0.0.0.0", "alice:pw", None, auth.AuthMode.PASSWORD),
        ("0.0.0.0", None, "1", auth.AuthMode.ANONYMOUS),
        ("192.168.1.20", None, "true", auth.AuthMode.ANONYMOUS),
        ("0.0.0.0", None, None, auth.HostPolicyError),
        ("0.0.0.0", None, "0", auth.HostPolicyError),
        ("example.com", None, None, auth.HostPolicyError),
    ],
)
def test_host_policy_matrix(monkeypatch, host, babl_auth, allow_anonymous, expected):
    if babl_auth:
        monkeypatch.setenv("BABL_AUTH", babl_auth)
    if allow_anonymous:
        monkeypatch.setenv("BABL_ALLOW_ANONYMOUS", allow_anonymous)
    if expected is auth.HostPolicyError:
        with pytest.raises(auth.HostPolicyError) as info:
            auth.check_host_policy(host)
        message = str(info.value)
        assert host in message
        assert "BABL_AUTH" in message and "BABL_ALLOW_ANONYMOUS=1" in message and "127.0.0.1" in message
        assert isinstance(info.value, SystemExit)  # uncaught, it stops the app with this message
    else:
        assert auth.check_host_policy(host) == expected
        assert auth.check_host_policy(host) == expected.value  # usable as a plain string


def test_anonymous_mode_is_warned(monkeypatch, caplog):
    monkeypatch.setenv("BABL_ALLOW_ANONYMOUS", "1")
    with caplog.at_level(logging.WARNING, logger="babl_core.web.auth"):
        auth.check_host_policy("0.0.0.0")
    assert "BABL_ALLOW_ANONYMOUS=1" in caplog.text


def test_host_policy_fails_early_on_malformed_babl_auth(monkeypatch):
    monkeypatch.setenv("BABL_AUTH", "alice")
    with pytest.raises(auth.AuthConfigError, match="BABL_AUTH"):
        auth.check_host_policy("127.0.0.1")


# --- Chainlit secret -------------------------------------------------------------------------


def test_secret_from_environment_is_used_as_is(monkeypatch, tmp_path):
    monkeypatch.setenv("CHAINLIT_AUTH_SECRET", "from-the-environment")
    assert auth.auth_secret() == "from-the-environment"
    assert not (tmp_path / "data" / "chainlit_secret").exists()


def test_secret_is_generated_once_then_reused(monkeypatch, tmp_path):
    first = auth.auth_secret()
    path = tmp_path / "data" / "chainlit_secret"
    assert path.read_text().strip() == first
    assert mode_of(path) == 0o600
    assert len(first) >= 60
    assert os.environ["CHAINLIT_AUTH_SECRET"] == first  # where Chainlit reads it

    monkeypatch.delenv("CHAINLIT_AUTH_SECRET")  # a new process: only the file remains
    assert auth.auth_secret() == first
    assert path.read_text().strip() == first


def test_empty_secret_file_is_replaced(monkeypatch, tmp_path):
    path = tmp_path / "data" / "chainlit_secret"
    path.parent.mkdir(parents=True)
    path.write_text("")
    secret = auth.auth_secret()
    assert secret and path.read_text().strip() == secret
    assert mode_of(path) == 0o600


# --- API key ---------------------------------------------------------------------------------


def test_without_api_key_the_api_is_open():
    assert auth.api_key() is None
    assert auth.check_bearer(None)
    assert auth.bearer_error("Bearer anything") is None


@pytest.mark.parametrize(
    ("header", "allowed", "reason"),
    [
        (None, False, "Missing API key"),
        ("", False, "Missing API key"),
        ("Bearer", False, "Missing API key"),
        ("Bearer    ", False, "Missing API key"),
        (f"Basic {API_KEY}", False, "Bearer"),
        (API_KEY, False, "Bearer"),
        ("Bearer wrong-key", False, "Invalid API key"),
        (f"Bearer {API_KEY}x", False, "Invalid API key"),
        (f"Bearer {API_KEY[:-1]}", False, "Invalid API key"),
        (f"Bearer {API_KEY}", True, None),
        (f"bearer {API_KEY}", True, None),
        (f"  Bearer   {API_KEY}  ", True, None),
    ],
)
def test_bearer_checks(monkeypatch, header, allowed, reason):
    monkeypatch.setenv("BABL_API_KEY", API_KEY)
    assert auth.check_bearer(header) is allowed
    error = auth.bearer_error(header)
    if reason is None:
        assert error is None
    else:
        assert reason in error
        assert API_KEY not in error


def test_api_key_never_shows_in_repr_or_logs(monkeypatch, caplog):
    monkeypatch.setenv("BABL_API_KEY", API_KEY)
    key = auth.api_key()
    assert API_KEY not in repr(key) and API_KEY not in str(key)
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("test").info("key is %s / %r", key, key)
        auth.check_bearer("Bearer nope")
    assert API_KEY not in caplog.text
