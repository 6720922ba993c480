"""Training jobs started from the chat: records, a one-at-a-time queue, and the job process.

A job is `python -m finetune train --config <recipe> --key value ...` — the CLI's own code path — run as
a child process tied to this app's life (`llama_cpp.spawn_tied`: PR_SET_PDEATHSIG, so the run ends when
the app ends, however it ends). One job runs at a time on a machine; the others wait in order. The child
gets a thread budget (`BABL_TRAIN_THREADS`, default all cores but one, so the chat keeps answering).

Everything a job has lives under `data/jobs/<user>/<job id>/`: `job.json` (its record, rewritten on every
change of state), the uploaded rows, `train.log` (the run's output) and `progress.jsonl` (what the run's
`finetune.progress.RunEvents` writes: steps, losses). A restarted app finds records that say "running"
whose process is gone and marks them interrupted (resumable when a checkpoint remains), never finished.

Stop sends SIGINT: the run saves a checkpoint at the end of its step and exits (`GracefulStop`); the job
is then "stopped", and `resume` queues the same run again with `--resume true`.

This module knows nothing about Chainlit; `babl_core.web.train_ui` turns jobs into chat messages.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from babl_core import settings

QUEUED, RUNNING, STOPPING, STOPPED, FINISHED, FAILED, INTERRUPTED, CANCELLED = (
    "queued", "running", "stopping", "stopped", "finished", "failed", "interrupted", "cancelled",
)  # fmt: skip
ACTIVE = (QUEUED, RUNNING, STOPPING)
STATE_WORDS = {
    QUEUED: "waiting",
    RUNNING: "training",
    STOPPING: "stopping (saving a checkpoint)",
    STOPPED: "stopped",
    FINISHED: "finished",
    FAILED: "failed",
    INTERRUPTED: "interrupted (the app stopped while it ran)",
    CANCELLED: "cancelled before it started",
}
JOB_FILE, LOG_FILE, EVENTS_FILE = "job.json", "train.log", "progress.jsonl"
STOP_GRACE_S = 120  # after SIGINT, how long a run may take to finish its step and save before SIGKILL


def train_threads() -> int:
    """`BABL_TRAIN_THREADS`, else every core but one (at least one): the spare core keeps chat answering."""
    default = max(1, (os.cpu_count() or 1) - 1)
    value = settings.env_int("BABL_TRAIN_THREADS", default)
    if value < 1:
        raise ValueError(f"BABL_TRAIN_THREADS={value} is not valid; use a whole number ≥ 1, e.g. {default}")
    return value


def training_refusal(*, logged_in: bool) -> str | None:
    """Why this visitor may not train here, or None when they may.

    With `BABL_AUTH` set only logged-in users train; with the tunnel open (or asked for) training is off
    unless `BABL_ALLOW_REMOTE_TRAINING=1`, since a job takes this machine's cores for minutes.
    """
    from babl_core.web import tunnel

    if os.environ.get("BABL_AUTH") and not logged_in:
        return "Training needs a login on this server: log in, then send /train again."
    if (settings.env_flag("BABL_TUNNEL") or tunnel.tunnel_url()) and not settings.env_flag(
        "BABL_ALLOW_REMOTE_TRAINING"
    ):
        return (
            "Training from the chat is off while the app is shared through a public tunnel. To allow it, "
            "restart with BABL_ALLOW_REMOTE_TRAINING=1, or train in a terminal with `python -m finetune train`."
        )
    return None


def user_folder(user: str) -> str:
    """A folder name for a user id (letters, digits, '-', '_', '.'; others become '_')."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", user).strip(".") or "_"


def jobs_dir() -> Path:
    return settings.data_dir() / "jobs"


