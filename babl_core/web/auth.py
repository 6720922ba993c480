"""Who may use Babl: the login users, the host policy, Chainlit's secret and the API key.

Plain Python with no Chainlit or web-framework import: `app.py` turns `UserStore.verify` into a
password callback (or, in local-user mode, a header callback returning `LOCAL_USER`), and the API
routes call `bearer_error` / `check_bearer`. Every secret is compared in constant time, never logged
and never part of a repr.

Settings (read on every call, so tests and the CLI can change them):
- `BABL_AUTH=user:password[,user:password...]` or `BABL_AUTH=@path/users.toml` (scrypt hashes written
  by `python -m babl_core adduser NAME`; relative paths from the repo root).
- `BABL_ALLOW_ANONYMOUS=1`: serve a non-loopback host without a login anyway.
- `CHAINLIT_AUTH_SECRET`: signs Chainlit's session tokens; generated once into `data/chainlit_secret`.
- `BABL_API_KEY`: when set, every API route needs `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import base64
import enum
import getpass
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import stat
import tempfile
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from babl_core import settings

log = logging.getLogger(__name__)

LOCAL_USER = "local"
USERS_FILE_NAME = "users.toml"
SECRET_FILE_NAME = "chainlit_secret"
AUTH_FORMS = "BABL_AUTH=user:password[,user:password...] or BABL_AUTH=@path/users.toml"
WWW_AUTHENTICATE = 'Bearer realm="babl"'

# Letters, digits and . _ @ - : safe as a TOML key, a URL part and a log field, and never
# confusable with the `:` and `,` separators of BABL_AUTH.
_NAME_RE = re.compile(r"[A-Za-z0-9._@-]{1,64}")

# scrypt cost: n=2**14, r=8 takes ~50 ms and 16 MiB per check, the interactive-login figure
# recommended since scrypt's paper. Stored with each hash so it can be raised later.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_DKLEN = 32
SALT_BYTES = 16
# Bounds for parameters read from a users file, so a tampered file cannot ask for gigabytes.
_MAX_N = 2**20
_MAX_R = 32
_MAX_P = 16


class AuthConfigError(ValueError):
    """A login setting (BABL_AUTH, the users file, a new user) is wrong; the message says the fix."""


class HostPolicyError(SystemExit):
    """Refusal to serve a non-loopback host without a login.

    A `SystemExit` so that, uncaught, it stops the app with its message instead of a traceback.
    """


class AuthMode(enum.StrEnum):
    """How visitors are identified; compares equal to its string value."""

    PASSWORD = "password"  # BABL_AUTH set: the login page
    LOCAL_USER = "local-user"  # loopback host, no BABL_AUTH: everyone is LOCAL_USER
    ANONYMOUS = "anonymous"  # non-loopback host, no BABL_AUTH, BABL_ALLOW_ANONYMOUS=1 (warned)


# --- password hashes -------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    # OpenSSL's default memory cap (32 MiB) is too small for larger stored parameters.
    maxmem = 128 * r * (n + p + 2) + 2**20
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=dklen, maxmem=maxmem)


def hash_password(password: str) -> str:
    """Hash a password for the users file.

    Args:
        password: The plain password (non-empty).

    Returns:
        `scrypt$n$r$p$salt_b64$hash_b64`, with a fresh random 16-byte salt.
    """
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_DKLEN)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


@dataclass(frozen=True, repr=False)
class _ScryptHash:
    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes

    @classmethod
    def parse(cls, text: str) -> _ScryptHash:
        """Raises ValueError (without echoing `text`) when it is not a hash we wrote."""
        parts = text.split("$")
        if len(parts) != 6 or parts[0] != "scrypt":
            raise ValueError("expected scrypt$n$r$p$salt$hash")
        try:
            n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
            salt = base64.b64decode(parts[4], validate=True)
            digest = base64.b64decode(parts[5], validate=True)
        except ValueError:
            raise ValueError("a number or base64 field does not parse") from None
        if n < 2 or n > _MAX_N or n & (n - 1) or not 1 <= r <= _MAX_R or not 1 <= p <= _MAX_P:
            raise ValueError(
                f"parameters out of range (n a power of 2 up to {_MAX_N}, r<={_MAX_R}, p<={_MAX_P})"
            )
        if len(salt) < 8 or len(digest) < 16:
            raise ValueError("salt or hash too short")
        return cls(n, r, p, salt, digest)

    def matches(self, password: str) -> bool:
        candidate = _scrypt(password, self.salt, self.n, self.r, self.p, len(self.digest))
        return hmac.compare_digest(candidate, self.digest)

    def __repr__(self) -> str:
        return "_ScryptHash(<hidden>)"


@dataclass(frozen=True, repr=False)
class _PlainPassword:
    """A password given in BABL_AUTH. Only its SHA-256 is kept: fixed-length digests make the
    comparison constant-time whatever the lengths, and the object holds no password."""

    digest: bytes

    @classmethod
    def of(cls, password: str) -> _PlainPassword:
        return cls(hashlib.sha256(password.encode("utf-8")).digest())

    def matches(self, password: str) -> bool:
        return hmac.compare_digest(hashlib.sha256(password.encode("utf-8")).digest(), self.digest)

    def __repr__(self) -> str:
        return "_PlainPassword(<hidden>)"


_Verifier = _ScryptHash | _PlainPassword
_dummy_scrypt: _ScryptHash | None = None


def _dummy_for(kind: type) -> _Verifier:
    """A verifier no password matches, of the same kind (same cost) as the store's own."""
    global _dummy_scrypt
    if kind is _PlainPassword:
        return _PlainPassword(secrets.token_bytes(32))
    if _dummy_scrypt is None:
        _dummy_scrypt = _ScryptHash.parse(hash_password(secrets.token_urlsafe(24)))
    return _dummy_scrypt


