"""Conversation history (DESIGN.md "History"): stored, listed, resumed, exported and deleted.

The one `babl_core` module that imports Chainlit, because what it provides are Chainlit pieces:
- `BablDataLayer`: Chainlit's SQLAlchemy data layer on `BABL_DB_URL` (SQLite by default,
  `postgresql+asyncpg://...` for deployments, same code), with what Chainlit 2.12 leaves out: the
  schema (`prepare_database`, created and upgraded at start-up), errors logged as errors with their
  cause (Chainlit only warns), SQLite-safe parameters, JSON columns read back as objects, threads
  whose deletion also removes their files, and a 404 instead of a 500 for an unknown thread;
- `LocalFileStorage`: elements (HTML previews, downloads, exports) under `data/files/<thread id>/`,
  served by `register_file_route` to their owner only, never as `text/html`;
- the plain functions that turn a session into what is stored and back: `turn_record` (kept on each
  answer step: the question, the model's raw answer and the model id), `settings_snapshot` (kept in
  the thread's metadata), `resumed_state` (a stored thread back into a `UiState`) and the exports
  (`export_markdown`, `export_json`, `export_attachments`).

app.py calls these from its hooks; nothing here knows about models or transformers.

Settings: `BABL_DB_URL` (default `sqlite+aiosqlite:///<data dir>/babl.db`), `BABL_DATA_DIR` (files go
to its `files/`), `BABL_RECORD_PROMPTS=1` (also keep the exact prompt each answer was generated
from, for auditing what a model saw).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import sqlite3
import time
import uuid
from collections.abc import Iterable, Mapping
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from chainlit.data.sql_alchemy import SQLAlchemyDataLayer
from chainlit.data.storage_clients.base import BaseStorageClient
from chainlit.data.utils import queue_until_user_message
from sqlalchemy import event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from babl_core import chat_ui, settings
from babl_core.chat import ChatReply, ChatSession
from babl_core.devices import in_passing_thread
from babl_core.render import DOWNLOAD_MIME, download_name, format_answer

log = logging.getLogger("babl.history")

DB_URL_ENV = "BABL_DB_URL"
RECORD_PROMPTS_ENV = "BABL_RECORD_PROMPTS"
TURN_KEY = "babl_turn"  # answer step metadata: one turn of the conversation
SESSION_KEY = "babl_session"  # thread metadata: the settings in effect (widget ids -> values)
FILES_ROUTE = "/babl/files"
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


def files_dir() -> Path:
    """Where stored elements live: `files/` in the data directory."""
    return settings.data_dir() / "files"


def record_prompts() -> bool:
    """`BABL_RECORD_PROMPTS=1`: keep each answer's exact prompt with its turn."""
    return settings.env_flag(RECORD_PROMPTS_ENV)


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


@dataclass(frozen=True)
class Column:
    """One column: its kind (mapped to a type per dialect) and constraints used only at CREATE."""

    name: str
    kind: str  # id | text | json | bool | int | tags
    create: str = ""  # e.g. PRIMARY KEY; a column added on upgrade gets the bare type


# JSON is kept as TEXT on both databases: Chainlit writes it as json.dumps strings, and TEXT reads
# back the same way everywhere (`_decode_json` turns it into objects). Ids are TEXT too: Chainlit
# passes strings, which asyncpg refuses to bind to UUID columns in some statements.
TYPES = {
    "sqlite": {"id": "TEXT", "text": "TEXT", "json": "TEXT", "bool": "BOOLEAN", "int": "INTEGER", "tags": "TEXT"},
    "postgresql": {"id": "TEXT", "text": "TEXT", "json": "TEXT", "bool": "BOOLEAN", "int": "INTEGER", "tags": "TEXT[]"},
}  # fmt: skip