@dataclass
class Job:
    """One training run asked for from the chat; `job.json` holds exactly these fields."""

    id: str
    user: str
    recipe: str  # the recipe YAML, as a repo-relative path where possible
    run_name: str
    overrides: dict[str, str] = field(default_factory=dict)  # config keys given in the form
    upload: str | None = None  # the uploaded rows' file name inside the job folder
    state: str = QUEUED
    created: float = 0.0
    started: float | None = None
    ended: float | None = None
    exit_code: int | None = None
    note: str = ""  # why it failed, or what to do next
    resumable: bool = False
    resumes: str | None = None  # the job id this one continues
    pid: int | None = None  # the run's process while it runs

    @property
    def folder(self) -> Path:
        return jobs_dir() / user_folder(self.user) / self.id

    @property
    def events_path(self) -> Path:
        return self.folder / EVENTS_FILE

    @property
    def log_path(self) -> Path:
        return self.folder / LOG_FILE

    def save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = self.folder / f".{JOB_FILE}.tmp"
        partial.write_text(json.dumps(asdict(self), indent=1) + "\n", encoding="utf-8")
        partial.replace(self.folder / JOB_FILE)  # readers never see half a record

    def argv(self) -> list[str]:
        """The command the job runs: the CLI's `train`, with the form's settings as options."""
        argv = [sys.executable, "-m", "finetune", "train", "--config", self.recipe]
        for key, value in self.overrides.items():
            argv += [f"--{key}", str(value)]
        return argv

    def checkpoint_dir(self) -> Path:
        chosen = self.overrides.get("checkpoint_dir")
        return (
            settings.resolve_path(chosen) if chosen else settings.models_dir() / "checkpoints" / self.run_name
        )

    def has_checkpoint(self) -> bool:
        from finetune.outputs import last_checkpoint

        return last_checkpoint(self.checkpoint_dir()) is not None

    def adapter_dir(self) -> Path:
        return settings.adapters_dir() / self.run_name

    def metrics(self) -> dict:
        """The finished adapter's metrics from its babl.json ({} when there is none)."""
        try:
            return json.loads((self.adapter_dir() / "babl.json").read_text(encoding="utf-8")).get(
                "metrics", {}
            )
        except (OSError, ValueError):
            return {}

    def task(self) -> str | None:
        """The finished adapter's task (html, python, ...), from its babl.json."""
        try:
            return json.loads((self.adapter_dir() / "babl.json").read_text(encoding="utf-8")).get("task")
        except (OSError, ValueError):
            return None

    def resume_command(self) -> str:
        options = {**self.overrides, "resume": "true"}
        options.pop("overwrite", None)
        from finetune.outputs import python_command  # the checkout's .venv/bin/python, as the CLI says it

        return f"{python_command()} -m finetune train --config " + " ".join(
            [self.recipe, *(f"--{key} {value}" for key, value in options.items())]
        )


def new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


# --------------------------------------------------------------------------------------------------
# What a run has written so far


@dataclass
class Progress:
    """A run's progress read from its events file."""

    step: int = 0
    total: int | None = None
    seconds: float | None = None  # since training began (this session)
    first_step: int = 0  # the step this session began at (a resumed run starts past 0)
    loss: float | None = None
    eval_loss: float | None = None
    base_eval_loss: float | None = None
    train_points: list[tuple[int, float]] = field(default_factory=list)
    eval_points: list[tuple[int, float]] = field(default_factory=list)
    stopping: bool = False

    @property
    def seconds_left(self) -> float | None:
        done = self.step - self.first_step
        if not self.total or self.seconds is None or done <= 0:
            return None
        return max(0.0, self.seconds / done * (self.total - self.step))


def read_progress(path: Path) -> Progress:
    """Fold the JSON lines of `path` into a `Progress` (a missing file or a cut last line is fine)."""
    progress = Progress()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return progress
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue  # the line being written
        kind = event.get("event")
        if kind == "begin":
            progress.first_step = progress.step = int(event.get("step", 0))
            progress.total = event.get("total")
        elif kind == "step":
            progress.step, progress.total = int(event["step"]), event.get("total")
            progress.seconds = event.get("seconds")
        elif kind == "log":
            step = int(event.get("step", 0))
            if "loss" in event:
                progress.loss = event["loss"]
                progress.train_points.append((step, event["loss"]))
            if "eval_loss" in event:
                if step == 0 and progress.total is None:
                    progress.base_eval_loss = event["eval_loss"]  # the base model, before training
                else:
                    progress.eval_loss = event["eval_loss"]
                    progress.eval_points.append((step, event["eval_loss"]))
        elif kind == "stopping":
            progress.stopping = True
    return progress


def last_problem(log_path: Path, lines: int = 6) -> str:
    """The run's own explanation of a failure: its last `finetune:` lines, else its last lines."""
    try:
        text = log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    # tqdm redraws with carriage returns: keep what the last redraw left on each line.
    rows = [row.rsplit("\r", 1)[-1].rstrip() for row in text.splitlines()]
    rows = [row for row in rows if row]
    ours = [row for row in rows if row.startswith("finetune:")]
    return "\n".join((ours or rows)[-lines:])


