"""`/train` and `/jobs` on Chainlit: the form (ask widgets), the live progress message with its loss
curve and stop button, and the end of a run. What to show is decided in `babl_core.web.train_ui`; the jobs
themselves are `babl_core.web.jobs`. `app.py` only routes the commands and actions here.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from pathlib import Path

import chainlit as cl

from babl_core.web import jobs, train_ui

log = logging.getLogger("babl.train")

STOP_ACTION, RESUME_ACTION, CHAT_ACTION, COMPARE_ACTION = "stop_training", "resume_training", "chat_with_adapter", "compare_adapter"  # fmt: skip
POLL_S = 1.0
CURVE_EVERY_S = 3.0
WATCHERS = "babl_train_watchers"
ASK_TIMEOUT_S = 600
UPLOAD_TYPES = {"application/jsonl": [".jsonl"], "application/x-ndjson": [".jsonl"],
                "application/json": [".json", ".jsonl"], "text/plain": [".jsonl"],
                "application/octet-stream": [".jsonl"]}  # fmt: skip


def command_of(command: str | None, text: str) -> tuple[str | None, str]:
    """(`train` | `jobs` | None, the text after the command)."""
    stripped = text.strip()
    for name in (train_ui.TRAIN_COMMAND, train_ui.JOBS_COMMAND):
        if command == name:
            return name, stripped
        if stripped.lower() == f"/{name}" or stripped.lower().startswith(f"/{name} "):
            return name, stripped[len(name) + 1 :].strip()
    return None, text


def _user() -> tuple[str, bool]:
    """(the user's id, whether they logged in with a password)."""
    user = cl.user_session.get("user")
    if user is None:
        return "anonymous", False
    return user.identifier, (user.metadata or {}).get("login") == "password"


async def _say(text: str, **kwargs) -> cl.Message:
    message = cl.Message(content=text, author="Babl", **kwargs)
    await message.send()
    return message


async def train(rest: str, attachments: list) -> None:
    """`/train [recipe] [key=value ...]`: the form, then a job that this chat follows."""
    user, logged_in = _user()
    refusal = jobs.training_refusal(logged_in=logged_in)
    if refusal:
        await _say(refusal)
        return
    choices = await asyncio.to_thread(train_ui.recipes)
    if not choices:
        await _say(
            "No recipe can train on this machine: build the demo models first (`python -m babl_core demo`)."
        )
        return
    words = rest.split()
    recipe = train_ui.find_recipe(words[0], choices) if words else None
    if words and recipe is None and "=" not in words[0]:
        names = ", ".join(f"`{choice.name}`" for choice in choices)
        await _say(f"No recipe {words[0]!r} here. The recipes: {names}; or send /train alone and pick one.")
        return
    if recipe is None:
        recipe = await _ask_recipe(choices)
        if recipe is None:
            return
    upload = attachments[0] if attachments else None
    if upload is None and not words:
        upload = await _ask_upload(recipe)
        if upload is False:
            return
    upload_path = Path(upload.path) if upload else None
    if upload_path is not None:
        problems = await asyncio.to_thread(
            train_ui.upload_problems, upload_path, recipe.config, shown_name=upload.name
        )
        if problems:
            await _say(
                "**Nothing was started**: the file does not fit this recipe.\n\n"
                + "\n".join(f"- {p}" for p in problems)
            )
            return
    values = await asyncio.to_thread(train_ui.form_defaults, recipe)
    # Settings typed after the command (`/train demo-python steps=20`) answer the settings question.
    typed = [word for word in words if "=" in word]
    reply = " ".join(typed) if words else None
    job_id = jobs.new_job_id()
    folder = jobs.jobs_dir() / jobs.user_folder(user) / job_id
    stored = folder / "rows.jsonl" if upload_path else None  # checked as JSON Lines above
    for _attempt in range(3):
        if reply is None:
            answer = await cl.AskUserMessage(
                content=train_ui.form_text(recipe, values, uploaded=upload.name if upload else None),
                author="Babl", timeout=ASK_TIMEOUT_S,
            ).send()  # fmt: skip
            if answer is None:
                return
            reply = answer["output"]
        values, problems = train_ui.read_form(reply, values)
        if not problems:
            overrides = train_ui.overrides_for(recipe, values, stored)
            problems = await asyncio.to_thread(_checked, recipe, overrides, upload_path, stored)
        if not problems:
            break
        await _say("**Nothing was started yet**:\n\n" + "\n".join(f"- {p}" for p in problems))
        reply = None
    else:
        return
    job = jobs.Job(
        id=job_id, user=user, recipe=recipe.path, run_name=values["name"], overrides=overrides,
        upload=stored.name if stored else None,
    )  # fmt: skip
    runner = jobs.runner()
    await asyncio.to_thread(runner.submit, job)
    watch(job.id)


def _checked(recipe, overrides: dict, upload_path: Path | None, stored: Path | None) -> list[str]:
    """The schema's check of the form; the upload is copied into the job folder first (the config names
    it there), and removed again when the form is refused."""
    if upload_path is not None:
        stored.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(upload_path, stored)
    problems = train_ui.config_problems(recipe, overrides)
    if problems and stored is not None:
        shutil.rmtree(stored.parent, ignore_errors=True)
    return problems


async def _ask_recipe(choices: list[train_ui.Recipe]) -> train_ui.Recipe | None:
    actions = [
        cl.Action(name="recipe", payload={"recipe": recipe.name}, label=recipe.label,
                  tooltip=f"{recipe.name} ({'pretrained base' if recipe.real else 'demo — random weights'})")
        for recipe in choices
    ]  # fmt: skip
    answer = await cl.AskActionMessage(
        content="**Train a model.** Which recipe? (pretrained bases first)", actions=actions, author="Babl",
        timeout=ASK_TIMEOUT_S,
    ).send()  # fmt: skip
    return train_ui.find_recipe(answer["payload"]["recipe"], choices) if answer else None


async def _ask_upload(recipe: train_ui.Recipe):
    """The uploaded file, None for the recipe's own rows, False when the question timed out."""
    required, optional = train_ui.expected_columns(recipe.config)
    columns = ", ".join(f"`{c}`" for c in required) + (
        f" (optional: {', '.join(f'`{c}`' for c in optional)})" if optional else ""
    )
    choice = await cl.AskActionMessage(
        content=f"Train on your own rows? A JSON Lines file, one object per line with the columns {columns}.",
        actions=[
            cl.Action(name="data", payload={"data": "upload"}, label="Upload a JSONL file"),
            cl.Action(name="data", payload={"data": "recipe"}, label="Use the recipe's rows"),
        ],
        author="Babl",
        timeout=ASK_TIMEOUT_S,
    ).send()
    if choice is None:
        return False
    if choice["payload"]["data"] == "recipe":
        return None
    files = await cl.AskFileMessage(
        content=f"Upload the JSONL file (columns {columns}).", accept=UPLOAD_TYPES,
        max_size_mb=train_ui.MAX_UPLOAD_MB, author="Babl", timeout=ASK_TIMEOUT_S,
    ).send()  # fmt: skip
    return files[0] if files else False


def watch(job_id: str) -> None:
    """Follow the job in the background: the command's turn ends, so the chat keeps answering (and the
    Stop action stays enabled: Chainlit disables actions while a turn runs)."""
    task = asyncio.create_task(_follow_quietly(job_id))  # copies Chainlit's context: messages go here
    watching = cl.user_session.get(WATCHERS) or set()
    watching.add(task)  # held, or the loop may drop the task
    task.add_done_callback(watching.discard)
    cl.user_session.set(WATCHERS, watching)


async def _follow_quietly(job_id: str) -> None:
    try:
        await follow(job_id)
    except Exception:  # the tab went away mid-update: the job goes on, /jobs shows it again
        log.info("stopped following job %s in a closed chat", job_id, exc_info=True)


async def follow(job_id: str) -> None:
    """Keep one message (and its loss curve) up to date until the job ends, then show the result."""
    runner = jobs.runner()
    job = runner.get(job_id)
    message = await _say(train_ui.progress_markdown(job, jobs.read_progress(job.events_path),
                                                    position=runner.position(job.id)))  # fmt: skip
    stop = cl.Action(name=STOP_ACTION, payload={"job": job.id}, label="Stop", icon="square",
                     tooltip="Stop training; the checkpoint is kept, so the run can be resumed")  # fmt: skip
    await stop.send(for_id=message.id)
    curve: cl.Image | None = None
    shown = None
    points, drawn_at = -1, 0.0
    while True:
        job = runner.get(job_id)
        progress = await asyncio.to_thread(jobs.read_progress, job.events_path)
        text = train_ui.progress_markdown(job, progress, position=runner.position(job.id))
        if text != shown:
            message.content = text
            await message.update()
            shown = text
        count = len(progress.train_points) + len(progress.eval_points)
        # Redrawn when the run logged more, at most every CURVE_EVERY_S (each picture is a new file).
        ended = job.state not in jobs.ACTIVE
        if count != points and (ended or time.monotonic() - drawn_at >= CURVE_EVERY_S):
            drawn_at = time.monotonic()
            png = await asyncio.to_thread(train_ui.loss_curve_png, progress, job.run_name)
            if png is not None:
                if curve is None:
                    curve = cl.Image(name="loss curve", content=png, display="inline", size="large")
                    curve.updatable = True  # re-sent with the same id: the picture is replaced in place
                else:
                    curve.content = png
                await curve.send(for_id=message.id, persist=job.state not in jobs.ACTIVE)
                points = count
        if job.state not in jobs.ACTIVE:
            break
        await asyncio.sleep(POLL_S)
    await stop.remove()
    await _ended(job)


async def _ended(job: jobs.Job) -> None:
    if job.state == jobs.FINISHED:
        actions = [
            cl.Action(name=CHAT_ACTION, payload={"model": job.run_name}, label="Chat with it", icon="message-circle",
                      tooltip="Switch this chat to the new adapter"),
            cl.Action(name=COMPARE_ACTION, payload={"model": job.run_name, "task": job.task()}, label="Compare with base",
                      icon="git-compare", tooltip="Ask the adapter an example question, then the base the same"),
        ]  # fmt: skip
        await _say(train_ui.result_markdown(job), actions=actions)
    elif job.resumable:
        resume = cl.Action(name=RESUME_ACTION, payload={"job": job.id}, label="Resume", icon="play",
                           tooltip="Continue from the last checkpoint")  # fmt: skip
        await _say(f"`{job.run_name}` can continue from its checkpoint.", actions=[resume])


async def show_active() -> None:
    """A new chat (a reloaded page, a second tab) follows the user's run that is training or waiting."""
    user, _ = _user()
    runner = jobs.runner()
    for job in runner.jobs(user):
        if job.state in jobs.ACTIVE:
            watch(job.id)


async def jobs_list() -> None:
    """`/jobs`: the table, then (in a reloaded page or a second tab) the running run followed live."""
    user, _ = _user()
    runner = jobs.runner()
    await _say(train_ui.jobs_markdown(runner, user))
    resumable = [job for job in runner.jobs(user) if job.resumable]
    if resumable:
        job = resumable[-1]
        resume = cl.Action(
            name=RESUME_ACTION, payload={"job": job.id}, label=f"Resume {job.run_name}", icon="play"
        )
        await _say(f"`{job.run_name}` stopped with a checkpoint.", actions=[resume])
    active = [job for job in runner.jobs(user) if job.state in jobs.ACTIVE]
    if active:
        watch(active[0].id)


async def stop_job(action: cl.Action) -> None:
    user, _ = _user()
    runner = jobs.runner()
    job = runner.get(action.payload.get("job", ""))
    if job is None or job.user != user:
        return
    await asyncio.to_thread(runner.stop, job.id)


async def resume_job(action: cl.Action) -> None:
    user, _ = _user()
    runner = jobs.runner()
    job = runner.get(action.payload.get("job", ""))
    if job is None or job.user != user or not job.resumable:
        await _say("That run cannot be resumed any more (it was resumed already, or its checkpoint is gone).")
        return
    await action.remove()
    new = await asyncio.to_thread(runner.resume, job.id, user)
    watch(new.id)