# Every column Chainlit 2.12 writes (`Step.to_dict`, `Message.to_dict`, `Element.to_dict`,
# `Feedback`, `create_user`, `update_thread`), including the step columns missing from its documented
# schema: command, modes, defaultOpen, autoCollapse (and elements' autoPlay, playerConfig).
TABLES: dict[str, tuple[Column, ...]] = {
    "users": (
        Column("id", "id", "PRIMARY KEY"),
        Column("identifier", "text", "NOT NULL UNIQUE"),
        Column("createdAt", "text"),
        Column("metadata", "json"),
    ),
    "threads": (
        Column("id", "id", "PRIMARY KEY"),
        Column("createdAt", "text"),
        Column("name", "text"),
        Column("userId", "id", 'REFERENCES users ("id") ON DELETE CASCADE'),
        Column("userIdentifier", "text"),
        Column("tags", "tags"),
        Column("metadata", "json"),
    ),
    "steps": (
        Column("id", "id", "PRIMARY KEY"),
        Column("name", "text"),
        Column("type", "text"),
        Column("threadId", "id", 'REFERENCES threads ("id") ON DELETE CASCADE'),
        Column("parentId", "id"),
        Column("streaming", "bool"),
        Column("waitForAnswer", "bool"),
        Column("isError", "bool"),
        Column("metadata", "json"),
        Column("tags", "tags"),
        Column("input", "text"),
        Column("output", "text"),
        Column("createdAt", "text"),
        Column("command", "text"),
        Column("modes", "json"),
        Column("start", "text"),
        Column("end", "text"),
        Column("generation", "json"),
        Column("showInput", "text"),
        Column("language", "text"),
        Column("indent", "int"),
        Column("defaultOpen", "bool"),
        Column("autoCollapse", "bool"),
    ),
    "elements": (
        Column("id", "id", "PRIMARY KEY"),
        Column("threadId", "id", 'REFERENCES threads ("id") ON DELETE CASCADE'),
        Column("type", "text"),
        Column("url", "text"),
        Column("chainlitKey", "text"),
        Column("name", "text"),
        Column("display", "text"),
        Column("objectKey", "text"),
        Column("size", "text"),
        Column("page", "int"),
        Column("language", "text"),
        Column("forId", "id"),
        Column("mime", "text"),
        Column("props", "json"),
        Column("autoPlay", "bool"),
        Column("playerConfig", "json"),
    ),
    "feedbacks": (
        Column("id", "id", "PRIMARY KEY"),
        Column("forId", "id"),
        Column("threadId", "id", 'REFERENCES threads ("id") ON DELETE CASCADE'),
        Column("value", "int"),
        Column("comment", "text"),
    ),
}
INDEXES = {
    "babl_threads_user": ("threads", "userId"),
    "babl_steps_thread": ("steps", "threadId"),
    "babl_elements_thread": ("elements", "threadId"),
    "babl_feedbacks_step": ("feedbacks", "forId"),
}


def create_table_sql(table: str, dialect: str) -> str:
    """`CREATE TABLE IF NOT EXISTS` for one table of `TABLES`."""
    types = TYPES[dialect]
    columns = ",\n    ".join(f'"{c.name}" {types[c.kind]} {c.create}'.rstrip() for c in TABLES[table])
    return f'CREATE TABLE IF NOT EXISTS "{table}" (\n    {columns}\n)'


async def ensure_schema(conn, dialect: str) -> list[str]:
    """Create the tables and indexes when missing and add missing columns (an older schema).

    Idempotent: a second run changes nothing.

    Args:
        conn: An open `AsyncConnection` (inside a transaction).
        dialect: `sqlite` or `postgresql`.

    Returns:
        The columns added, as `table.column`.
    """
    for table in TABLES:
        await conn.execute(text(create_table_sql(table, dialect)))
    added: list[str] = []
    for table, columns in TABLES.items():
        existing = await conn.run_sync(
            lambda sync, t=table: {c["name"] for c in inspect(sync).get_columns(t)}
        )
        for column in columns:
            if column.name not in existing:
                kind = TYPES[dialect][column.kind]
                await conn.execute(text(f'ALTER TABLE "{table}" ADD COLUMN "{column.name}" {kind}'))
                added.append(f"{table}.{column.name}")
    for name, (table, column) in INDEXES.items():
        await conn.execute(text(f'CREATE INDEX IF NOT EXISTS "{name}" ON "{table}" ("{column}")'))
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


async def _prepare(url: str, dialect: str) -> list[str]:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            return await ensure_schema(conn, dialect)
    finally:
        await engine.dispose()


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
        added = in_passing_thread(asyncio.run, _prepare(url, dialect))
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