class UserStore:
    """The login users, from BABL_AUTH pairs or a users file.

    Args:
        verifiers: user name -> password verifier.
        source: where they came from (`BABL_AUTH` or the file path), for messages.
    """

    def __init__(self, verifiers: Mapping[str, _Verifier], source: str) -> None:
        if not verifiers:
            raise AuthConfigError(f"{source} names no users; expected {AUTH_FORMS}")
        self._verifiers = dict(verifiers)
        self.source = source
        kinds = {type(v) for v in self._verifiers.values()}
        self._dummy = _dummy_for(_ScryptHash if _ScryptHash in kinds else _PlainPassword)

    @property
    def names(self) -> list[str]:
        """The user names, sorted."""
        return sorted(self._verifiers)

    def __contains__(self, name: object) -> bool:
        return name in self._verifiers

    def __len__(self) -> int:
        return len(self._verifiers)

    def verify(self, name: str, password: str) -> bool:
        """Whether `password` is `name`'s password.

        Constant-time, and an unknown name costs the same hashing as a known one (it is checked
        against a dummy), so response times do not reveal which names exist.
        """
        verifier = self._verifiers.get(name)
        if verifier is None:
            self._dummy.matches(password)
            return False
        return verifier.matches(password)

    def __repr__(self) -> str:
        return f"UserStore(source={self.source!r}, users={self.names!r})"


# --- BABL_AUTH -------------------------------------------------------------------------------


def _check_name(name: str, where: str) -> None:
    if not _NAME_RE.fullmatch(name):
        raise AuthConfigError(
            f"{where}: a user name must be 1-64 letters, digits or . _ @ - (no spaces, ':' or ',')"
        )


def _parse_pairs(value: str) -> UserStore:
    entries = value.split(",")
    verifiers: dict[str, _Verifier] = {}
    for index, entry in enumerate(entries, start=1):
        # Only positions and validated names go into messages: an entry may hold a password.
        where = f"BABL_AUTH entry {index} of {len(entries)}"
        name, sep, password = entry.strip().partition(":")
        if not sep:
            raise AuthConfigError(f"{where} has no ':' between user and password; expected {AUTH_FORMS}")
        if not name:
            raise AuthConfigError(f"{where} has an empty user name; expected {AUTH_FORMS}")
        _check_name(name, where)
        if not password:
            raise AuthConfigError(f"{where} (user {name!r}) has an empty password; expected {AUTH_FORMS}")
        if name in verifiers:
            raise AuthConfigError(f"{where}: user {name!r} appears twice in BABL_AUTH; keep one entry")
        verifiers[name] = _PlainPassword.of(password)
    return UserStore(verifiers, "BABL_AUTH")


