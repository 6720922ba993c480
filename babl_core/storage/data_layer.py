"""Chainlit's SQLAlchemy data layer, made dependable for Babl (`BablDataLayer`): errors logged as
errors with their cause (Chainlit only warns), SQLite-safe parameters, JSON columns read back as
objects, threads whose deletion also removes their files, writes refused into another user's thread,
and a 404 instead of a 500 for an unknown thread. The schema it needs is `schema.prepare_database`'s.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from chainlit.data.sql_alchemy import SQLAlchemyDataLayer
from chainlit.data.storage_clients.base import BaseStorageClient
from chainlit.data.utils import queue_until_user_message
from sqlalchemy import event, text
from sqlalchemy.exc import DBAPIError

from babl_core.storage.conversations import TURN_KEY, only_commands
from babl_core.storage.files import DEFAULT_MIME, LocalFileStorage, safe_file_name
from babl_core.storage.schema import DB_URL_ENV, db_url, decode_json, dialect_of, shown_url

log = logging.getLogger("babl.history")

# --------------------------------------------------------------------------------------------------
# The data layer


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
        commands: The chat's command ids: a thread in which the user only ran these is not listed.
    """

    def __init__(
        self, url: str | None = None, storage: BaseStorageClient | None = None, commands: Iterable[str] = ()
    ) -> None:
        url = url or db_url()
        self.dialect = dialect_of(url)
        super().__init__(conninfo=url, storage_provider=storage or LocalFileStorage())
        if self.dialect == "sqlite":
            # Foreign keys (and their ON DELETE CASCADE) are off per SQLite connection by default;
            # on, SQLite refuses the same orphan rows PostgreSQL refuses.
            event.listen(self.engine.sync_engine, "connect", _sqlite_foreign_keys)
        self.commands = tuple(commands)
        self.failures: list[str] = []  # recent database errors, newest last (tests, status)
        self._deleted: set[str] = set()
        # Answer writes one at a time: the stored-turn check and the write must not interleave.
        self._answer_writes = asyncio.Lock()

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
        if thread_id is None and threads:
            # The sidebar's listing: a chat that only ran commands (/status, /export) is not a
            # conversation to come back to, and would show as "Untitled Conversation".
            threads = [thread for thread in threads if not only_commands(thread, self.commands)]
        for thread in threads or []:
            thread["metadata"] = decode_json(thread.get("metadata")) or {}
            thread["tags"] = decode_json(thread.get("tags"))
            for step in thread.get("steps", []):
                step["metadata"] = decode_json(step.get("metadata")) or {}
                step["generation"] = decode_json(step.get("generation"))
                step["tags"] = decode_json(step.get("tags"))
            for element in thread.get("elements", []):
                # The UI reads props as an object; a string would blank a custom element on resume.
                element["props"] = decode_json(element.get("props")) or {}
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
        if (
            step_dict.get("type") == "user_message"
            and step_dict.get("command")
            and not str(step_dict.get("output") or "").strip()
        ):
            # A command picked from the menu is an empty message: stored as `/name`, a resumed chat
            # shows which command ran instead of an empty grey pill.
            step_dict = {**step_dict, "output": f"/{step_dict['command']}"}
        if step_dict.get("type") != "assistant_message":
            await super().create_step(step_dict)
            return
        async with self._answer_writes:
            if not await self._would_undo_a_turn(step_dict):
                await super().create_step(step_dict)

    async def _would_undo_a_turn(self, step_dict) -> bool:
        """Whether this write is a late copy of an answer whose final text (the write that carries its
        turn, `TURN_KEY`) is already stored. Chainlit writes a message in background tasks; an answer
        that ends within milliseconds (a remote server) has its final write (`store_message`) land
        before the first one, which would put back the answer's first chunk."""
        if TURN_KEY in (decode_json(step_dict.get("metadata")) or {}):
            return False
        rows = await self.execute_sql(
            'SELECT "metadata" FROM steps WHERE "id" = :id', {"id": step_dict.get("id")}
        )
        stored = decode_json(rows[0]["metadata"]) if isinstance(rows, list) and rows else None
        return isinstance(stored, dict) and TURN_KEY in stored

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
                    object_key=key, data=content, mime=element.mime or DEFAULT_MIME, overwrite=True
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


def open_data_layer(
    url: str | None = None, files: Path | None = None, commands: Iterable[str] = ()
) -> BablDataLayer:
    """The data layer app.py hands to Chainlit (`@cl.data_layer`); call `prepare_database` first."""
    return BablDataLayer(url, LocalFileStorage(files), commands)