def format_seconds(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "—"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


# --------------------------------------------------------------------------------------------------
# The queue


class JobRunner:
    """All jobs on this machine: their records, the queue, and the one running process.

    One worker thread starts queued jobs in order and waits for each; everything else only reads and
    writes records under a lock, so chat handlers can call it from the event loop.
    """

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or jobs_dir()
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._jobs: dict[str, Job] = {}
        self._process: subprocess.Popen | None = None
        self._running: Job | None = None
        self._worker: threading.Thread | None = None
        self._load()

    # --- records ---------------------------------------------------------------------------------
    def _load(self) -> None:
        """Read every job.json; a record still "running" belongs to a process that died with the last app."""
        for path in sorted(self.root.glob(f"*/*/{JOB_FILE}")):
            try:
                job = Job(**json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError):
                continue  # a record from another version, or damaged: not ours to show
            if job.state in (RUNNING, STOPPING):
                job.state = INTERRUPTED
                job.ended = job.ended or path.stat().st_mtime
                job.resumable = job.has_checkpoint()
                job.note = "The app stopped while this run trained." + (
                    " Its last checkpoint remains: resume it to continue." if job.resumable else ""
                )
                job.save()
            self._jobs[job.id] = job

    def jobs(self, user: str | None = None) -> list[Job]:
        """Jobs, oldest first (all of them, or one user's)."""
        with self._lock:
            found = [job for job in self._jobs.values() if user is None or job.user == user]
        return sorted(found, key=lambda job: (job.created, job.id))

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def position(self, job_id: str) -> int | None:
        """1 for the next job to start, 2 for the one after...; None unless queued."""
        with self._lock:
            queued = [job for job in self.jobs() if job.state == QUEUED]
        ids = [job.id for job in queued]
        return ids.index(job_id) + 1 if job_id in ids else None

    def running(self) -> Job | None:
        with self._lock:
            return self._running

    # --- changes ---------------------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        """Queue `job` (its folder already holds any upload); the worker starts it in turn."""
        with self._lock:
            job.state = QUEUED
            job.created = job.created or time.time()
            job.save()
            self._jobs[job.id] = job
            self._ensure_worker()
            self._wake.notify_all()
        return job

    def stop(self, job_id: str) -> Job | None:
        """Stop a running job (it saves a checkpoint first) or cancel a queued one."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            if job.state == QUEUED:
                self._finish(job, CANCELLED, note="Cancelled before it started.")
            elif job.state == RUNNING and self._running is job and self._process is not None:
                job.state = STOPPING
                job.save()
                self._process.send_signal(signal.SIGINT)
                threading.Thread(target=self._kill_if_stuck, args=(job, self._process), daemon=True).start()
            return job

    def resume(self, job_id: str, user: str) -> Job:
        """Queue a new job that continues `job_id`'s run from its last checkpoint."""
        with self._lock:
            old = self._jobs[job_id]
            overrides = {key: value for key, value in old.overrides.items() if key != "overwrite"}
            overrides["resume"] = "true"
            job = Job(
                id=new_job_id(), user=user, recipe=old.recipe, run_name=old.run_name, overrides=overrides,
                upload=None, resumes=old.id,
            )  # fmt: skip
            old.resumable = False
            old.save()
        return self.submit(job)

    def _kill_if_stuck(self, job: Job, process: subprocess.Popen) -> None:
        try:
            process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()

    def _finish(self, job: Job, state: str, *, note: str = "", exit_code: int | None = None) -> None:
        job.state = state
        job.ended = time.time()
        job.exit_code = exit_code
        job.note = note
        job.resumable = state in (STOPPED, FAILED, INTERRUPTED) and job.has_checkpoint()
        job.save()

    # --- the worker ------------------------------------------------------------------------------
    def _ensure_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._work, name="babl-train-jobs", daemon=True)
            self._worker.start()

    def _next(self) -> Job | None:
        queued = [job for job in self.jobs() if job.state == QUEUED]
        return queued[0] if queued else None

    def _work(self) -> None:
        while True:
            with self._lock:
                job = self._next()
                while job is None:
                    self._wake.wait()
                    job = self._next()
                try:
                    self._start(job)
                except Exception as exc:  # e.g. an unusable BABL_TRAIN_THREADS, or no Python to run
                    self._finish(job, FAILED, note=f"The run could not start: {exc}")
                    continue
                process = self._process
            code = process.wait()
            with self._lock:
                self._ended(job, code)
                self._process = None
                self._running = None

    def _start(self, job: Job) -> None:
        from babl_core.engine.llama_cpp import spawn_tied

        threads = str(train_threads())
        env = {
            **os.environ,
            "BABL_PROGRESS_FILE": str(job.events_path),
            # Every pool torch and its libraries size from these: the child uses `threads` cores at most.
            "BABL_THREADS": threads, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
            "OPENBLAS_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }  # fmt: skip
        job.folder.mkdir(parents=True, exist_ok=True)
        job.events_path.unlink(missing_ok=True)
        with open(job.log_path, "ab") as log:
            self._process = spawn_tied(
                job.argv(), cwd=str(settings.REPO_ROOT), env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        self._running = job
        job.state = RUNNING
        job.started = time.time()
        job.pid = self._process.pid
        job.save()

    def _ended(self, job: Job, code: int) -> None:
        if job.state == STOPPING:
            resumable = job.has_checkpoint()
            note = (
                f"Stopped; the checkpoint is kept. Resume it from /jobs, or in a terminal: {job.resume_command()}"
                if resumable
                else "Stopped before its first checkpoint: nothing to resume, start it again to train."
            )
            self._finish(job, STOPPED, note=note, exit_code=code)
        elif code == 0 and (job.adapter_dir() / "babl.json").is_file():
            self._finish(job, FINISHED, exit_code=code)
        else:
            why = last_problem(job.log_path) or f"exit code {code}"
            self._finish(job, FAILED, note=why, exit_code=code)


_runner: JobRunner | None = None
_runner_lock = threading.Lock()


def runner() -> JobRunner:
    """This process's job runner (created on first use; it reads the records on disk then)."""
    global _runner
    with _runner_lock:
        if _runner is None:
            _runner = JobRunner()
            if any(job.state == QUEUED for job in _runner.jobs()):
                with _runner._lock:
                    _runner._ensure_worker()  # jobs still waiting when the app last stopped
        return _runner
