"""The history in-process (babl_core.storage, and the resume and export of babl_core.web): the schema (created, idempotent, upgraded), the data layer against
SQLite and a real PostgreSQL (every column Chainlit 2.12 writes, JSON read back as objects, failed
writes logged as errors, deletion with files), the local storage, and the pure parts (turn records,
resume, export). The server flows (restart, resume, other users) are in test_history_e2e.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.ext.asyncio import create_async_engine

from babl_core.engine.cache import ModelCache
from babl_core.engine.catalog import Catalog
from babl_core.engine.service import ChatService, ChatSession
from babl_core.storage import conversations, data_layer, files, schema
from babl_core.web import export, ui
from babl_core.web.render import DOWNLOAD_MIME
from tests.conftest import REPO_ROOT
from tests.servers import free_port

# --------------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path) -> str:
    """An empty database of each kind (PostgreSQL: a fresh database on the session's server)."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'babl.db'}"
    server = request.getfixturevalue("postgres_server")
    return server.create_database(f"babl_{uuid.uuid4().hex[:12]}")


def run(coro):
    return asyncio.run(coro)


async def columns_of(url: str) -> dict[str, set[str]]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:

            def read(sync) -> dict[str, set[str]]:
                found = inspect(sync)
                return {t: {c["name"] for c in found.get_columns(t)} for t in found.get_table_names()}

            return await conn.run_sync(read)
    finally:
        await engine.dispose()


async def execute(url: str, *statements: str) -> list:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            rows = []
            for statement in statements:
                result = await conn.execute(text(statement))
                rows = [tuple(row) for row in result.fetchall()] if result.returns_rows else []
            return rows
    finally:
        await engine.dispose()


def chainlit_context(thread_id: str):
    """An HTTP-session Chainlit context (data-layer writes run at once, not queued)."""
    from chainlit.context import ChainlitContext, context_var
    from chainlit.session import HTTPSession

    context_var.set(
        ChainlitContext(HTTPSession(id=str(uuid.uuid4()), thread_id=thread_id, client_type="webapp"))
    )


async def a_thread(layer: data_layer.BablDataLayer, user: str = "alice") -> tuple[str, dict]:
    """A thread of `user` holding a user message, a tool step, an answer and a preview element, written
    through Chainlit's own objects (so every column Chainlit 2.12 writes is exercised)."""
    import chainlit as cl
    from chainlit.user import User

    thread_id = str(uuid.uuid4())
    chainlit_context(thread_id)
    persisted = await layer.create_user(User(identifier=user, metadata={"login": "password"}))
    await layer.update_thread(thread_id, name="first question", user_id=persisted.id, tags=["babl"])
    question = cl.Message(content="first question", type="user_message", author=user, command="status")
    question.modes = {"tone": "short"}
    await layer.create_step(question.to_dict())
    tool = cl.Step(name="loader for demo-html", type="tool", default_open=True, auto_collapse=True)
    tool.output = "float32 on cpu"
    await layer.create_step(tool.to_dict())
    answer = cl.Message(content="**answer**", author="demo-html", metadata={"babl_turn": {"answer": "raw"}})
    await layer.create_step(answer.to_dict())
    preview = cl.CustomElement(
        name="HtmlPreview", props={"srcdoc": "<p>hi</p>", "final": True}, display="inline"
    )
    preview.for_id = answer.id
    await layer.create_element(preview)
    page = cl.File(name="page.html", content=b"<p>hi</p>", mime=DOWNLOAD_MIME, display="inline")
    page.for_id = answer.id
    await layer.create_element(page)
    return thread_id, {"answer": answer.id, "preview": preview.id, "page": page.id}


# --------------------------------------------------------------------------------------------------
# Schema


def test_schema_is_created_complete_and_a_second_start_changes_nothing(db):
    assert schema.prepare_database(db) == []
    found = run(columns_of(db))
    for table in schema.METADATA.sorted_tables:
        assert found[table.name] == {c.name for c in table.columns}, table.name
    # The step columns Chainlit 2.12 writes beyond its documented schema.
    assert {"autoCollapse", "defaultOpen", "command", "modes"} <= found["steps"]
    assert schema.prepare_database(db) == []
    assert run(columns_of(db)) == found


def test_an_older_schema_gets_the_missing_columns_and_keeps_its_rows(db):
    # Chainlit's documented schema of older releases: no command/modes/defaultOpen/autoCollapse on
    # steps, no autoPlay/playerConfig on elements.
    run(
        execute(
            db,
            'CREATE TABLE users ("id" TEXT PRIMARY KEY, "identifier" TEXT NOT NULL UNIQUE, '
            '"metadata" TEXT, "createdAt" TEXT)',
            'CREATE TABLE threads ("id" TEXT PRIMARY KEY, "createdAt" TEXT, "name" TEXT, "userId" TEXT, '
            '"userIdentifier" TEXT, "tags" TEXT, "metadata" TEXT)',
            'CREATE TABLE steps ("id" TEXT PRIMARY KEY, "name" TEXT NOT NULL, "type" TEXT NOT NULL, '
            '"threadId" TEXT NOT NULL, "parentId" TEXT, "streaming" BOOLEAN NOT NULL, "waitForAnswer" BOOLEAN, '
            '"isError" BOOLEAN, "metadata" TEXT, "tags" TEXT, "input" TEXT, "output" TEXT, "createdAt" TEXT, '
            '"start" TEXT, "end" TEXT, "generation" TEXT, "showInput" TEXT, "language" TEXT, "indent" INT)',
            'CREATE TABLE elements ("id" TEXT PRIMARY KEY, "threadId" TEXT, "type" TEXT, "url" TEXT, '
            '"chainlitKey" TEXT, "name" TEXT NOT NULL, "display" TEXT, "objectKey" TEXT, "size" TEXT, '
            '"page" INT, "language" TEXT, "forId" TEXT, "mime" TEXT, "props" TEXT)',
            "INSERT INTO threads (\"id\", \"name\") VALUES ('t-old', 'kept')",
            'INSERT INTO steps ("id", "name", "type", "threadId", "streaming", "output") '
            "VALUES ('s-old', 'demo-html', 'assistant_message', 't-old', false, 'an old answer')",
        )
    )
    added = schema.prepare_database(db)
    assert set(added) == {
        "steps.command", "steps.modes", "steps.defaultOpen", "steps.autoCollapse",
        "elements.autoPlay", "elements.playerConfig",
    }  # fmt: skip
    found = run(columns_of(db))
    assert {"command", "modes", "defaultOpen", "autoCollapse"} <= found["steps"]
    assert "feedbacks" in found  # a missing table is created
    assert run(execute(db, 'SELECT "output" FROM steps WHERE "id" = \'s-old\'')) == [("an old answer",)]
    assert schema.prepare_database(db) == []


def test_bad_urls_and_unreachable_servers_stop_the_start_with_the_fix(monkeypatch, tmp_path):
    with pytest.raises(schema.HistoryUnavailable) as wrong_driver:
        schema.prepare_database("postgresql://babl:s3cret@127.0.0.1/babl")
    assert "postgresql+asyncpg://babl:***@127.0.0.1/babl" in str(wrong_driver.value)
    assert "s3cret" not in str(wrong_driver.value)
    with pytest.raises(schema.HistoryUnavailable, match="'mysql' is not supported"):
        schema.prepare_database("mysql+aiomysql://u@h/db")
    port = free_port()  # nothing listens on it
    with pytest.raises(schema.HistoryUnavailable) as down:
        schema.prepare_database(f"postgresql+asyncpg://babl:s3cret@127.0.0.1:{port}/babl")
    message = str(down.value)
    assert "BABL_DB_URL" in message and "cannot be used" in message and "s3cret" not in message

    monkeypatch.delenv("BABL_DB_URL", raising=False)
    monkeypatch.setenv("BABL_DATA_DIR", str(tmp_path / "state"))
    assert schema.db_url() == f"sqlite+aiosqlite:///{tmp_path / 'state' / 'babl.db'}"
    assert schema.prepare_database() == []
    assert (tmp_path / "state" / "babl.db").exists()


@pytest.mark.parametrize(
    "where",
    ["under-a-file", "in-proc", "memory", "memory-uri", "no-path"],
)
def test_an_unusable_sqlite_url_stops_the_start_with_one_line(where, tmp_path, capfd):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    url = {
        "under-a-file": f"sqlite+aiosqlite:///{a_file}/history/babl.db",
        "in-proc": "sqlite+aiosqlite:////proc/babl.db",
        "memory": "sqlite+aiosqlite:///:memory:",
        "memory-uri": "sqlite+aiosqlite:///file::memory:?cache=shared&uri=true",
        "no-path": "sqlite+aiosqlite://",
    }[where]
    with pytest.raises(schema.HistoryUnavailable) as stopped:
        schema.prepare_database(url)
    message = str(stopped.value)
    assert "\n" not in message, message
    assert "BABL_DB_URL" in message
    assert ("in-memory" in message) == where.startswith(("memory", "no-path")), message
    assert "Traceback" not in capfd.readouterr().err  # no worker thread printed one either
    assert not (tmp_path / "a-file").is_dir()


# --------------------------------------------------------------------------------------------------
# The data layer


def test_a_late_streaming_write_never_replaces_a_stored_answer(tmp_path):
    """Chainlit writes messages in background tasks: for an answer that ends within milliseconds its
    first write (the first chunk) can land after the final one, which carries the turn."""
    import chainlit as cl

    db = f"sqlite+aiosqlite:///{tmp_path / 'babl.db'}"
    schema.prepare_database(db)

    async def go():
        layer = data_layer.open_data_layer(db, tmp_path / "files")
        try:
            thread_id, ids = await a_thread(layer)  # its answer was stored with its turn
            late = cl.Message(content="**ans", author="demo-html", id=ids["answer"])
            late.thread_id = thread_id
            await layer.create_step(late.to_dict())
            fresh = cl.Message(content="a new answer, first chunk", author="demo-html")
            fresh.thread_id = thread_id
            await layer.create_step(fresh.to_dict())  # steps without a stored turn are written as ever
            return ids, fresh.id, await layer.get_thread(thread_id)
        finally:
            await layer.close()

    ids, fresh_id, thread = run(go())
    steps = {s["id"]: s for s in thread["steps"]}
    assert steps[ids["answer"]]["output"] == "**answer**"
    assert steps[ids["answer"]]["metadata"] == {"babl_turn": {"answer": "raw"}}
    assert steps[fresh_id]["output"] == "a new answer, first chunk"


def test_every_column_chainlit_writes_is_stored_and_read_back_as_objects(db, tmp_path):
    schema.prepare_database(db)

    async def go():
        layer = data_layer.open_data_layer(db, tmp_path / "files")
        try:
            thread_id, ids = await a_thread(layer)
            await layer.update_thread(thread_id, metadata={conversations.SESSION_KEY: {"model": "demo-html"}})
            return thread_id, ids, await layer.get_thread(thread_id), list(layer.failures)
        finally:
            await layer.close()

    thread_id, ids, thread, failures = run(go())
    assert failures == []  # no write failed: every column written exists with a fitting type
    assert thread["userIdentifier"] == "alice" and thread["name"] == "first question"
    assert thread["metadata"][conversations.SESSION_KEY] == {"model": "demo-html"}
    assert thread["tags"] == ["babl"]
    answer = next(s for s in thread["steps"] if s["id"] == ids["answer"])
    assert answer["metadata"] == {"babl_turn": {"answer": "raw"}} and answer["output"] == "**answer**"
    assert sorted(s["type"] for s in thread["steps"]) == ["assistant_message", "tool", "user_message"]
    preview = next(e for e in thread["elements"] if e["id"] == ids["preview"])
    assert preview["props"] == {"srcdoc": "<p>hi</p>", "final": True}  # an object, as the UI needs
    page = next(e for e in thread["elements"] if e["id"] == ids["page"])
    assert page["url"] == f"{files.FILES_ROUTE}/{thread_id}/{ids['page']}/page.html"
    assert (tmp_path / "files" / thread_id / ids["page"] / "page.html").read_bytes() == b"<p>hi</p>"


def test_chats_that_only_ran_commands_are_not_listed_in_the_sidebar(tmp_path):
    import chainlit as cl
    from chainlit.types import Pagination, ThreadFilter
    from chainlit.user import User

    url = f"sqlite+aiosqlite:///{tmp_path / 'babl.db'}"
    schema.prepare_database(url)

    async def a_chat(layer, user_id, *messages):
        thread_id = str(uuid.uuid4())
        chainlit_context(thread_id)
        await layer.update_thread(thread_id, name=messages[0], user_id=user_id)
        for message in messages:
            # An empty message is a command picked from the menu (Chainlit sends its name apart).
            command = "export" if not message else None
            step = cl.Message(content=message, type="user_message", author="alice", command=command)
            await layer.create_step(step.to_dict())
            await layer.create_step(cl.Message(content="an answer", author="Babl").to_dict())
        return thread_id

    async def go():
        layer = data_layer.open_data_layer(url, tmp_path / "files", commands=ui.COMMAND_IDS)
        try:
            user = await layer.create_user(User(identifier="alice"))
            commands = await a_chat(layer, user.id, "", "/status", "/EXPORT ")
            chat = await a_chat(layer, user.id, "/status", "What is a tensor?")
            listed = await layer.list_threads(Pagination(first=20), ThreadFilter(userId=user.id))
            return commands, chat, [t["id"] for t in listed.data], await layer.get_thread(commands)
        finally:
            await layer.close()

    commands, chat, listed, opened = run(go())
    assert listed == [chat]  # a chat with a question is listed, even when it began with a command
    assert opened is not None and opened["id"] == commands  # still stored, and opens by its link
    shown = [s["output"] for s in opened["steps"] if s["type"] == "user_message"]
    assert shown == ["/export", "/status", "/EXPORT "]  # the picked command is stored by its name


def test_a_failed_write_is_an_error_in_the_log_with_its_cause(db, tmp_path, caplog):
    schema.prepare_database(db)

    async def go():
        import chainlit as cl

        layer = data_layer.open_data_layer(db, tmp_path / "files")
        try:
            thread_id, _ = await a_thread(layer)
            await execute(db, 'ALTER TABLE steps RENAME TO "steps_elsewhere"')
            chainlit_context(thread_id)
            await layer.create_step(cl.Message(content="lost", author="demo-html").to_dict())  # no exception
            return list(layer.failures)
        finally:
            await layer.close()

    with caplog.at_level(logging.ERROR, logger="babl.history"):
        failures = run(go())
    errors = [r for r in caplog.records if r.name == "babl.history" and r.levelno == logging.ERROR]
    assert errors, caplog.text
    message = errors[-1].getMessage()
    assert "INSERT steps failed" in message
    assert "no such table: steps" in message or 'relation "steps" does not exist' in message
    assert "The chat goes on" in message and failures and "INSERT steps" in failures[-1]


def test_deleting_a_thread_removes_its_rows_and_its_files(db, tmp_path):
    schema.prepare_database(db)
    files = tmp_path / "files"

    async def go():
        layer = data_layer.open_data_layer(db, files)
        try:
            doomed, _ = await a_thread(layer)
            kept, _ = await a_thread(layer, user="bob")
            (files / doomed / "orphan").mkdir()  # a file whose row was never written
            (files / doomed / "orphan" / "x.bin").write_bytes(b"x")
            await layer.delete_thread(doomed)
            # An open tab persists its session when it disconnects: the thread must stay gone.
            await layer.update_thread(doomed, metadata={"chat_settings": {"model": "demo-html"}})
            counts = {
                table: (await layer.execute_sql(f'SELECT COUNT(*) AS n FROM {table} WHERE "threadId" = :t', {"t": doomed}))[0]["n"]
                for table in ("steps", "elements")
            }  # fmt: skip
            rows = await layer.execute_sql('SELECT "id" FROM threads WHERE "id" = :t', {"t": doomed})
            author = await layer.get_thread_author(doomed)
            kept_thread = await layer.get_thread(kept)
            return doomed, kept, counts, rows, author, kept_thread
        finally:
            await layer.close()

    doomed, kept, counts, rows, author, kept_thread = run(go())
    assert counts == {"steps": 0, "elements": 0} and rows == []
    assert author == ""  # Chainlit's routes answer 404 for it
    assert not (files / doomed).exists()
    assert (files / kept).is_dir() and len(kept_thread["elements"]) == 2


def test_storage_keys_stay_inside_the_files_folder(tmp_path):
    storage = files.LocalFileStorage(tmp_path / "files")
    for key in ("../x", "a/../../b", "/etc/passwd", "a//b", "a/./b", "", "a/b\\c", "a/..."):
        with pytest.raises(ValueError):
            storage.path_for(key)
    assert files.safe_file_name("../../etc/passwd") == "etc_passwd"
    assert files.safe_file_name("..") == "file"

    async def go():
        stored = await storage.upload_file("t1/e1/page.html", "<p>x</p>", mime="text/html")
        assert stored == {"object_key": "t1/e1/page.html", "url": "/babl/files/t1/e1/page.html"}
        assert (tmp_path / "files" / "t1" / "e1" / "page.html").read_text() == "<p>x</p>"
        assert await storage.delete_file("t1/e1/page.html") is True
        assert await storage.delete_file("t1/e1/page.html") is False

    run(go())
    assert not (tmp_path / "files" / "t1").exists()  # empty folders pruned


# --------------------------------------------------------------------------------------------------
# Turns, resume and export (plain data)


def _turn_step(question_id: str, question: str, answer: str, model: str, *, stopped: bool = False) -> dict:
    record = {
        "question_id": question_id,
        "question": question,
        "answer": answer,
        "model": model,
        "stopped": stopped,
    }
    # As SQLite hands it back: metadata as a JSON string.
    return {
        "id": str(uuid.uuid4()),
        "type": "assistant_message",
        "metadata": json.dumps({conversations.TURN_KEY: record}),
    }


def _choices():
    return ui.model_choices(Catalog.load(REPO_ROOT / "configs" / "models.yaml").list())


def test_a_resumed_state_has_the_stored_messages_model_and_settings(models_dir):
    choices = _choices()
    thread = {
        "id": "thread-1",
        "metadata": json.dumps(
            {
                conversations.SESSION_KEY: {
                    "model": "demo-python",
                    "temperature": 0.3,
                    "top_p": 0.9,
                    "max_new_tokens": 64,
                    "system_prompt": "Be brief.",
                    "html_preview": False,
                }
            }
        ),
        "steps": [
            {"id": "w", "type": "assistant_message", "metadata": "{}", "output": "Welcome"},
            _turn_step("q1", "a page", "<p>page</p>", "demo-html"),
            {"id": "s", "type": "assistant_message", "metadata": {}, "output": "Now answering with ..."},
            _turn_step("q2", "def add(a, b):", "return a + b", "demo-python", stopped=True),
        ],
    }
    state, notes = ui.resumed_state(thread, choices, ui.find_choice(choices, "demo-html"))
    assert notes == []
    assert state.chat.model_id == "demo-python" and state.chat.id == "thread-1"
    assert state.chat.settings == {"temperature": 0.3, "top_p": 0.9, "max_new_tokens": 64}
    assert state.chat.system_prompt == "Be brief." and state.preview is False
    assert state.chat.messages == [
        {"role": "user", "content": "a page"},
        {"role": "assistant", "content": "<p>page</p>", "model": "demo-html", "stopped": False},
        {"role": "user", "content": "def add(a, b):"},
        {"role": "assistant", "content": "return a + b", "model": "demo-python", "stopped": True},
    ]
    assert state.marks == {"q1": 0, "q2": 2}
    # An edit of the first question after the resume rewinds to before it, as in a live chat.
    assert state.begin_turn("q1") is True and state.chat.messages == []


def test_a_stored_model_that_is_gone_falls_back_with_a_note(models_dir):
    choices = _choices()
    default = ui.find_choice(choices, "demo-html")
    thread = {
        "metadata": {"chat_settings": {"model": "retired-model", "max_new_tokens": "lots"}},
        "steps": [_turn_step("q1", "hello", "hi", "retired-model")],
    }
    state, notes = ui.resumed_state(thread, choices, default)
    assert state.chat.model_id == "demo-html"
    assert "`retired-model`" in notes[0] and "not in the catalog" in notes[0] and "kept" in notes[0]
    assert any("Max new tokens 'lots' is not valid" in note for note in notes)
    assert state.chat.settings["max_new_tokens"] == 200  # demo-html's default
    assert state.chat.messages[1]["model"] == "retired-model"  # who wrote it stays recorded
    # Needs training here: refused with its availability word.
    state, notes = ui.resumed_state(
        {"metadata": {conversations.SESSION_KEY: {"model": "email-t5"}}}, choices, default
    )
    assert state.chat.model_id == "demo-html" and "needs-training" in notes[0]
    assert ui.resumed_state({}, choices, None)[0] is None


def test_turn_records_hold_the_raw_answer_the_model_and_optionally_the_prompt(models_dir, monkeypatch):
    service = ChatService(Catalog.load(REPO_ROOT / "configs" / "models.yaml"), ModelCache())
    chat = ChatSession(model_id="demo-python", settings={"max_new_tokens": 8})

    async def answer(text: str):
        reply = service.respond(chat, text)
        async for _ in reply:
            pass
        return reply

    reply = run(answer("def add(a, b):"))
    record = ui.turn_record(chat, reply, question_id="q1")
    assert record["question"] == "def add(a, b):" and record["question_id"] == "q1"
    assert record["answer"] == reply.text and record["model"] == "demo-python" and record["stopped"] is False
    assert "prompt" not in record
    monkeypatch.setenv("BABL_RECORD_PROMPTS", "1")
    second = run(answer("and subtract"))
    record = ui.turn_record(chat, second, question_id="q2")
    assert "def add(a, b):" in record["prompt"] and reply.text in record["prompt"]  # the history went in
    stateless = service.complete("demo-python", [{"role": "user", "content": "x"}], max_new_tokens=2)
    run(_drain(stateless))
    assert ui.turn_record(chat, stateless, question_id="q3") is None  # not part of the chat


async def _drain(reply) -> None:
    async for _ in reply:
        pass


def test_export_markdown_and_json():
    chat = ChatSession(
        model_id="demo-html",
        settings={"temperature": 0.0, "max_new_tokens": 200},
        system_prompt="Be brief.",
        messages=[
            {"role": "user", "content": "Write add\nin Python"},
            {
                "role": "assistant",
                "content": "def add(a, b):\n    return a + b",
                "model": "demo-python",
                "stopped": False,
            },
            {"role": "user", "content": "A landing page"},
            {"role": "assistant", "content": "<p>x</p>", "model": "demo-html", "stopped": True},
        ],
    )
    markdown = export.export_markdown(
        chat, tasks={"demo-python": "python"}, exported_at="2026-11-23T10:00:00Z"
    )
    assert markdown.startswith("# Write add\n\n*Exported from Babl 2026-11-23T10:00:00Z · model `demo-html`")
    assert "**System prompt:** Be brief." in markdown
    assert "### You\n\nWrite add\nin Python" in markdown
    assert "### `demo-python`\n\n```python\ndef add(a, b):\n    return a + b\n```" in markdown
    assert "### `demo-html`\n\n<p>x</p>\n\n*(stopped)*" in markdown  # unknown task: the raw text
    document = json.loads(export.export_json(chat, preview=True, exported_at="2026-11-23T10:00:00Z"))
    assert document["format"] == "babl-conversation" and document["model"] == "demo-html"
    assert document["messages"] == chat.messages and document["html_preview"] is True
    files = export.export_attachments(chat)
    assert [f["name"] for f in files] == ["babl-write-add.md", "babl-write-add.json"]
    assert {f["mime"] for f in files} == {DOWNLOAD_MIME}
    assert json.loads(files[1]["content"])["messages"] == chat.messages


def test_a_database_made_before_the_layout_move_opens_and_resumes_its_chats(tmp_path, models_dir):
    """tests/assets/history-before-layout.db was written by the history code of before babl_core was
    split into engine/web/storage (DDL strings): the schema of today opens it, adds nothing to it and
    resumes its chat with the stored messages, model and settings."""
    import shutil

    path = tmp_path / "babl.db"
    shutil.copy(REPO_ROOT / "tests" / "assets" / "history-before-layout.db", path)
    url = f"sqlite+aiosqlite:///{path}"
    assert schema.prepare_database(url) == []
    thread_id = "7d0c8a52-3c1e-4d35-9d6a-0b1d2b7c0f11"

    async def read():
        layer = data_layer.BablDataLayer(url, files.LocalFileStorage(tmp_path / "files"))
        try:
            owner = await layer.thread_owner(thread_id)
            return owner, await layer.get_thread(thread_id), list(layer.failures)
        finally:
            await layer.engine.dispose()

    owner, thread, failures = run(read())
    assert owner == "alice" and failures == []
    choices = _choices()
    state, notes = ui.resumed_state(thread, choices, ui.find_choice(choices, "demo-html"))
    assert notes == []
    assert state.chat.id == thread_id and state.chat.model_id == "demo-python"
    assert state.chat.settings == {"temperature": 0.3, "top_p": 0.9, "max_new_tokens": 64}
    assert state.chat.system_prompt == "Be brief." and state.preview is False
    assert [(m["role"], m["content"]) for m in state.chat.messages] == [
        ("user", "a page"),
        ("assistant", "<p>page</p>"),
        ("user", "def add(a, b):"),
        ("assistant", "return a + b"),
    ]
    assert state.chat.messages[-1]["stopped"] is True and len(state.marks) == 2