def _users_file_path(value: str) -> Path:
    if not value:
        raise AuthConfigError(f"BABL_AUTH=@ names no file; expected {AUTH_FORMS}")
    return settings.resolve_path(value)


def _read_users_table(path: Path) -> dict[str, object]:
    """The `[users]` table of a users file (empty when the file does not exist)."""
    if not path.exists():
        return {}
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's messages give a position, never file content.
        raise AuthConfigError(
            f"users file {path} is not valid TOML ({exc}); rewrite it with adduser"
        ) from None
    extra = sorted(set(data) - {"users"})
    if extra:
        raise AuthConfigError(
            f"users file {path} has keys other than [users] ({', '.join(extra)}); "
            "Babl rewrites this file and would drop them, so move them elsewhere"
        )
    users = data.get("users", {})
    if not isinstance(users, dict):
        raise AuthConfigError(
            f'users file {path}: `users` must be a table ([users] then name = "scrypt$...")'
        )
    return users


def load_users_file(path: str | os.PathLike) -> UserStore:
    """Read a users file written by `add_user`.

    Args:
        path: The file; relative paths are taken from the repo root.

    Returns:
        The users it holds.

    Raises:
        AuthConfigError: The file is missing, unreadable, empty or holds a malformed hash.
    """
    path = settings.resolve_path(path)
    if not path.is_file():
        raise AuthConfigError(
            f"BABL_AUTH names the users file {path}, which does not exist; "
            "create it with `python -m babl_core adduser NAME`"
        )
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning(
            "users file %s is readable by other users (mode %o); run `chmod 600 %s`", path, mode, path
        )
    verifiers: dict[str, _Verifier] = {}
    for name, value in _read_users_table(path).items():
        _check_name(name, f"users file {path}")
        if not isinstance(value, str):
            raise AuthConfigError(f'users file {path}: the entry for {name!r} must be a string "scrypt$..."')
        try:
            verifiers[name] = _ScryptHash.parse(value)
        except ValueError as exc:
            raise AuthConfigError(
                f"users file {path}: the entry for {name!r} is not a scrypt hash ({exc}); "
                f"set it again with `python -m babl_core adduser {name}`"
            ) from None
    if not verifiers:
        raise AuthConfigError(
            f"users file {path} has no users; add one with `python -m babl_core adduser NAME`"
        )
    return UserStore(verifiers, str(path))


def load_users() -> UserStore | None:
    """The login users named by BABL_AUTH.

    Returns:
        None when BABL_AUTH is unset or blank (no login), else the users.

    Raises:
        AuthConfigError: BABL_AUTH is malformed (the message never repeats a password).
    """
    value = os.environ.get("BABL_AUTH", "").strip()
    if not value:
        return None
    if value.startswith("@"):
        return load_users_file(_users_file_path(value[1:].strip()))
    return _parse_pairs(value)


# --- writing the users file ------------------------------------------------------------------


def _toml_string(text: str) -> str:
    """A TOML basic string. Names and hashes are plain ASCII, but escape anyway so the writer is
    correct for any input."""
    out = []
    for char in text:
        if char in ('"', "\\"):
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _render_users_file(users: Mapping[str, str]) -> str:
    # Our own writer: the stdlib reads TOML (tomllib) but cannot write it, and one flat table of
    # strings does not justify a dependency (tomli-w).
    lines = [
        "# Babl login users: name = scrypt hash. Written by `python -m babl_core adduser NAME`.",
        "# Use with BABL_AUTH=@<this file>. Keep it private (mode 600).",
        "[users]",
    ]
    lines += [f"{_toml_string(name)} = {_toml_string(users[name])}" for name in sorted(users)]
    return "\n".join(lines) + "\n"


