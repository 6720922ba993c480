"""Stored conversations end to end, on SQLite (the default file in the data dir) and on a real
PostgreSQL: `chainlit run app.py` with two password users, driven the way the browser drives it
(Chainlit's HTTP routes and its socket.io session, tests/chainlit_client.py), plus one pass in
headless Chromium for the sidebar and the resumed page.

One server per database for the module; the restart test kills it (SIGKILL: nothing is saved on
the way out) and starts it again on the same database. BABL_RECORD_PROMPTS=1 keeps each answer's
prompt in its turn record, which is how the tests see what the model was given.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import socketio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from babl_core.storage import conversations
from babl_core.web.render import DOWNLOAD_MIME
from tests.chainlit_client import Http, Tab, login, resumed_thread
from tests.servers import launch_chromium, require_playwright, server_env, start_chainlit, stop_chainlit
from tests.test_app_browser import ANSWERS, FOOTER, ask, screenshot, wait_for_answer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

USERS = {"a": "pw1", "b": "pw2"}
SECRET = "babl-history-e2e-secret-" + "0123456789abcdef" * 3  # fixed: logins survive the restart


class AppServer:
    """`chainlit run app.py` on one database, restartable."""

    def __init__(self, backend: str, root: Path, models: Path, db_url: str | None) -> None:
        self.backend = backend
        self.root = root
        self.data = root / "data"
        extra = {"BABL_AUTH": ",".join(f"{u}:{p}" for u, p in USERS.items()), "BABL_RECORD_PROMPTS": "1",
                 "CHAINLIT_AUTH_SECRET": SECRET}  # fmt: skip
        if db_url:
            extra["BABL_DB_URL"] = db_url
        self.env = server_env(models, self.data, **extra)
        # SQLite runs on the default URL (BABL_DB_URL unset): the file in the data dir.
        self.db_url = db_url or f"sqlite+aiosqlite:///{self.data / 'babl.db'}"
        self.runs = 0
        self.process = None
        self.url = ""

    def start(self) -> None:
        self.runs += 1
        self.process, self.url = start_chainlit("app.py", env=self.env, log_path=self.log_path(self.runs))

    def kill_and_restart(self) -> None:
        """SIGKILL, as a crash or a power cut: no shutdown hook, no disconnect handler runs."""
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        self.start()

    def stop(self) -> None:
        stop_chainlit(self.process)

    def log_path(self, run: int) -> Path:
        return self.root / f"chainlit-{run}.log"

    def log(self) -> str:
        return "".join(self.log_path(i).read_text() for i in range(1, self.runs + 1))

    def sql(self, statement: str, **params) -> list[tuple]:
        """Run one statement on the app's database (a connection of the test's own)."""

        async def go() -> list[tuple]:
            engine = create_async_engine(self.db_url)
            try:
                async with engine.begin() as conn:
                    result = await conn.execute(text(statement), params)
                    return [tuple(row) for row in result.fetchall()] if result.returns_rows else []
            finally:
                await engine.dispose()

        # Its own loop in a worker thread: callable from plain tests and from inside a test's loop.
        with ThreadPoolExecutor(max_workers=1) as worker:
            return worker.submit(asyncio.run, go()).result()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request, session_models_dir, tmp_path_factory):
    backend = request.param
    db_url = None
    if backend == "postgresql":
        db_url = request.getfixturevalue("postgres_server").create_database(
            f"babl_e2e_{uuid.uuid4().hex[:8]}"
        )
    app = AppServer(backend, tmp_path_factory.mktemp(f"history-{backend}"), session_models_dir, db_url)
    app.start()
    try:
        yield app
    finally:
        app.stop()
    assert "Traceback" not in app.log(), app.log()[-4000:]


def token(app: AppServer, user: str = "a") -> str:
    return login(app.url, user, USERS[user])


def turns(thread_or_answers) -> list[dict]:
    """The turn records, in order, of a resumed thread's steps or of answers seen live."""
    steps = thread_or_answers["steps"] if isinstance(thread_or_answers, dict) else thread_or_answers
    return [
        s["metadata"][conversations.TURN_KEY]
        for s in steps
        if conversations.TURN_KEY in (s.get("metadata") or {})
    ]


# --------------------------------------------------------------------------------------------------


