"""The history's schema: the tables Chainlit 2.12's SQLAlchemy data layer reads and writes, as
SQLAlchemy Core metadata (`METADATA`), created and upgraded at start-up (`prepare_database`).

`BABL_DB_URL` picks the database (default `sqlite+aiosqlite:///<data dir>/babl.db`,
`postgresql+asyncpg://...` for deployments, same code); a bad URL or an unreachable server stops the
start with one line that names the fix (`HistoryUnavailable`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    inspect,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from babl_core import settings

log = logging.getLogger("babl.history")

DB_URL_ENV = "BABL_DB_URL"
SUPPORTED_URLS = "sqlite+aiosqlite:///path/babl.db or postgresql+asyncpg://user:password@host:5432/db"


class HistoryUnavailable(SystemExit):
    """The history database cannot be used (bad BABL_DB_URL, server down, no permission).

    A `SystemExit` so that, raised at start-up and uncaught, it stops the app with its message
    instead of a traceback (like `auth.HostPolicyError`).
    """


# --------------------------------------------------------------------------------------------------
# Where history lives


def db_url() -> str:
    """`BABL_DB_URL`, or the default SQLite file `babl.db` in the data directory."""
    value = os.environ.get(DB_URL_ENV, "").strip()
    return value or f"sqlite+aiosqlite:///{settings.data_dir() / 'babl.db'}"


def shown_url(url: str) -> str:
    """The URL with its password hidden, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparsable URL>"


def dialect_of(url: str) -> str:
    """`sqlite` or `postgresql`, checked against the async drivers the data layer needs.

    Raises:
        HistoryUnavailable: the URL does not parse or names another database or driver.
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise HistoryUnavailable(
            f"{DB_URL_ENV}={shown_url(url)} is not a database URL; use {SUPPORTED_URLS}"
        ) from None
    drivers = {"sqlite": "aiosqlite", "postgresql": "asyncpg"}
    backend, driver = parsed.get_backend_name(), parsed.get_driver_name()
    if backend in drivers and driver != drivers[backend]:
        fixed = parsed.set(drivername=f"{backend}+{drivers[backend]}")
        raise HistoryUnavailable(
            f"{DB_URL_ENV} uses the {driver!r} driver, but the history needs an async one: "
            f"write it as {shown_url(fixed.render_as_string(hide_password=False))}"
        )
    if backend not in drivers:
        raise HistoryUnavailable(
            f"{DB_URL_ENV}={shown_url(url)}: {backend!r} is not supported; use {SUPPORTED_URLS}"
        )
    return backend


# --------------------------------------------------------------------------------------------------
# The schema: what Chainlit 2.12's SQLAlchemyDataLayer reads and writes


# JSON is kept as TEXT on both databases: Chainlit writes it as json.dumps strings, and TEXT reads
# back the same way everywhere (`decode_json` turns it into objects). Ids are TEXT too: Chainlit
# passes strings, which asyncpg refuses to bind to UUID columns in some statements. Tags are an array
# on PostgreSQL and JSON text on SQLite, which has no arrays.
TAGS = Text().with_variant(ARRAY(Text), "postgresql")
METADATA = MetaData()


def _thread_id() -> Column:
    return Column("threadId", Text, ForeignKey("threads.id", ondelete="CASCADE"))


# Every column Chainlit 2.12 writes (`Step.to_dict`, `Message.to_dict`, `Element.to_dict`,
# `Feedback`, `create_user`, `update_thread`), including the step columns missing from its documented
# schema: command, modes, defaultOpen, autoCollapse (and elements' autoPlay, playerConfig).
# Constraints (keys, NOT NULL, UNIQUE, references) apply when a table is created; a column added to
# an older table gets its bare type.
Table(
    "users",
    METADATA,
    Column("id", Text, primary_key=True),
    Column("identifier", Text, nullable=False, unique=True),
    Column("createdAt", Text),
    Column("metadata", Text),
)
Table(
    "threads",
    METADATA,
    Column("id", Text, primary_key=True),
    Column("createdAt", Text),
    Column("name", Text),
    Column("userId", Text, ForeignKey("users.id", ondelete="CASCADE")),
    Column("userIdentifier", Text),
    Column("tags", TAGS),
    Column("metadata", Text),
    Index("babl_threads_user", "userId"),
)
Table(
    "steps",
    METADATA,
    Column("id", Text, primary_key=True),
    Column("name", Text),
    Column("type", Text),
    _thread_id(),
    Column("parentId", Text),
    Column("streaming", Boolean),
    Column("waitForAnswer", Boolean),
    Column("isError", Boolean),
    Column("metadata", Text),
    Column("tags", TAGS),
    Column("input", Text),
    Column("output", Text),
    Column("createdAt", Text),
    Column("command", Text),
    Column("modes", Text),
    Column("start", Text),
    Column("end", Text),
    Column("generation", Text),
    Column("showInput", Text),
    Column("language", Text),
    Column("indent", Integer),
    Column("defaultOpen", Boolean),
    Column("autoCollapse", Boolean),
    Index("babl_steps_thread", "threadId"),
)
Table(
    "elements",
    METADATA,
    Column("id", Text, primary_key=True),
    _thread_id(),
    Column("type", Text),
    Column("url", Text),
    Column("chainlitKey", Text),
    Column("name", Text),
    Column("display", Text),
    Column("objectKey", Text),
    Column("size", Text),
    Column("page", Integer),
    Column("language", Text),
    Column("forId", Text),
    Column("mime", Text),
    Column("props", Text),
    Column("autoPlay", Boolean),
    Column("playerConfig", Text),
    Index("babl_elements_thread", "threadId"),
)
Table(
    "feedbacks",
    METADATA,
    Column("id", Text, primary_key=True),
    Column("forId", Text),
    _thread_id(),
    Column("value", Integer),
    Column("comment", Text),
    Index("babl_feedbacks_step", "forId"),
)


def decode_json(value: Any) -> Any:
    """A JSON column as an object (SQLite and our TEXT columns return strings)."""
    if isinstance(value, str) and value[:1] in ("{", "["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def ensure_schema(conn: Connection) -> list[str]:
    """Create the tables and indexes when missing and add missing columns (an older schema).

    Idempotent: a second run changes nothing.

    Args:
        conn: An open synchronous `Connection` inside a transaction (`AsyncConnection.run_sync`).

    Returns:
        The columns added, as `table.column`.
    """
    METADATA.create_all(conn, checkfirst=True)
    found = inspect(conn)
    quote = conn.dialect.identifier_preparer.quote
    added: list[str] = []
    for table in METADATA.sorted_tables:
        existing = {c["name"] for c in found.get_columns(table.name)}
        for column in table.columns:
            if column.name not in existing:
                kind = column.type.compile(dialect=conn.dialect)
                conn.execute(text(f"ALTER TABLE {quote(table.name)} ADD COLUMN {quote(column.name)} {kind}"))
                added.append(f"{table.name}.{column.name}")
        for index in table.indexes:  # create_all skips the indexes of tables that exist
            index.create(conn, checkfirst=True)
    return added


def _sqlite_path(url: str) -> Path:
    """The file of a SQLite URL.

    Raises:
        HistoryUnavailable: the URL names an in-memory database: each connection of the pool would
            get its own empty one, so the schema made at start is gone and every write fails.
    """
    parsed = make_url(url)
    database = parsed.database or ""
    if (
        database in ("", ":memory:")
        or database.startswith("file::memory:")
        or parsed.query.get("mode") == "memory"
    ):
        raise HistoryUnavailable(
            f"{DB_URL_ENV}={shown_url(url)} is an in-memory SQLite database, which keeps nothing between "
            f"connections, so no chat could be stored; give it a file (sqlite+aiosqlite:///path/babl.db) "
            f"or unset it for the default file in the data directory."
        )
    return Path(database).expanduser()


def _check_sqlite_file(url: str, path: Path) -> None:
    """Create the SQLite file's folder and open the file for writing, with the stdlib driver: a path
    under a file, in /proc or without permission then stops the start with one line, before the
    async driver (whose worker thread prints its own traceback when it fails).

    Raises:
        HistoryUnavailable: the folder cannot be created or the file cannot be written.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with closing(sqlite3.connect(path, timeout=10)) as conn:
            # WAL: readers never wait for the writer (the sidebar lists threads while answers are
            # stored). The mode is kept in the file; setting it is also the write test.
            conn.execute("PRAGMA journal_mode=WAL")
    except (OSError, sqlite3.Error) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise HistoryUnavailable(
            f"The history database {shown_url(url)} ({DB_URL_ENV}) cannot be used: {path} cannot be "
            f"created or written ({reason}). Point {DB_URL_ENV} at a file in a folder you can write to, "
            f"or unset it for the default SQLite file in the data directory."
        ) from None