def write_private_file(path: Path, text: str) -> None:
    """Replace `path` atomically with `text`, mode 0600.

    Written to a temporary file in the same directory (created 0600 by `mkstemp`), flushed to disk,
    then renamed over the target: readers see the old file or the new one, never half of one, and
    the content is never readable by others, not even briefly.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o600)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is done either way
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def default_users_path() -> Path:
    """`data/users.toml` (under `BABL_DATA_DIR` when set)."""
    return settings.data_dir() / USERS_FILE_NAME


def add_user(name: str, password: str, path: str | os.PathLike) -> None:
    """Create or update one user in a users file.

    Args:
        name: 1-64 letters, digits or `. _ @ -`.
        password: Non-empty; stored as a scrypt hash only.
        path: The users file (created when missing, mode 0600); relative paths from the repo root.

    Raises:
        AuthConfigError: Invalid name, empty password, or an existing file we cannot safely rewrite.
    """
    if not isinstance(name, str) or not name:
        raise AuthConfigError("the user name is empty; give one, e.g. `python -m babl_core adduser alice`")
    _check_name(name, f"user name {name!r}")
    if not isinstance(password, str) or not password:
        raise AuthConfigError(f"the password for {name!r} is empty; choose a non-empty password")
    path = settings.resolve_path(path)
    users = _read_users_table(path)
    for other, value in users.items():
        if not isinstance(value, str):
            raise AuthConfigError(f'users file {path}: the entry for {other!r} must be a string "scrypt$..."')
    updated = {**users, name: hash_password(password)}
    write_private_file(path, _render_users_file(updated))


def adduser_interactive(name: str, path: str | os.PathLike | None = None) -> Path:
    """`python -m babl_core adduser NAME`: ask for a password twice and store its hash.

    Args:
        name: The user name.
        path: The users file; default `data/users.toml`.

    Returns:
        The users file written.

    Raises:
        AuthConfigError: The passwords differ or are empty, or the name is invalid (nothing written).
    """
    target = settings.resolve_path(path) if path is not None else default_users_path()
    _check_name(name, f"user name {name!r}")
    password = getpass.getpass(f"Password for {name}: ")
    if not password:
        raise AuthConfigError(f"the password for {name!r} is empty; nothing was written")
    if getpass.getpass("Repeat the password: ") != password:
        raise AuthConfigError("the two passwords differ; nothing was written, run the command again")
    existed = name in _read_users_table(target)
    add_user(name, password, target)
    shown = settings.portable_path(target)
    print(f"{'Updated' if existed else 'Added'} user {name!r} in {shown}.")
    print(f"Start the app with the login on:  BABL_AUTH=@{shown} {settings.serve_command()}")
    return target


# --- host policy -----------------------------------------------------------------------------


def is_loopback(host: str | None) -> bool:
    """Whether `host` only accepts connections from this machine (127.0.0.0/8, ::1, localhost).

    `0.0.0.0`, `::` and an empty host listen on every interface, so they are not loopback.
    """
    if not host:
        return False
    host = host.strip().strip("[]").rstrip(".").lower()
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def check_host_policy(host: str | None) -> AuthMode:
    """Decide how visitors log in when the app listens on `host`.

    Also loads BABL_AUTH so a malformed value stops the app at start, not at the first login.

    Returns:
        PASSWORD when BABL_AUTH is set; LOCAL_USER on a loopback host without it; ANONYMOUS on a
        non-loopback host without it when BABL_ALLOW_ANONYMOUS=1 (logged as a warning).

    Raises:
        HostPolicyError: A non-loopback host without BABL_AUTH or BABL_ALLOW_ANONYMOUS=1.
        AuthConfigError: BABL_AUTH is malformed.
    """
    if load_users() is not None:
        return AuthMode.PASSWORD
    if is_loopback(host):
        return AuthMode.LOCAL_USER
    if settings.env_flag("BABL_ALLOW_ANONYMOUS"):
        log.warning(
            "Serving %s without a login because BABL_ALLOW_ANONYMOUS=1: everyone who can reach it "
            "is the single user %r and sees that user's history. Set BABL_AUTH to require a login.",
            host,
            LOCAL_USER,
        )
        return AuthMode.ANONYMOUS
    raise HostPolicyError(
        f"Refusing to serve on {host or 'every interface'} without a login: anyone who can reach it "
        f"would use the app as the single user {LOCAL_USER!r}. Set {AUTH_FORMS} "
        "(create the file with `python -m babl_core adduser NAME`), or listen on 127.0.0.1 "
        "(HOST=127.0.0.1), or set BABL_ALLOW_ANONYMOUS=1 to serve it without a login anyway."
    )


# --- Chainlit's signing secret ---------------------------------------------------------------


def auth_secret() -> str:
    """The secret Chainlit signs session tokens with.

    `CHAINLIT_AUTH_SECRET` when set; else the one stored in `data/chainlit_secret`, generated (mode
    0600) on first use so logins survive restarts. Also exported as `CHAINLIT_AUTH_SECRET`, which is
    where Chainlit reads it.
    """
    value = os.environ.get("CHAINLIT_AUTH_SECRET", "").strip()
    if value:
        return value
    path = settings.data_dir() / SECRET_FILE_NAME
    value = path.read_text(encoding="utf-8").strip() if path.exists() else ""
    if not value:
        generated = secrets.token_urlsafe(48)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # O_EXCL: when two processes start at once, one creates the file and the other reads it.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            value = path.read_text(encoding="utf-8").strip()
            if not value:  # an empty file left by a crash: replace it
                write_private_file(path, generated + "\n")
                value = generated
        else:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(generated + "\n")
            value = generated
        log.info("Generated CHAINLIT_AUTH_SECRET into %s (kept for later runs)", path)
    os.environ["CHAINLIT_AUTH_SECRET"] = value
    return value


# --- API key ---------------------------------------------------------------------------------


class ApiKey:
    """The API key from BABL_API_KEY. Keeps only its SHA-256, so no repr, log or traceback of this
    object can show the key, and comparisons are constant-time whatever the lengths."""

    __slots__ = ("_digest",)

    def __init__(self, key: str) -> None:
        if not key:
            raise AuthConfigError("BABL_API_KEY is empty; unset it or set a long random value")
        self._digest = hashlib.sha256(key.encode("utf-8")).digest()

    def matches(self, presented: str) -> bool:
        """Constant-time check of a presented key."""
        return hmac.compare_digest(hashlib.sha256(presented.encode("utf-8")).digest(), self._digest)

    def __repr__(self) -> str:
        return "ApiKey(<hidden>)"

    __str__ = __repr__


def api_key() -> ApiKey | None:
    """The key from BABL_API_KEY, or None when it is unset or blank (the API is then open)."""
    value = os.environ.get("BABL_API_KEY", "").strip()
    return ApiKey(value) if value else None


def bearer_error(authorization_header: str | None) -> str | None:
    """Why a request's Authorization header is refused, as the text of a 401 response.

    Args:
        authorization_header: The raw header value, or None when absent.

    Returns:
        None when the request may proceed (BABL_API_KEY unset, or the right Bearer key), else a
        one-line reason that never contains the key.
    """
    key = api_key()
    if key is None:
        return None
    header = (authorization_header or "").strip()
    if not header:
        return "Missing API key: send the header 'Authorization: Bearer <key>' (the server's BABL_API_KEY)."
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":  # schemes are case-insensitive (RFC 9110)
        return "Unsupported Authorization scheme: send 'Authorization: Bearer <key>'."
    token = token.strip()
    if not token:
        return "Missing API key after 'Bearer': send 'Authorization: Bearer <key>'."
    if not key.matches(token):
        return "Invalid API key."
    return None


def check_bearer(authorization_header: str | None) -> bool:
    """Whether a request with this Authorization header may use the API (see `bearer_error`)."""
    return bearer_error(authorization_header) is None