def test_a_conversation_survives_a_restart_and_resumes_with_its_model_settings_and_history(server):
    session_token = token(server)

    async def converse() -> tuple[str, list[dict], list[str]]:
        tab = await Tab(server.url, session_token).open()
        await tab.change_settings(max_new_tokens=40)  # short answers keep the test fast
        questions = ["A landing page for a bakery", "def add(a, b):", "now subtract"]
        await tab.send(questions[0])  # demo-html: a preview, which holds the page's download
        await tab.change_settings(
            model="demo-python", temperature=0.4, max_new_tokens=32, system_prompt="Be brief."
        )
        for question in questions[1:]:
            await tab.send(question)
        # The tab stays open: the server dies mid-conversation.
        return tab.thread_id, turns(tab.answers()), questions

    thread_id, live, questions = asyncio.run(converse())
    assert [t["model"] for t in live] == ["demo-html", "demo-python", "demo-python"]
    assert [t["question"] for t in live] == questions
    stored_files = sorted(p.name for p in (server.data / "files" / thread_id).glob("*/*"))
    if server.backend == "sqlite":
        assert (server.data / "babl.db").exists()  # the default URL: babl.db in the data dir

    server.kill_and_restart()

    http = Http(server.url, session_token)
    listed = {t["id"]: t["name"] for t in http.threads()}
    assert listed.get(thread_id) == questions[0]

    async def resume() -> tuple[dict, Tab, dict]:
        tab = await Tab(server.url, session_token).open(thread_id)
        thread = resumed_thread(tab)
        await tab.send("and multiply")
        return thread, tab, turns(tab.answers())[-1]

    thread, tab, next_turn = asyncio.run(resume())
    # Every completed answer is there, as the model wrote it, with the model that wrote it.
    assert turns(thread) == live
    assert [s["output"] for s in thread["steps"] if s["type"] == "user_message"][:3] == questions
    # The model and settings in effect before the restart, back in the settings widgets.
    widgets = {w["id"]: w["initial"] for w in tab.widgets()}
    assert widgets["model"] == "demo-python"
    assert widgets["temperature"] == 0.4 and int(widgets["max_new_tokens"]) == 32
    assert widgets["system_prompt"] == "Be brief."
    # The next answer is demo-python's, and its prompt holds the whole conversation.
    assert next_turn["model"] == "demo-python" and next_turn["question"] == "and multiply"
    prompt = next_turn["prompt"]
    for turn in live:
        assert turn["question"] in prompt
        assert turn["answer"].strip()[:30] in prompt
    assert prompt.index(questions[0]) < prompt.index(questions[1]) < prompt.index("and multiply")
    # The preview came back with the thread, with the page its download button saves.
    elements = {e["name"]: e for e in thread["elements"]}
    preview = elements["HtmlPreview"]
    assert preview["props"]["final"] is True and preview["props"]["filename"].endswith(".html")
    assert "default-src 'none'" in preview["props"]["srcdoc"]
    stored = http.get(preview["url"])
    assert stored.status_code == 200 and stored.headers["content-type"] == DOWNLOAD_MIME
    assert stored.headers["content-disposition"].startswith("attachment")
    assert stored.headers["x-content-type-options"] == "nosniff"
    assert json.loads(stored.text)["html"] == preview["props"]["html"] and preview["props"]["html"]
    # Whatever type a stored element claims, it is never served as HTML on the app's origin.
    server.sql('UPDATE elements SET "mime" = \'text/html\' WHERE "id" = :id', id=preview["id"])
    assert http.get(preview["url"]).headers["content-type"] == DOWNLOAD_MIME
    assert stored_files and "HtmlPreview" in set(stored_files)


