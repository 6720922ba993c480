"""Fine-tuning from the chat in a real browser (issue 21): `/train` on a demo recipe with an uploaded
JSONL file, the progress message and its growing loss curve, stop (a checkpoint remains), a second run
that completes, "Chat with it", the dropdown listing the new adapter without a restart, `/jobs`, and
the job process ending when the app stops.

The real app.py on the demo models, driven by Debian's headless Chromium through Playwright.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from tests.chat_page import ANSWERS, FOOTER
from tests.conftest import wait_for
from tests.servers import (
    assert_no_traceback,
    launch_chromium,
    require_playwright,
    server_env,
    start_chainlit,
    stop_chainlit,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RECIPE = "Python — demo CodeGen + LoRA"
ROWS = [
    {"instruction": f"Write a function that returns {n} times its argument.", "input": "",
     "output": f"def times_{n}(x):\n    return {n} * x"}
    for n in range(2, 26)
]  # fmt: skip


def job_records(data_dir: Path) -> dict[str, dict]:
    records = {}
    for path in data_dir.glob("jobs/*/*/job.json"):
        record = json.loads(path.read_text())
        records[record["run_name"]] = record
    return records


def upload(page, rows: Path) -> None:
    """`/train` → the recipe → upload `rows`."""
    page.locator("#chat-input").fill("/train")
    page.locator("#chat-input").press("Enter")
    page.get_by_role("button", name=RECIPE).click(timeout=30000)
    page.get_by_role("button", name="Upload a JSONL file").click(timeout=30000)
    page.locator(ANSWERS).filter(has_text="Upload the JSONL file").last.wait_for(timeout=30000)
    page.locator('input[type="file"]').last.set_input_files(str(rows))


def start_training(page, rows: Path, settings: str) -> None:
    """`/train` → the recipe → upload `rows` → the settings reply."""
    upload(page, rows)
    question = page.locator(ANSWERS).filter(has_text="Reply ok to start")
    question.last.wait_for(timeout=30000)
    send(page, settings)


def send(page, text: str) -> None:
    """Type `text` and send it once the chat takes input (after an upload it may wait a moment)."""
    from playwright.sync_api import expect

    sent = page.locator('[data-step-type="user_message"]').filter(has_text=text)
    before = sent.count()
    page.locator("#chat-input").fill(text)
    expect(page.locator("#chat-submit")).to_be_enabled(timeout=30000)
    page.locator("#chat-submit").click()
    expect(sent).to_have_count(before + 1, timeout=30000)


def test_train_from_the_chat(session_models_dir, tmp_path):
    require_playwright()
    from playwright.sync_api import sync_playwright

    models = tmp_path / "models"
    models.mkdir()
    (models / "demo").symlink_to(session_models_dir / "demo", target_is_directory=True)
    (models / "adapters").mkdir()
    data_dir = tmp_path / "data"
    rows = tmp_path / "my-rows.jsonl"
    rows.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    log_path = tmp_path / "chainlit.log"
    env = server_env(models, data_dir, BABL_TRAIN_THREADS="1")
    process, url = start_chainlit("app.py", env=env, log_path=log_path)
    try:
        with sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            page = browser.new_context(viewport={"width": 1280, "height": 1000}).new_page()
            try:
                page.goto(url)
                page.locator(ANSWERS).filter(has_text="Answering with").first.wait_for(timeout=60000)
                run_stopped_then_completed(page, models, data_dir)
                page.screenshot(path=str(tmp_path / "end.png"), full_page=True)
            except BaseException:
                page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
                raise
            finally:
                browser.close()
        # A run still going when the app stops ends with it.
        long_run = job_records(data_dir)["third-run"]
        assert long_run["state"] == "running" and long_run["pid"]
        os.kill(long_run["pid"], 0)
    finally:
        stop_chainlit(process)
    wait_for(
        lambda: not Path(f"/proc/{long_run['pid']}").exists() or _zombie(long_run["pid"]),
        20,
        "the job to end",
    )
    assert_no_traceback(log_path)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except OSError:
        return True


def run_stopped_then_completed(page, models: Path, data_dir: Path) -> None:
    # --- a bad upload: one clear message, no job ----------------------------------------------------
    bad = data_dir.parent / "bad-rows.jsonl"
    bad.write_text('{"instruction": "add two numbers"}\n')
    upload(page, bad)
    refused = page.locator(ANSWERS).filter(has_text="Nothing was started")
    refused.last.wait_for(timeout=30000)
    assert "column 'output' is missing or empty on line 1" in refused.last.inner_text()
    assert job_records(data_dir) == {}

    # --- a first run, followed live, then stopped ---------------------------------------------------
    start_training(page, _rows(data_dir), "steps=5000 name=first-run")
    progress = page.locator(ANSWERS).filter(has_text="Training first-run")
    seen: list[int] = []

    def step_shown() -> bool:
        match = re.search(r"step (\d+) / 5000", progress.last.inner_text())
        if match and (not seen or int(match.group(1)) > seen[-1]):
            seen.append(int(match.group(1)))
        return len(seen) >= 3

    wait_for(step_shown, 180, "the progress message to update")
    curve = page.locator('img[alt="loss curve"]')
    curve.first.wait_for(timeout=60000)
    first_src = curve.first.get_attribute("src")
    wait_for(lambda: curve.first.get_attribute("src") != first_src, 60, "the loss curve to grow")
    page.get_by_role("button", name="Stop").click()
    page.locator(ANSWERS).filter(has_text="can continue from its checkpoint").last.wait_for(timeout=120000)
    record = job_records(data_dir)["first-run"]
    assert record["state"] == "stopped" and record["resumable"]
    assert list((models / "checkpoints" / "first-run").glob("checkpoint-*"))
    assert not (models / "adapters" / "first-run").exists()
    assert "stopped" in progress.last.inner_text()

    # --- a second run that completes -------------------------------------------------------------
    start_training(page, _rows(data_dir), "steps=6 name=second-run")
    done = page.locator(ANSWERS).filter(has_text="second-run is trained")
    done.last.wait_for(timeout=240000)
    assert re.search(r"eval loss \(lower is better\)\s+\d+\.\d{4}\s+\d+\.\d{4}", done.last.inner_text())
    assert job_records(data_dir)["second-run"]["state"] == "finished"
    page.get_by_role("button", name="Chat with it").click()
    page.locator(ANSWERS).filter(has_text="Now answering with").last.wait_for(timeout=60000)
    answers = page.locator(ANSWERS).filter(has_text=FOOTER)
    before = answers.count()
    page.locator("#chat-input").fill("Write a function that doubles a number.")
    page.locator("#chat-input").press("Enter")
    answers.nth(before).wait_for(timeout=60000)
    assert re.search(r"second-run · \d+ tokens", answers.nth(before).inner_text())
    page.locator("#chat-settings-open-modal").click()
    page.locator("#chat-settings #model").click()
    assert page.get_by_role("option", name=re.compile("second-run")).count() >= 1
    page.keyboard.press("Escape")
    page.keyboard.press("Escape")
    page.get_by_role("button", name="Compare with base").first.click()  # the trained run's message
    page.locator(ANSWERS).filter(has_text="The same prompt on the base model").last.wait_for(timeout=60000)

    # --- /jobs, and a run left going for the app's stop ------------------------------------------
    send(page, "/jobs")
    table = page.locator(ANSWERS).filter(has_text="second-run")
    wait_for(lambda: "finished" in table.last.inner_text(), 30, "the jobs table")
    assert "first-run" in table.last.inner_text() and "stopped" in table.last.inner_text()
    start_training(page, _rows(data_dir), "steps=5000 name=third-run")
    page.locator(ANSWERS).filter(has_text="Training third-run").last.wait_for(timeout=60000)
    wait_for(
        lambda: job_records(data_dir).get("third-run", {}).get("state") == "running", 60, "the third run"
    )
    # A second tab follows the running run too.
    other = page.context.new_page()
    other.goto(page.url.split("/thread")[0])
    other.locator(ANSWERS).filter(has_text="Training third-run").first.wait_for(timeout=60000)
    other.close()


def _rows(data_dir: Path) -> Path:
    return data_dir.parent / "my-rows.jsonl"