async def _prepare(url: str) -> list[str]:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            return await conn.run_sync(ensure_schema)
    finally:
        await engine.dispose()


def _in_own_thread(fn, *args):
    """`fn(*args)` in a thread of its own: the schema needs an event loop of its own while the caller
    may be inside one (app.py calls `prepare_database` at import time or from a running loop)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="babl-schema") as pool:
        return pool.submit(fn, *args).result()


def prepare_database(url: str | None = None) -> list[str]:
    """Create or upgrade the history schema; run once at start-up, before serving.

    Runs on its own event loop in a worker thread (callable at import time or from a running loop),
    with an engine of its own: async connections belong to the loop that opened them.

    Returns:
        The columns added to an older schema (`table.column`), also logged.

    Raises:
        HistoryUnavailable: BABL_DB_URL is invalid or the database cannot be reached or changed.
    """
    url = url or db_url()
    dialect = dialect_of(url)
    if dialect == "sqlite":
        _check_sqlite_file(url, _sqlite_path(url))
    try:
        added = _in_own_thread(asyncio.run, _prepare(url))
    except (Exception, asyncio.CancelledError) as exc:  # the worker's failure (a cancelled loop too)
        # One line: SQLAlchemy appends a "Background on this error" line to its messages.
        cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
        detail = (str(cause).strip().splitlines() or [""])[0]
        raise HistoryUnavailable(
            f"The history database {shown_url(url)} ({DB_URL_ENV}) cannot be used: "
            f"{type(cause).__name__}: {detail}. Start that database server, or point {DB_URL_ENV} at one you "
            f"can write to ({SUPPORTED_URLS}); unset it for the default SQLite file in the data directory."
        ) from exc
    if added:
        log.info("History schema upgraded: added %s", ", ".join(added))
    return added