def test_export_as_markdown_and_json_then_delete_with_its_files(server):
    session_token = token(server)

    async def chat_and_export() -> tuple[str, list[dict], dict]:
        tab = await Tab(server.url, session_token).open()
        await tab.change_settings(max_new_tokens=24)
        await tab.send("A page about tea")
        await tab.send("/export")
        answer = turns(tab.answers())[-1]
        files = [e for e in tab.elements() if e["type"] == "file" and e["name"].startswith("babl-")]
        await tab.close()
        return tab.thread_id, files, answer

    thread_id, exported, answer = asyncio.run(chat_and_export())
    assert sorted(e["name"] for e in exported) == ["babl-a-page-about-tea.json", "babl-a-page-about-tea.md"]
    assert {e["mime"] for e in exported} == {DOWNLOAD_MIME}

    http = Http(server.url, session_token)
    stored = {e["name"]: e for e in http.thread(thread_id).json()["elements"]}
    markdown = http.get(stored["babl-a-page-about-tea.md"]["url"])
    assert markdown.headers["content-type"] == DOWNLOAD_MIME
    assert "### You\n\nA page about tea" in markdown.text and "### `demo-html`" in markdown.text
    document = json.loads(http.get(stored["babl-a-page-about-tea.json"]["url"]).text)
    assert document["messages"] == [
        {"role": "user", "content": "A page about tea"},
        {"role": "assistant", "content": answer["answer"], "model": "demo-html", "stopped": False},
    ]
    assert (server.data / "files" / thread_id).is_dir()
    assert server.sql('SELECT COUNT(*) FROM steps WHERE "threadId" = :t', t=thread_id)[0][0] > 0

    assert http.delete_thread(thread_id).status_code == 200
    assert http.thread(thread_id).status_code == 404
    assert thread_id not in {t["id"] for t in http.threads()}
    for table, column in (("threads", "id"), ("steps", "threadId"), ("elements", "threadId")):
        assert server.sql(f'SELECT COUNT(*) FROM {table} WHERE "{column}" = :t', t=thread_id) == [(0,)], table
    assert not (server.data / "files" / thread_id).exists()
    assert http.get(stored["babl-a-page-about-tea.md"]["url"]).status_code == 404


def test_users_see_and_open_only_their_own_threads(server):
    alice, bob = token(server, "a"), token(server, "b")

    async def alice_chats() -> str:
        tab = await Tab(server.url, alice).open()
        await tab.change_settings(max_new_tokens=16)
        await tab.send("Alice's private page")
        await tab.close()
        return tab.thread_id

    thread_id = asyncio.run(alice_chats())
    mine, theirs = Http(server.url, alice), Http(server.url, bob)
    thread = mine.thread(thread_id).json()
    element = next(e for e in thread["elements"] if e.get("url"))  # the answer's preview, stored as a file

    assert thread_id not in {t["id"] for t in theirs.threads()}
    assert all(t["userIdentifier"] == "b" for t in theirs.threads())
    assert theirs.thread(thread_id).status_code == 401
    assert theirs.get(f"/project/thread/{thread_id}/element/{element['id']}").status_code == 401
    assert theirs.get(element["url"]).status_code == 404  # the same answer as a missing file
    assert theirs.delete_thread(thread_id).status_code == 401
    assert mine.thread(thread_id).status_code == 200  # still there
    assert Http(server.url, "not-a-token").get(element["url"]).status_code == 401

    async def bob_opens_it() -> None:
        tab = Tab(server.url, bob)
        try:
            await tab.open(thread_id)
        finally:
            await tab.close()

    with pytest.raises(socketio.exceptions.ConnectionError):
        asyncio.run(bob_opens_it())

    # Chainlit's element routes take the thread id from the browser: Bob names Alice's thread.
    preview = next(e for e in thread["elements"] if e["name"] == "HtmlPreview")

    async def bob_tampers() -> None:
        tab = await Tab(server.url, bob).open()
        await tab.change_settings(max_new_tokens=8)
        await tab.send("Bob's own question")
        planted = {"id": str(uuid.uuid4()), "threadId": thread_id, "type": "custom", "name": "HtmlPreview",
                   "display": "inline", "forId": preview["forId"], "props": {"srcdoc": "planted"}}  # fmt: skip
        assert (
            theirs.client.put(
                "/project/element", json={"element": planted, "sessionId": tab.session_id}
            ).status_code
            == 200
        )
        removal = {**preview, "props": {}}
        response = theirs.client.request(
            "DELETE", "/project/element", json={"element": removal, "sessionId": tab.session_id}
        )
        assert response.status_code == 200
        await asyncio.sleep(1)  # Chainlit writes elements in background tasks
        await tab.close()

    asyncio.run(bob_tampers())
    after = mine.thread(thread_id).json()
    assert sorted(e["id"] for e in after["elements"]) == sorted(e["id"] for e in thread["elements"])
    assert {p.name for p in (server.data / "files" / thread_id).iterdir()} == {
        e["id"] for e in thread["elements"]
    }
    assert "Refused: writing element" in server.log() and "Refused: deleting element" in server.log()