# --------------------------------------------------------------------------------------------------
# Files


_KEY_PART = re.compile(r"^[A-Za-z0-9._@+=-]{1,200}$")


def safe_file_name(name: str) -> str:
    """An element name usable as the last part of a storage key (no separators, no dot-only names)."""
    cleaned = re.sub(r"[^A-Za-z0-9._@+=-]+", "_", name or "").strip("._") or "file"
    return cleaned[:200]


class LocalFileStorage(BaseStorageClient):
    """Chainlit's storage interface over a local folder (`data/files/` by default).

    Keys are `<thread id>/<element id>/<name>`, so a thread's files are one folder, removed with it.
    Read URLs point at `register_file_route`'s route, which checks the owner and never serves HTML.

    Args:
        root: The folder (created on first write).
        url_prefix: The route that serves the files.
    """

    def __init__(self, root: Path | None = None, url_prefix: str = FILES_ROUTE) -> None:
        self.root = Path(root) if root is not None else files_dir()
        self.url_prefix = url_prefix.rstrip("/")

    def path_for(self, object_key: str) -> Path:
        """The file for `object_key`.

        Raises:
            ValueError: the key has empty, `.`/`..` or unusual parts (it could leave the folder).
        """
        parts = object_key.split("/")
        if not parts or any(not _KEY_PART.match(part) or set(part) == {"."} for part in parts):
            raise ValueError(f"{object_key!r} is not a storage key of the form <thread>/<element>/<name>")
        return self.root.joinpath(*parts)

    def thread_dir(self, thread_id: str) -> Path:
        return self.path_for(thread_id)

    async def upload_file(
        self,
        object_key: str,
        data: bytes | str,
        mime: str = DOWNLOAD_MIME,
        overwrite: bool = True,
        content_disposition: str | None = None,
    ) -> dict[str, Any]:
        """Write the file (atomically: a reader never sees half of it)."""
        path = self.path_for(object_key)
        payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)

        def write() -> None:
            if path.exists() and not overwrite:
                raise FileExistsError(f"{object_key} exists and overwrite is False")
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
            partial.write_bytes(payload)
            os.replace(partial, path)

        await asyncio.to_thread(write)
        return {"object_key": object_key, "url": await self.get_read_url(object_key)}

    async def delete_file(self, object_key: str) -> bool:
        """Remove the file and the folders it leaves empty; False when it was not there."""
        path = self.path_for(object_key)

        def remove() -> bool:
            try:
                path.unlink()
            except FileNotFoundError:
                return False
            parent = path.parent
            while parent != self.root and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent
            return True

        return await asyncio.to_thread(remove)

    async def delete_thread_files(self, thread_id: str) -> None:
        """Remove everything stored for a thread (also files whose database row was never written)."""
        folder = self.thread_dir(thread_id)
        if folder.exists():
            await asyncio.to_thread(shutil.rmtree, folder)

    async def get_read_url(self, object_key: str) -> str:
        self.path_for(object_key)  # validates
        return f"{self.url_prefix}/{object_key}"

    async def close(self) -> None:
        return None


# --------------------------------------------------------------------------------------------------
# The data layer


