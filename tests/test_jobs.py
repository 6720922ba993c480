"""Training jobs from the chat (`babl_core.web.jobs`, `babl_core.web.train_ui`): upload checks, the queue, stop and
resume, restarts, and the job process's tie to the app's life."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from babl_core.web import jobs, train_ui
from tests.conftest import wait_for

REPO_ROOT = Path(__file__).resolve().parent.parent
SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "data"
    monkeypatch.setenv("BABL_DATA_DIR", str(root))
    return root


def recipe(name: str) -> train_ui.Recipe:
    found = train_ui.find_recipe(name, train_ui.recipes())
    assert found is not None, f"{name} is not usable here"
    return found


# --- the uploaded file ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            '{"instruction": "a", "output": "b"}\n{"output": "c"}\n',
            "column 'instruction' is missing or empty on line 2",
        ),
        ('{"instruction": "a", "output": "b"}\nnot json at all\n', "line 2 is not a JSON object"),
        ("\n  \n", "is empty: it has no rows to train on"),
        ("[1, 2]\n", "line 1 is not a JSON object"),
    ],
    ids=["missing-column", "not-json", "empty", "not-an-object"],
)
def test_a_bad_upload_gets_one_clear_message(tmp_path, models_dir, content, expected):
    path = tmp_path / "rows.jsonl"
    path.write_text(content)
    problems = train_ui.upload_problems(path, recipe("demo-python").config, shown_name="rows.jsonl")
    assert len(problems) == 1
    assert expected in problems[0]


def test_a_good_upload_passes_and_the_columns_come_from_the_recipe(tmp_path, models_dir):
    demo = recipe("demo-python")
    assert train_ui.expected_columns(demo.config)[0] == ["instruction", "output"]
    html = recipe("demo-html")
    assert train_ui.expected_columns(html.config)[0] == ["label", "html"]  # mapped by the recipe's columns
    path = tmp_path / "rows.jsonl"
    path.write_text('{"instruction": "add", "input": "", "output": "def add(a, b): return a + b"}\n')
    assert train_ui.upload_problems(path, demo.config, shown_name="rows.jsonl") == []


def test_the_form_reads_settings_and_the_recipe_schema_sets_the_bounds(models_dir):
    demo = recipe("demo-python")
    values = train_ui.form_defaults(demo)
    assert values["steps"] == "60" and values["rank"] == "64" and values["name"] == "demo-python-lora-1"
    assert train_ui.read_form("ok", values) == (values, [])
    changed, problems = train_ui.read_form("steps=0 rank=-2 lr=abc name=Bad Name", values)
    assert problems == []
    found = train_ui.config_problems(demo, train_ui.overrides_for(demo, changed, None))
    text = "\n".join(found)
    assert "steps (max_steps: 0 must be above 0" in text
    assert "LoRA rank (lora_r: -2 must be above 0)" in text
    assert "learning rate (learning_rate: 'abc' is not a number" in text
    _, unknown = train_ui.read_form("speed=3", values)
    assert unknown and "not a setting here" in unknown[0]
    epochs, _ = train_ui.read_form("epochs=2", values)
    assert "steps" not in epochs and train_ui.overrides_for(demo, epochs, None)["max_steps"] == "-1"


# --- progress --------------------------------------------------------------------------------------------
def test_progress_is_read_from_the_runs_events(tmp_path):
    events = tmp_path / "progress.jsonl"
    lines = [
        {"event": "log", "step": 0, "eval_loss": 9.0},  # the base, before training
        {"event": "begin", "step": 0, "total": 40},
        {"event": "step", "step": 5, "total": 40, "seconds": 10.0},
        {"event": "log", "step": 5, "loss": 8.0},
        {"event": "step", "step": 10, "total": 40, "seconds": 20.0},
        {"event": "log", "step": 10, "loss": 7.0, "eval_loss": 7.5},
    ]
    events.write_text("\n".join(json.dumps(line) for line in lines) + '\n{"event": "st')  # a cut last line
    progress = jobs.read_progress(events)
    assert (progress.step, progress.total, progress.loss, progress.eval_loss) == (10, 40, 7.0, 7.5)
    assert progress.base_eval_loss == 9.0
    assert progress.train_points == [(5, 8.0), (10, 7.0)] and progress.eval_points == [(10, 7.5)]
    assert progress.seconds_left == pytest.approx(60.0)  # 2 s a step, 30 steps to go
    assert train_ui.loss_curve_png(progress, "run")[:8] == b"\x89PNG\r\n\x1a\n"


# --- the queue -------------------------------------------------------------------------------------------
def sleeper_job(user: str = "local", name: str = "run") -> jobs.Job:
    job = jobs.Job(id=jobs.new_job_id(), user=user, recipe="configs/finetune/demo-python.yaml", run_name=name)
    return job


def test_a_second_job_waits_with_its_position(data_dir, models_dir, monkeypatch):
    monkeypatch.setattr(jobs.Job, "argv", lambda self: SLEEPER)
    runner = jobs.JobRunner()
    first = runner.submit(sleeper_job(name="first"))
    wait_for(lambda: runner.get(first.id).state == jobs.RUNNING, 30, "the first job to start")
    second = runner.submit(sleeper_job(name="second"))
    third = runner.submit(sleeper_job(name="third"))
    assert runner.get(second.id).state == jobs.QUEUED
    assert (runner.position(second.id), runner.position(third.id)) == (1, 2)
    text = train_ui.jobs_markdown(runner, "local")
    assert "`second` | demo-python | waiting (position 1)" in text
    assert "`first` | demo-python | training" in text
    queued = train_ui.progress_markdown(runner.get(third.id), jobs.Progress(), position=2)
    assert "position 2 in the queue; it starts when the 2 runs ahead of it end" in queued
    runner.stop(second.id)  # a queued job is cancelled
    assert runner.get(second.id).state == jobs.CANCELLED and runner.position(third.id) == 1
    runner.stop(first.id)  # the sleeper dies of SIGINT: stopped, nothing to resume
    wait_for(lambda: runner.get(first.id).state == jobs.STOPPED, 30, "the first job to stop")
    wait_for(lambda: runner.get(third.id).state == jobs.RUNNING, 30, "the next job to start")
    runner.stop(third.id)
    wait_for(lambda: runner.get(third.id).state == jobs.STOPPED, 30, "the third job to stop")
    assert not runner.get(first.id).resumable


def test_a_restart_marks_a_running_job_interrupted_never_finished(data_dir, models_dir):
    job = sleeper_job(name="cut-short")
    job.state = jobs.RUNNING
    job.save()
    checkpoint = models_dir / "checkpoints" / "cut-short" / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    restarted = jobs.JobRunner()
    found = restarted.get(job.id)
    assert found.state == jobs.INTERRUPTED and found.resumable
    assert json.loads((job.folder / jobs.JOB_FILE).read_text())["state"] == jobs.INTERRUPTED
    assert "interrupted" in train_ui.jobs_markdown(restarted, "local")


def test_training_is_refused_when_shared_or_not_logged_in(monkeypatch):
    monkeypatch.delenv("BABL_AUTH", raising=False)
    monkeypatch.delenv("BABL_TUNNEL", raising=False)
    assert jobs.training_refusal(logged_in=False) is None
    monkeypatch.setenv("BABL_AUTH", "ann:secret")
    assert "needs a login" in jobs.training_refusal(logged_in=False)
    assert jobs.training_refusal(logged_in=True) is None
    monkeypatch.setenv("BABL_TUNNEL", "1")
    assert "public tunnel" in jobs.training_refusal(logged_in=True)
    monkeypatch.setenv("BABL_ALLOW_REMOTE_TRAINING", "1")
    assert jobs.training_refusal(logged_in=True) is None


def test_the_thread_budget_leaves_a_core_for_chat(monkeypatch):
    monkeypatch.delenv("BABL_TRAIN_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert jobs.train_threads() == 1
    monkeypatch.setenv("BABL_TRAIN_THREADS", "3")
    assert jobs.train_threads() == 3
    monkeypatch.setenv("BABL_TRAIN_THREADS", "0")
    with pytest.raises(ValueError, match="BABL_TRAIN_THREADS"):
        jobs.train_threads()


# --- the real run ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_stop_keeps_a_checkpoint_and_resume_finishes_the_run(data_dir, models_dir):
    runner = jobs.JobRunner()
    overrides = {"run_name": "stopped-run", "max_steps": "30", "save_steps": "1000", "logging_steps": "2"}
    job = jobs.Job(id=jobs.new_job_id(), user="local", recipe="configs/finetune/demo-python.yaml",
                   run_name="stopped-run", overrides=overrides)  # fmt: skip
    runner.submit(job)
    wait_for(lambda: jobs.read_progress(job.events_path).step >= 2, 180, "two training steps")
    runner.stop(job.id)
    stopped = wait_for(
        lambda: runner.get(job.id).state == jobs.STOPPED and runner.get(job.id), 120, "the stop"
    )
    assert stopped.resumable, (job.log_path.read_text())[-2000:]
    assert list((models_dir / "checkpoints" / "stopped-run").glob("checkpoint-*"))
    assert not (models_dir / "adapters" / "stopped-run").exists()  # nothing published
    assert "--resume true" in stopped.note and jobs.read_progress(job.events_path).stopping
    resumed = runner.resume(job.id, "local")
    done = wait_for(
        lambda: runner.get(resumed.id).state not in jobs.ACTIVE and runner.get(resumed.id), 240, "resume"
    )
    assert done.state == jobs.FINISHED, resumed.log_path.read_text()[-2000:]
    progress = jobs.read_progress(resumed.events_path)
    assert progress.first_step > 0 and progress.step == 30  # continued, not restarted
    assert resumed.metrics()["steps"] == 30


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_the_job_process_ends_when_the_app_ends(tmp_path, data_dir, how):
    # A stand-in for the app: it starts a job the way the app does (JobRunner), prints the job's pid,
    # and waits. However it ends, the job must end with it.
    script = tmp_path / "app.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys, time
            from babl_core.web import jobs
            jobs.Job.argv = lambda self: {SLEEPER!r}
            runner = jobs.JobRunner()
            job = runner.submit(jobs.Job(id="j1", user="local", recipe="r.yaml", run_name="r"))
            while runner._process is None:
                time.sleep(0.05)
            print(runner._process.pid, flush=True)
            time.sleep(120)
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    app = subprocess.Popen(
        [sys.executable, str(script)], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        child = int(app.stdout.readline())
        os.kill(child, 0)  # running
        app.send_signal(how)
        app.wait(timeout=30)

        def gone() -> bool:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                return True
            # A zombie until its new parent reaps it: dead all the same.
            return Path(f"/proc/{child}/stat").read_text().split(")")[1].split()[0] == "Z"

        wait_for(gone, 15, "the job process to end")
    finally:
        app.kill()


def test_the_commands_are_read_typed_or_picked_from_the_menu():
    from babl_core.web.train_chat import command_of

    assert command_of(None, "/train") == ("train", "")
    assert command_of(None, "/train demo-python steps=20") == ("train", "demo-python steps=20")
    assert command_of("train", "demo-python") == ("train", "demo-python")
    assert command_of(None, " /JOBS ") == ("jobs", "")
    assert command_of(None, "/trainer") == (None, "/trainer")
    assert command_of(None, "how do I /train?") == (None, "how do I /train?")