def test_a_failed_write_is_logged_with_its_cause_and_the_chat_goes_on(server):
    session_token = token(server)

    async def chat() -> tuple[list[dict], str]:
        tab = await Tab(server.url, session_token).open()
        await tab.change_settings(max_new_tokens=16)
        await tab.send("first, stored")
        server.sql('ALTER TABLE steps RENAME TO "steps_away"')
        try:
            await tab.send("second, while the database fails")
        finally:
            server.sql('ALTER TABLE "steps_away" RENAME TO steps')
        await tab.send("third, stored again")
        await tab.close()
        return turns(tab.answers()), tab.thread_id

    answers, thread_id = asyncio.run(chat())
    assert [t["question"] for t in answers] == [
        "first, stored",
        "second, while the database fails",
        "third, stored again",
    ]
    log = server.log()
    assert "ERROR - babl.history - History database error on INSERT steps" in log
    assert "no such table: steps" in log or 'relation "steps" does not exist' in log
    stored = server.sql(
        'SELECT "output" FROM steps WHERE "threadId" = :t AND "type" = \'user_message\' ORDER BY "createdAt"',
        t=thread_id,
    )
    assert [row[0] for row in stored] == ["first, stored", "third, stored again"]


@pytest.mark.parametrize("server", ["sqlite"], indirect=True)
def test_the_sidebar_lists_resumes_and_deletes_a_chat_in_the_browser(server):
    from playwright.sync_api import expect, sync_playwright

    require_playwright()
    session_token = token(server)
    http = Http(server.url, session_token)
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            context.add_cookies([{"name": "access_token", "value": session_token, "url": server.url}])
            page = context.new_page()
            page.goto(server.url)
            expect(page.locator(ANSWERS).first).to_contain_text("Answering with", timeout=30000)
            ask(page, "A landing page for a flower shop")
            first = wait_for_answer(page, 2)
            assert first["model"] == "demo-html"
            thread_id = next(
                t["id"] for t in http.threads() if t["name"] == "A landing page for a flower shop"
            )

            # A new chat, then back to the stored one from the sidebar.
            page.goto(server.url)
            expect(page.locator(ANSWERS).first).to_contain_text("Answering with", timeout=30000)
            entry = page.locator(f"#thread-{thread_id}")
            expect(entry).to_contain_text("A landing page for a flower shop", timeout=30000)
            entry.locator("a").click()
            expect(page).to_have_url(f"{server.url}/thread/{thread_id}", timeout=30000)
            expect(page.locator(ANSWERS).filter(has_text=FOOTER)).to_have_count(1, timeout=30000)
            assert page.get_by_text("A landing page for a flower shop").count() >= 1
            preview = page.get_by_test_id("html-preview").last
            expect(preview).to_be_visible(timeout=15000)
            sandbox = preview.locator("iframe").get_attribute("sandbox")
            assert sandbox is not None and "allow-same-origin" not in sandbox
            screenshot(page, "history-resumed.png")

            # The resumed chat goes on.
            count = page.locator(ANSWERS).count()
            ask(page, "Add a contact form")
            assert wait_for_answer(page, count + 1)["model"] == "demo-html"
            stored = http.thread(thread_id).json()
            assert [t["question"] for t in turns(stored)] == [
                "A landing page for a flower shop",
                "Add a contact form",
            ]
            assert (server.data / "files" / thread_id).is_dir()

            # Deleted from the sidebar: gone from the list, the database and data/files.
            entry.hover()
            entry.locator("#thread-options").click()
            page.locator("#delete-thread").click()
            page.get_by_role("button", name="Confirm").click()
            expect(page.locator(f"#thread-{thread_id}")).to_have_count(0, timeout=30000)
            screenshot(page, "history-deleted.png")
        finally:
            browser.close()
    assert http.thread(thread_id).status_code == 404
    assert server.sql('SELECT COUNT(*) FROM steps WHERE "threadId" = :t', t=thread_id) == [(0,)]
    assert not (server.data / "files" / thread_id).exists()