def _decode_json(value: Any) -> Any:
    """A JSON column as an object (SQLite and our TEXT columns return strings)."""
    if isinstance(value, str) and value[:1] in ("{", "["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _statement_summary(query: str) -> str:
    """`INSERT INTO steps`-like head of a statement, for the log (no values, no long SQL)."""
    words = " ".join(query.split()).split(" ")
    for i, word in enumerate(words):
        if word.upper() in ("INTO", "FROM", "UPDATE") and i + 1 < len(words):
            return f"{words[0].upper()} {words[i + 1].strip(chr(34))}"
    return words[0].upper() if words else "statement"


class BablDataLayer(SQLAlchemyDataLayer):
    """Chainlit's SQLAlchemy data layer, made dependable for Babl (see the module docstring).

    Args:
        url: The database URL (`db_url()` when None).
        storage: Where elements go (`LocalFileStorage()` when None).
    """

    def __init__(self, url: str | None = None, storage: BaseStorageClient | None = None) -> None:
        url = url or db_url()
        self.dialect = dialect_of(url)
        super().__init__(conninfo=url, storage_provider=storage or LocalFileStorage())
        if self.dialect == "sqlite":
            # Foreign keys (and their ON DELETE CASCADE) are off per SQLite connection by default;
            # on, SQLite refuses the same orphan rows PostgreSQL refuses.
            event.listen(self.engine.sync_engine, "connect", _sqlite_foreign_keys)
        self.failures: list[str] = []  # recent database errors, newest last (tests, status)
        self._deleted: set[str] = set()

    # -- SQL --------------------------------------------------------------------------------------
    def _parameter(self, value: Any) -> Any:
        if isinstance(value, dict):
            return json.dumps(value)
        if isinstance(value, list | tuple) and self.dialect == "sqlite":
            return json.dumps(list(value))  # SQLite has no arrays (thread and step tags)
        return value

    async def execute_sql(self, query: str, parameters: dict) -> list[dict[str, Any]] | int | None:
        """Run one statement; rows as dicts, else the row count, or None when it failed.

        A failure is logged as an ERROR naming the statement and the database's own message (the
        chat goes on without that write); Chainlit's own version only logs a warning.
        """
        values = {key: self._parameter(value) for key, value in parameters.items()}
        async with self.async_session() as session:
            try:
                await session.begin()
                result = await session.execute(text(query), values)
                await session.commit()
                if result.returns_rows:
                    return self.clean_result([dict(row._mapping) for row in result.fetchall()])
                return result.rowcount
            except Exception as exc:  # any failure: logged below, and the chat goes on
                await session.rollback()
                cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
                what = _statement_summary(query)
                message = f"{what} failed: {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
                self.failures = [*self.failures[-49:], message]
                log.error(
                    "History database error on %s (%s): %s. The chat goes on, but this change is not "
                    "stored; check the database server and %s.",
                    what,
                    shown_url(self._conninfo),
                    message,
                    DB_URL_ENV,
                )
                return None

    # -- threads ----------------------------------------------------------------------------------
    async def thread_owner(self, thread_id: str) -> str | None:
        """The identifier of the user who owns the thread, or None (no such thread, or no owner yet)."""
        rows = await self.execute_sql(
            'SELECT "userIdentifier" FROM threads WHERE "id" = :id', {"id": thread_id}
        )
        return rows[0]["userIdentifier"] if isinstance(rows, list) and rows else None

    async def get_thread_author(self, thread_id: str) -> str:
        # Chainlit's raises ValueError (a 500 on its routes) for an unknown id; "" makes them answer 404.
        return await self.thread_owner(thread_id) or ""

    async def get_all_user_threads(self, user_id: str | None = None, thread_id: str | None = None):
        threads = await super().get_all_user_threads(user_id=user_id, thread_id=thread_id)
        for thread in threads or []:
            thread["metadata"] = _decode_json(thread.get("metadata")) or {}
            thread["tags"] = _decode_json(thread.get("tags"))
            for step in thread.get("steps", []):
                step["metadata"] = _decode_json(step.get("metadata")) or {}
                step["generation"] = _decode_json(step.get("generation"))
                step["tags"] = _decode_json(step.get("tags"))
            for element in thread.get("elements", []):
                # The UI reads props as an object; a string would blank a custom element on resume.
                element["props"] = _decode_json(element.get("props")) or {}
        return threads

    async def update_thread(self, thread_id: str, name=None, user_id=None, metadata=None, tags=None):
        if thread_id in self._deleted:
            # A deleted thread's open tab persists its session on disconnect: that must not bring
            # the thread back as an ownerless row.
            log.info("Not writing to deleted thread %s", thread_id)
            return
        await super().update_thread(thread_id, name=name, user_id=user_id, metadata=metadata, tags=tags)

    async def delete_thread(self, thread_id: str) -> None:
        """Delete the thread's rows and its folder of files (`data/files/<thread id>/`)."""
        self._deleted.add(thread_id)
        await super().delete_thread(thread_id)
        if isinstance(self.storage_provider, LocalFileStorage):
            await self.storage_provider.delete_thread_files(thread_id)

    # -- steps and elements -----------------------------------------------------------------------
    @queue_until_user_message()
    async def create_step(self, step_dict):
        if step_dict.get("threadId") in self._deleted:
            return
        await super().create_step(step_dict)

    async def _session_may_write(self, thread_id: str | None, what: str) -> bool:
        """Whether the current session's user may write to `thread_id`: its owner, or anyone while
        it has no owner yet (a new thread). Chainlit's element routes take the thread id from the
        browser, so without this check a user could add or remove elements in another user's thread.
        """
        from chainlit.context import context

        try:
            user = context.session.user
        except Exception:  # no Chainlit session: a call from our own code or a script
            return True
        owner = await self.thread_owner(thread_id) if thread_id else None
        if owner is None or user is None or owner == user.identifier:
            return True
        log.error("Refused: %s of thread %s, owned by another user than %s", what, thread_id, user.identifier)
        return False

    @queue_until_user_message()
    async def delete_element(self, element_id: str, thread_id: str | None = None) -> None:
        rows = await self.execute_sql('SELECT "threadId" FROM elements WHERE "id" = :id', {"id": element_id})
        stored_thread = rows[0]["threadId"] if isinstance(rows, list) and rows else None
        if not await self._session_may_write(stored_thread, f"deleting element {element_id}"):
            return
        await super().delete_element(element_id, thread_id)

    @queue_until_user_message()
    async def create_element(self, element) -> None:
        """Store an element's content under `<thread>/<element>/<name>` and its row.

        Replaces Chainlit's version to key files by thread (deleting a thread removes one folder),
        to refuse writes into another user's thread, and to log a failed upload as an error instead
        of an unretrieved task exception.
        """
        if not element.for_id or element.thread_id in self._deleted:
            return
        if not await self._session_may_write(element.thread_id, f"writing element {element.id}"):
            return
        rows = await self.execute_sql('SELECT "threadId" FROM elements WHERE "id" = :id', {"id": element.id})
        if isinstance(rows, list) and rows and rows[0]["threadId"] not in (None, element.thread_id):
            log.error("Refused: element %s belongs to another thread than %s", element.id, element.thread_id)
            return
        try:
            if element.path:
                content: bytes | str | None = await asyncio.to_thread(Path(element.path).read_bytes)
            else:
                content = element.content
            row = element.to_dict()
            if content is not None and self.storage_provider is not None:
                key = f"{element.thread_id}/{element.id}/{safe_file_name(element.name)}"
                uploaded = await self.storage_provider.upload_file(
                    object_key=key, data=content, mime=element.mime or DOWNLOAD_MIME, overwrite=True
                )
                row["url"], row["objectKey"] = uploaded["url"], uploaded["object_key"]
            elif not element.url:
                raise ValueError("the element has no content, path or url to store")
        except (OSError, ValueError) as exc:
            log.error("History could not store element %s (%s) of thread %s: %s", element.id, element.name,
                      element.thread_id, exc)  # fmt: skip
            self.failures = [*self.failures[-49:], f"element {element.id}: {exc}"]
            return
        row = {k: v for k, v in row.items() if v is not None}
        columns = ", ".join(f'"{k}"' for k in row)
        placeholders = ", ".join(f":{k}" for k in row)
        updates = ", ".join(f'"{k}" = EXCLUDED."{k}"' for k in row if k != "id")
        await self.execute_sql(
            f'INSERT INTO elements ({columns}) VALUES ({placeholders}) ON CONFLICT ("id") DO UPDATE SET {updates}',
            row,
        )


def _sqlite_foreign_keys(dbapi_connection, connection_record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def open_data_layer(url: str | None = None, files: Path | None = None) -> BablDataLayer:
    """The data layer app.py hands to Chainlit (`@cl.data_layer`); call `prepare_database` first."""
    return BablDataLayer(url, LocalFileStorage(files))


# --------------------------------------------------------------------------------------------------
# Serving stored files


def register_file_route(app) -> None:
    """Serve `LocalFileStorage` files at `FILES_ROUTE/<key>` on Chainlit's FastAPI app.

    Only the thread's owner gets a file (anyone else: 404, the same as a missing file). Files are
    always attachments of type application/octet-stream with `nosniff` and a sandbox CSP, so nothing
    stored (a generated page above all) runs on the app's origin, whatever its name or content.
    Added ahead of Chainlit's GET catch-all; a second call adds nothing.
    """
    if getattr(app.state, "babl_files_registered", False):
        return
    from chainlit.auth import get_current_user
    from chainlit.data import get_data_layer
    from fastapi import APIRouter, Depends, HTTPException
    from fastapi.responses import FileResponse

    router = APIRouter()

    @router.get(FILES_ROUTE + "/{object_key:path}")
    async def stored_file(object_key: str, current_user=Depends(get_current_user)) -> FileResponse:
        if current_user is None:
            raise HTTPException(status_code=401, detail="Log in to download stored files")
        layer = get_data_layer()
        if not isinstance(layer, BablDataLayer) or not isinstance(layer.storage_provider, LocalFileStorage):
            raise HTTPException(status_code=404, detail="Not found")
        try:
            path = layer.storage_provider.path_for(object_key)
        except ValueError:
            raise HTTPException(status_code=404, detail="Not found") from None
        owner = await layer.thread_owner(object_key.split("/", 1)[0])
        if owner is None or owner != current_user.identifier or not path.is_file():
            raise HTTPException(status_code=404, detail="Not found")
        return FileResponse(
            path,
            media_type=DOWNLOAD_MIME,
            filename=path.name,
            content_disposition_type="attachment",
            headers={
                "X-Content-Type-Options": "nosniff",
                "Content-Security-Policy": "default-src 'none'; sandbox",
                "Cache-Control": "private, no-store",
            },
        )

    app.router.routes[0:0] = router.routes
    app.state.babl_files_registered = True


# --------------------------------------------------------------------------------------------------
# What a session stores, and a session rebuilt from it


def turn_record(chat: ChatSession, reply: ChatReply, *, question_id: str) -> dict | None:
    """The turn `reply` just added to `chat`, as kept in the answer step's metadata (`TURN_KEY`).

    Holds what the next prompt needs (the question, the model's raw answer rather than the formatted
    message, the model id), so a resumed chat rebuilds its history from these alone; with
    `BABL_RECORD_PROMPTS=1` also the prompt the model was given.

    Returns:
        None when the reply was not recorded in `chat` (it failed, or it is a comparison).
    """
    if (
        reply.session is not chat
        or not reply.record
        or not reply.finished
        or reply.stats.finish_reason == "error"
    ):
        return None
    if len(chat.messages) < 2 or chat.messages[-1]["role"] != "assistant":
        return None
    question, answer = chat.messages[-2], chat.messages[-1]
    record = {
        "question_id": question_id,
        "question": question["content"],
        "answer": answer["content"],
        "model": answer.get("model", reply.spec.id),
        "stopped": bool(answer.get("stopped")),
        "prompt_tokens": reply.stats.prompt_tokens,
        "completion_tokens": reply.stats.completion_tokens,
    }
    if record_prompts() and reply.prompt is not None:
        record["prompt"] = reply.prompt.text
    return record


def settings_snapshot(state: chat_ui.UiState) -> dict:
    """The session's settings under the settings widgets' ids (the shape of Chainlit's
    `chat_settings`), kept in the thread's metadata under `SESSION_KEY`."""
    snapshot = {chat_ui.MODEL: state.chat.model_id}
    snapshot.update(
        {key: state.chat.settings[key] for key in chat_ui.GENERATION_KEYS if key in state.chat.settings}
    )
    snapshot[chat_ui.SYSTEM_PROMPT] = state.chat.system_prompt
    snapshot[chat_ui.HTML_PREVIEW] = state.preview
    return snapshot


@dataclass
class StoredConversation:
    """The conversation rebuilt from a thread's answer steps.

    Attributes:
        messages: user/assistant messages as `ChatSession.messages` holds them (assistant ones with
            `model` and `stopped`).
        marks: user message id -> how many messages came before it (`UiState.marks`, for edits).
        settings: The stored settings snapshot (widget id -> value); {} when none was stored.
    """

    messages: list[dict] = field(default_factory=list)
    marks: dict[str, int] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)


def stored_conversation(thread: Mapping[str, Any]) -> StoredConversation:
    """Read a Chainlit thread dict (steps in creation order) back into a conversation."""
    metadata = _decode_json(thread.get("metadata")) or {}
    snapshot = metadata.get(SESSION_KEY) or metadata.get("chat_settings") or {}
    conversation = StoredConversation(settings=dict(snapshot) if isinstance(snapshot, dict) else {})
    for step in thread.get("steps") or []:
        turn = (_decode_json(step.get("metadata")) or {}).get(TURN_KEY)
        if not isinstance(turn, dict) or not isinstance(turn.get("answer"), str):
            continue
        if turn.get("question_id"):
            conversation.marks[turn["question_id"]] = len(conversation.messages)
        conversation.messages.append({"role": "user", "content": str(turn.get("question", ""))})
        conversation.messages.append(
            {
                "role": "assistant",
                "content": turn["answer"],
                "model": turn.get("model"),
                "stopped": bool(turn.get("stopped")),
            }
        )
    return conversation


def resumed_state(
    thread: Mapping[str, Any], choices: list[chat_ui.ModelChoice], default: chat_ui.ModelChoice | None
) -> tuple[chat_ui.UiState | None, list[str]]:
    """The session state of a resumed thread: its messages, model and settings.

    A stored model that is gone or cannot be served here any more is replaced by `default` (the
    conversation is kept and the note says so); invalid stored values keep the entry's defaults.

    Returns:
        (state, notes for the user). state is None when no model at all can be served.
    """
    conversation = stored_conversation(thread)
    values = conversation.settings
    last_model = next((m.get("model") for m in reversed(conversation.messages) if m.get("model")), None)
    wanted = values.get(chat_ui.MODEL) or last_model
    choice = chat_ui.find_choice(choices, wanted) if isinstance(wanted, str) else None
    notes: list[str] = []
    if choice is None or not choice.servable:
        if default is None:
            return None, [chat_ui.welcome_text(None, choices, public_url=None)]
        why = (
            f"{choice.availability.word}: {choice.availability.reason}"
            if choice
            else "it is not in the catalog"
        )
        notes.append(
            f"This chat was using `{wanted}`, which cannot be used here now ({why}). The conversation is "
            f"kept; answering with {chat_ui.model_line(default.spec)}. Pick another model in the settings."
        )
        choice = default
    state = chat_ui.UiState.for_model(choice.spec)
    change = chat_ui.read_settings({k: v for k, v in values.items() if k != chat_ui.MODEL}, state, choices)
    chat_ui.apply_settings(state, change)
    notes += [f"Stored setting not restored: {problem}" for problem in change.problems]
    state.chat.messages = conversation.messages
    state.marks = conversation.marks
    if thread.get("id"):
        state.chat.id = str(thread["id"])
    return state, notes


# --------------------------------------------------------------------------------------------------
# Export


def conversation_title(chat: ChatSession) -> str:
    """The first line of the first question, shortened (Chainlit names threads by it too)."""
    first = next((m["content"] for m in chat.messages if m["role"] == "user"), "")
    line = first.strip().splitlines()[0] if first.strip() else "conversation"
    return line if len(line) <= 60 else line[:59] + "…"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def export_json(chat: ChatSession, *, preview: bool | None = None, exported_at: str | None = None) -> str:
    """The conversation as JSON: settings, then each message (assistant ones with their model)."""
    document = {
        "format": "babl-conversation",
        "version": 1,
        "title": conversation_title(chat),
        "thread_id": chat.id,
        "exported_at": exported_at or _now(),
        "model": chat.model_id,
        "settings": dict(chat.settings),
        "system_prompt": chat.system_prompt,
        "messages": [
            {k: v for k, v in m.items() if k in ("role", "content", "model", "stopped")}
            for m in chat.messages
        ],
    }
    if preview is not None:
        document["html_preview"] = preview
    return json.dumps(document, ensure_ascii=False, indent=2) + "\n"


def export_markdown(
    chat: ChatSession, *, tasks: Mapping[str, str] | None = None, exported_at: str | None = None
) -> str:
    """The conversation as Markdown: a header with the settings, then each turn.

    Args:
        chat: The conversation.
        tasks: model id -> task, so code answers are fenced as the chat shows them (unknown models:
            the raw text).
        exported_at: The timestamp written in the header (now when None).
    """
    tasks = tasks or {}
    lines = [f"# {conversation_title(chat)}", ""]
    setting_text = " · ".join(f"{k.replace('_', ' ')} {v}" for k, v in chat.settings.items())
    lines.append(f"*Exported from Babl {exported_at or _now()} · model `{chat.model_id}` · {setting_text}*")
    if chat.system_prompt.strip():
        lines += ["", f"**System prompt:** {chat.system_prompt.strip()}"]
    for message in chat.messages:
        if message["role"] == "user":
            lines += ["", "---", "", "### You", "", message["content"]]
        else:
            model = message.get("model") or chat.model_id
            task = tasks.get(model)
            body = format_answer(task, message["content"]) if task else message["content"]
            lines += ["", f"### `{model}`", "", body]
            if message.get("stopped"):
                lines += ["", "*(stopped)*"]
    return "\n".join(lines).rstrip() + "\n"


def export_attachments(
    chat: ChatSession, *, preview: bool | None = None, tasks: Mapping[str, str] | None = None
) -> list[dict]:
    """Keyword arguments for two `cl.File` downloads (Markdown and JSON), never with an HTML type."""
    stamp = _now()
    base = f"babl {conversation_title(chat)}"
    return [
        {
            "name": download_name(base, suffix=".md"),
            "content": export_markdown(chat, tasks=tasks, exported_at=stamp).encode("utf-8"),
            "mime": DOWNLOAD_MIME,
        },
        {
            "name": download_name(base, suffix=".json"),
            "content": export_json(chat, preview=preview, exported_at=stamp).encode("utf-8"),
            "mime": DOWNLOAD_MIME,
        },
    ]


def model_tasks(specs: Iterable[Any]) -> dict[str, str]:
    """model id -> task for `export_markdown`, from catalog entries."""
    return {spec.id: spec.task for spec in specs}


# --------------------------------------------------------------------------------------------------
# Writing from a live Chainlit session


def _live_session():
    """(session, data layer) when the current Chainlit session has a stored thread (after its first
    message), else (None, None).

    Before the first message Chainlit has not created the thread (its own writes wait in a queue);
    writing then would create a thread without an owner.
    """
    from chainlit.context import context
    from chainlit.data import get_data_layer

    try:
        session = context.session
    except Exception:  # no Chainlit context (a plain script)
        return None, None
    layer = get_data_layer()
    if layer is None or not getattr(session, "has_first_interaction", False):
        return None, None
    return session, layer


async def save_settings(state: chat_ui.UiState) -> bool:
    """Store the session's settings in its thread's metadata now (a restart must not lose them;
    Chainlit itself only stores the session when the tab disconnects). Returns True when written."""
    from chainlit.user_session import user_sessions

    session, layer = _live_session()
    if session is None:
        return False
    snapshot = settings_snapshot(state)
    # Chainlit writes the user session into the same metadata on disconnect: keep its copy current
    # so that write cannot bring back older settings.
    user_sessions.setdefault(session.id, {})[SESSION_KEY] = snapshot
    await layer.update_thread(thread_id=session.thread_id, metadata={SESSION_KEY: snapshot})
    return True


async def store_message(step_dict: dict) -> bool:
    """Write a message step now and wait for it (Chainlit's own writes are fire-and-forget tasks),
    so an answer is stored before its turn ends. Returns True when written."""
    session, layer = _live_session()
    if session is None:
        return False
    started = time.perf_counter()
    await layer.update_step(dict(step_dict))
    log.debug("stored step %s in %.3f s", step_dict.get("id"), time.perf_counter() - started)
    return True


async def store_elements(elements: Iterable[Any]) -> int:
    """Write elements (previews, downloads, exports) now and wait for them, like `store_message`:
    Chainlit stores them in background tasks, which a restart can cut short. Returns how many."""
    session, layer = _live_session()
    if session is None:
        return 0
    stored = 0
    for element in elements:
        await layer.create_element(element)
        stored += 1
    return stored
