"""The llama.cpp engine: GGUF entries answered by a managed `llama-server` child process.

Why a second engine: on CPU, PyTorch eager on a small model's many layers is 3-4x slower for one user
than llama.cpp on the same GGUF (issue #19's table). Babl keeps transformers for PEFT adapters,
bitsandbytes and mixed-adapter batches, and runs `llama-server` where it is the better tool.

One `llama-server` per GGUF base, started on first use (`ModelCache` loads it like a base: counted in
its budget, evicted when idle and least recently used), health-checked, restarted once when it died
(the next answer's notes say so), stopped on eviction and at exit. Chainlit ends with `os._exit`, so
no atexit hook runs there: each child is tied to Babl's life by PR_SET_PDEATHSIG, which the kernel
fires when the *thread* that forked the child ends. Loads run in threads that end
(`devices.in_passing_thread`), so every child is forked by one thread that lives as long as Babl.

Prompts are rendered by the entry's own PromptStyle (the same text the transformers engine would
see) and streamed from the server's `/v1/completions` with `remote.RemoteStream`; LoRA adapters are
GGUF exports (`python -m finetune export --gguf`), loaded at start with `--lora-init-without-apply`
and selected per request (the request's `lora` field).

Getting the binary: `BABL_LLAMA_SERVER`, else `llama-server` on PATH, else the one built by
`python -m babl_core engines build llama.cpp` from the llama.cpp sources the `llama-cpp-python`
sdist carries, cached outside the checkout by version and CPU flags (the build is native).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import hashlib
import logging
import os
import platform
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from babl_core import settings
from babl_core.engine.generation import GenerationError, GenerationParams

log = logging.getLogger(__name__)

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"  # its sdist carries vendor/llama.cpp
SERVER_ENV = "BABL_LLAMA_SERVER"
BUILD_COMMAND = "python -m babl_core engines build llama.cpp"
DEFAULT_CONTEXT = 2048  # tokens per slot
DEFAULT_PARALLEL = 8  # slots: answers decoded together
START_TIMEOUT_S = 120.0


class LlamaServerError(GenerationError):
    """llama-server could not be started, or stopped; the message says why and what to do."""


# --------------------------------------------------------------------------------------------------
# Where the binary comes from


def cache_root() -> Path:
    """`BABL_CACHE_DIR`, else `~/.cache/babl`: builds that outlive a checkout."""
    value = os.environ.get("BABL_CACHE_DIR", "").strip()
    return Path(value).expanduser() if value else Path.home() / ".cache" / "babl"


def cpu_key() -> str:
    """A short hash of the machine type and CPU flags: a native build runs only where they match."""
    flags = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = " ".join(sorted(line.split(":", 1)[1].split()))
                break
    return hashlib.sha256(f"{platform.machine()} {flags}".encode()).hexdigest()[:12]


def build_dir() -> Path:
    """The cached build for this llama.cpp version and CPU: `src/` (sources), `build/bin/`."""
    version = LLAMA_CPP_PYTHON.split("==")[1]
    return cache_root() / "engines" / f"llama.cpp-{version}-{cpu_key()}"


def built_server() -> Path:
    return build_dir() / "build" / "bin" / "llama-server"


def source_dir() -> Path:
    """llama.cpp's sources of the cached build (its conversion scripts live there too)."""
    return build_dir() / "src"


def find_server() -> Path | None:
    """The llama-server to run: `BABL_LLAMA_SERVER`, else on PATH, else the cached build; or None."""
    chosen = os.environ.get(SERVER_ENV, "").strip()
    if chosen:
        path = Path(chosen).expanduser()
        return path if path.is_file() and os.access(path, os.X_OK) else None
    on_path = shutil.which("llama-server")
    if on_path:
        return Path(on_path)
    built = built_server()
    return built if built.is_file() else None


def missing_reason() -> str:
    """Why the engine cannot run here and how to enable it (the dropdown shows this)."""
    chosen = os.environ.get(SERVER_ENV, "").strip()
    if chosen:
        return f"{SERVER_ENV}={chosen} is not an executable file; fix the path or unset it"
    # The dropdown shows the text before the first ';' (60 characters): the command comes first.
    return (
        f"not built yet: {BUILD_COMMAND}; the llama.cpp engine builds once, about 7 minutes on 2 idle cores "
        f"(cmake, ninja and g++), or set {SERVER_ENV} to a llama-server binary"
    )


def build(*, jobs: int | None = None, progress: Callable[[str], None] | None = None) -> Path:
    """Build `llama-server` once from the llama-cpp-python sdist's llama.cpp sources (cached).

    Returns:
        The path of the built llama-server.

    Raises:
        RuntimeError: a tool is missing or a step failed (the message names it).
    """
    say = progress or (lambda m: print(m, file=sys.stderr, flush=True))
    target = built_server()
    if target.is_file():
        say(f"llama-server is already built: {target}")
        return target
    for tool in ("cmake", "ninja", "g++"):
        if not shutil.which(tool):
            raise RuntimeError(
                f"{tool} is missing; install it (Debian: apt-get install cmake ninja-build g++)"
            )
    root = build_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two `make test` at once: the second waits, then finds it built
        if target.is_file():
            return target
        return _build(root, target, jobs, say)


def _build(root: Path, target: Path, jobs: int | None, say: Callable[[str], None]) -> Path:
    src = source_dir()
    if not (src / "CMakeLists.txt").is_file():
        say(f"Fetching the llama.cpp sources ({LLAMA_CPP_PYTHON} sdist from PyPI)...")
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                  LLAMA_CPP_PYTHON, "-d", tmp], "pip download")  # fmt: skip
            sdist = next(Path(tmp).glob("*.tar.gz"))
            with tarfile.open(sdist) as archive:
                archive.extractall(tmp, filter="data")
            vendor = next(Path(tmp).glob("*/vendor/llama.cpp"))
            if src.exists():
                shutil.rmtree(src)
            shutil.move(str(vendor), src)
    jobs = jobs or os.cpu_count() or 2
    say(f"Building llama-server in {root} with {jobs} jobs (about 7 minutes on 2 idle cores)...")
    start = time.perf_counter()
    _run(["cmake", "-S", str(src), "-B", str(root / "build"), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
          "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
          "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON"], "cmake configure")  # fmt: skip
    _run(["cmake", "--build", str(root / "build"), "-j", str(jobs), "--target", "llama-server", "llama-bench"],
         "cmake build")  # fmt: skip
    say(f"Built llama-server in {time.perf_counter() - start:.0f} s: {target}")
    return target


def _run(argv: list[str], what: str) -> None:
    result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        tail = "\n".join(result.stdout.splitlines()[-20:])
        raise RuntimeError(f"{what} failed (exit code {result.returncode}):\n{tail}")


# --------------------------------------------------------------------------------------------------
# Children tied to Babl's life


_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork: nothing to load in the child

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # Babl died between fork and prctl
            os._exit(1)

    return preexec


class _Spawner:
    """One thread that lives as long as Babl and forks every child (see the module docstring)."""

    def __init__(self) -> None:
        self._jobs: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="babl-llama-spawner", daemon=True)
                self._thread.start()
        done: Future = Future()
        self._jobs.put((argv, kwargs, done))
        return done.result()

    def _loop(self) -> None:
        while True:
            argv, kwargs, done = self._jobs.get()
            try:
                done.set_result(subprocess.Popen(argv, preexec_fn=_die_with_parent(os.getpid()), **kwargs))
            except BaseException as exc:
                done.set_exception(exc)


_spawner = _Spawner()


def spawn_tied(argv: list[str], **kwargs) -> subprocess.Popen:
    """`subprocess.Popen(argv, **kwargs)` for a child that must end when Babl ends, however it ends
    (training jobs use it too: `babl_core.web.jobs`)."""
    return _spawner.popen(argv, **kwargs)


_running: set[LlamaServer] = set()
_running_lock = threading.Lock()


def stop_all() -> None:
    """Stop every llama-server this process started (at exit; Chainlit's `os._exit` relies on the
    death signal instead)."""
    with _running_lock:
        servers = list(_running)
    for server in servers:
        server.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class ServerSettings:
    """How one llama-server runs: threads, context per slot, parallel slots."""

    threads: int
    context: int = DEFAULT_CONTEXT
    parallel: int = DEFAULT_PARALLEL


def server_settings(options: dict | None) -> ServerSettings:
    """An entry's `llama_cpp` options; threads default to `BABL_THREADS`, else the CPU count."""
    options = options or {}
    threads = options.get("threads") or settings.env_int("BABL_THREADS", os.cpu_count() or 1)
    return ServerSettings(
        threads=int(threads),
        context=int(options.get("context") or DEFAULT_CONTEXT),
        parallel=int(options.get("parallel") or DEFAULT_PARALLEL),
    )


# --------------------------------------------------------------------------------------------------
# Memory: the cache's budget counts the GGUF file and the KV cache the server allocates at start

KV_BYTES_PER_VALUE = 2  # llama-server's default KV cache type is f16
_GGUF_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_header_values(path: Path, wanted: set[str]) -> dict:
    """Scalar metadata values of a GGUF file, reading its header only until every `wanted` key is seen.

    Why not `gguf.GGUFReader`: it parses the whole metadata and tensor table, a vocabulary of ~50k
    strings included (5 s for SmolLM2 on a busy 2-core machine); the budget needs five numbers that
    converters write before the vocabulary.

    Raises:
        ValueError: not a GGUF file, or one cut short.
    """
    import struct

    values: dict = {}
    with open(path, "rb") as f:

        def read(fmt: str):
            size = struct.calcsize(fmt)
            data = f.read(size)
            if len(data) != size:
                raise ValueError(f"{path} ends inside its GGUF header")
            return struct.unpack(fmt, data)[0]

        def string() -> bytes:
            return f.read(read("<Q"))

        def skip(kind: int) -> None:
            if kind == _GGUF_STRING:
                f.seek(read("<Q"), 1)
            elif kind == _GGUF_ARRAY:
                item, count = read("<I"), read("<Q")
                if item in _GGUF_SCALARS:
                    f.seek(struct.calcsize(_GGUF_SCALARS[item]) * count, 1)
                else:
                    for _ in range(count):
                        skip(item)
            elif kind in _GGUF_SCALARS:
                read(_GGUF_SCALARS[kind])
            else:
                raise ValueError(f"{path}: unknown GGUF value type {kind}")

        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        read("<I")  # version
        read("<Q")  # tensors
        for _ in range(read("<Q")):
            key, kind = string().decode(errors="replace"), read("<I")
            if key in wanted and kind in _GGUF_SCALARS:
                values[key] = read(_GGUF_SCALARS[kind])
            elif key in wanted and kind == _GGUF_STRING:
                values[key] = string().decode(errors="replace")
            else:
                skip(kind)
            if wanted <= values.keys():
                break
    return values


def kv_cache_bytes(*, tokens: int, layers: int, kv_heads: int, key_length: int, value_length: int,
                   bytes_per_value: int = KV_BYTES_PER_VALUE) -> int:  # fmt: skip
    """The KV cache of `tokens` positions: keys and values of every layer's key-value heads."""
    return tokens * layers * kv_heads * (key_length + value_length) * bytes_per_value


def gguf_kv_cache_bytes(path: Path, tokens: int) -> int:
    """The KV cache llama-server allocates for `tokens` positions (all slots) on this GGUF model."""
    arch = gguf_header_values(path, {"general.architecture"}).get("general.architecture", "llama")
    keys = {f"{arch}.{k}" for k in ("block_count", "attention.head_count", "attention.head_count_kv",
                                    "embedding_length")}  # fmt: skip
    found = gguf_header_values(path, keys)
    missing = keys - found.keys()
    if missing:
        raise ValueError(f"{path}: no {', '.join(sorted(missing))} in its GGUF header")
    heads = found[f"{arch}.attention.head_count"]
    head_dim = found[f"{arch}.embedding_length"] // heads
    extra = gguf_header_values(path, {f"{arch}.attention.key_length", f"{arch}.attention.value_length"})
    return kv_cache_bytes(
        tokens=tokens,
        layers=found[f"{arch}.block_count"],
        kv_heads=found[f"{arch}.attention.head_count_kv"],
        key_length=extra.get(f"{arch}.attention.key_length", head_dim),
        value_length=extra.get(f"{arch}.attention.value_length", head_dim),
    )


def server_footprint_bytes(path: Path, server: ServerSettings) -> int:
    """What one llama-server holds: the GGUF file (mapped as it is) and the KV cache of all its slots
    (context x slots positions); a header it cannot read counts the file alone."""
    size = Path(path).stat().st_size
    try:
        return size + gguf_kv_cache_bytes(path, server.context * server.parallel)
    except (OSError, ValueError) as exc:
        log.warning("llama.cpp budget: counting %s without its KV cache (%s)", path, exc)
        return size


class LlamaServer:
    """One managed llama-server on one GGUF file, with its LoRA adapters (ids in list order)."""

    def __init__(self, gguf_path: Path, server: ServerSettings, loras: tuple[Path, ...] = (),
                 *, binary: Path | None = None, name: str = "") -> None:  # fmt: skip
        self.gguf_path = Path(gguf_path)
        self.settings = server
        self.loras = tuple(Path(p) for p in loras)
        self.binary = binary or find_server()
        self.name = name or self.gguf_path.name
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self.log_path: Path | None = None
        self.in_flight = 0  # answers streaming from it now
        self._count_lock = threading.Lock()
        self._lora_stamps: dict[Path, int] = {}
        self._lock = threading.Lock()
        self.http = None  # one keep-alive client for every answer while it runs (see `start`)

    @property
    def config(self):
        """What `loaded.context_length` reads: the tokens one answer may use (prompt included)."""
        return SimpleNamespace(max_position_embeddings=self.settings.context)

    def describe(self) -> str:
        s = self.settings
        return (
            f"llama.cpp, {self.gguf_path.name}, {s.threads} threads, {s.parallel} slots of {s.context} tokens"
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def argv(self) -> list[str]:
        s = self.settings
        argv = [str(self.binary), "-m", str(self.gguf_path), "--host", "127.0.0.1", "--port", str(self.port),
                "-t", str(s.threads), "-c", str(s.context * s.parallel), "-np", str(s.parallel),
                "--no-webui"]  # fmt: skip
        for lora in self.loras:
            argv += ["--lora", str(lora)]
        if self.loras:
            argv.append("--lora-init-without-apply")
        return argv

    def start(self) -> None:
        """Start the child and wait until `/health` answers 200.

        Raises:
            LlamaServerError: no binary, or the server exited or stayed unhealthy (with its log's tail).
        """
        if self.binary is None or not Path(self.binary).is_file():
            raise LlamaServerError(missing_reason())
        self.port = _free_port()
        logs = settings.data_dir() / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.log_path = logs / f"llama-server-{self.port}.log"
        env = dict(os.environ)
        lib = str(Path(self.binary).resolve().parent)  # its shared libraries sit next to it
        env["LD_LIBRARY_PATH"] = lib + (
            os.pathsep + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else ""
        )
        with open(self.log_path, "wb") as out:
            self.process = _spawner.popen(self.argv(), stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=env)  # fmt: skip
        with _running_lock:
            _running.add(self)
        self._lora_stamps = {p: _mtime_ns(p) for p in self.loras}
        # One client for all answers: a client per answer builds a TLS context (tens of ms of CPU, taken
        # from the server's own cores on a small machine) and a new connection before its first token.
        import httpx

        self.http = httpx.Client(limits=httpx.Limits(max_keepalive_connections=2 * self.settings.parallel))
        self._wait_healthy()
        log.info("llama-server for %s on port %d (pid %d)", self.name, self.port, self.process.pid)

    def _wait_healthy(self) -> None:
        import httpx

        timeout = settings.env_float("BABL_LLAMA_START_TIMEOUT_S", START_TIMEOUT_S)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise LlamaServerError(
                    f"llama-server for {self.name} exited at start (exit code {code}): {self.log_tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2.0).status_code == 200:
                    return
            time.sleep(0.1)
        self.stop()
        raise LlamaServerError(
            f"llama-server for {self.name} was not ready within {timeout:g} s; raise BABL_LLAMA_START_TIMEOUT_S "
            f"or see {self.log_path}: {self.log_tail()}"
        )

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            return ""
        return " | ".join(line.strip() for line in text.splitlines()[-lines:] if line.strip())

    def ensure_running(self) -> str | None:
        """Restart the child if it died; returns a note for the answer when it did.

        Raises:
            LlamaServerError: the restart failed too.
        """
        with self._lock:
            if self.alive():
                return self._reload_new_exports()
            if self.process is None:
                self.start()
                return None
            code = self.process.returncode
            self.restarts += 1
            log.warning("llama-server for %s stopped (exit code %s); restarting it", self.name, code)
            self._forget()
            try:
                self.start()
            except LlamaServerError as exc:
                raise LlamaServerError(f"the llama.cpp server had stopped (exit code {code}) and did not "
                                       f"start again: {exc}") from exc  # fmt: skip
            return f"the llama.cpp server had stopped (exit code {code}); it was restarted for this answer"

    def _reload_new_exports(self) -> str | None:
        """Restart when an adapter was exported again since the start, unless an answer is streaming."""
        changed = [p for p in self.loras if _mtime_ns(p) != self._lora_stamps.get(p)]
        if not changed or self.in_flight:
            return None
        self.stop()
        self.start()
        names = ", ".join(p.parent.name for p in changed)
        return f"the llama.cpp server was restarted to load the new export of {names}"

    def restart_with(self, loras: tuple[Path, ...]) -> None:
        """Restart with another adapter list (the cache calls this only while no answer runs)."""
        with self._lock:
            self.stop()
            self.loras = tuple(loras)
            self.start()

    def stop(self) -> None:
        """Stop the child (SIGTERM, then SIGKILL after 5 s)."""
        process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        self._forget()

    def _forget(self) -> None:
        if self.http is not None:
            self.http.close()
            self.http = None
        with _running_lock:
            _running.discard(self)

    # -- answers ---------------------------------------------------------------------------------------
    def lora_field(self, adapter: str | None) -> list[dict]:
        """The request's `lora` field: the chosen adapter at scale 1, every other one at 0."""
        chosen = str(Path(adapter)) if adapter else None
        return [{"id": i, "scale": 1.0 if str(p) == chosen else 0.0} for i, p in enumerate(self.loras)]

    def stream(self, spec_id: str, prompt: str, params: GenerationParams, stop_event: threading.Event | None,
               adapter: str | None = None) -> LlamaStream:  # fmt: skip
        return LlamaStream(self, spec_id, prompt, params, stop_event, adapter)


@dataclass(frozen=True)
class _Endpoint:
    """What `RemoteStream` needs to know about a server (the fields of a remote catalog entry)."""

    id: str
    base_url: str
    remote_model: str
    api_key_env: str | None = None


class LlamaStream:
    """One answer streamed from llama-server's `/v1/completions` (the OpenAI-compatible client of
    `babl_core.engine.remote`), with llama.cpp's own sampling fields. A server that dies mid-answer gives one
    message saying the next answer restarts it."""

    def __init__(self, server: LlamaServer, spec_id: str, prompt: str, params: GenerationParams,
                 stop_event: threading.Event | None, adapter: str | None) -> None:  # fmt: skip
        from babl_core.engine.remote import RemoteStream

        self.server = server
        endpoint = _Endpoint(spec_id, server.base_url, server.gguf_path.name)
        self._inner = RemoteStream(endpoint, [], params, stop_event, prompt=prompt, client=server.http,
                                   extra_body=llama_fields(params, server.lora_field(adapter)))  # fmt: skip
        self.notes = []  # llama-server takes top_k and repeat_penalty: nothing is left unsent
        self.stats = self._inner.stats
        self.params = self._inner.params

    @property
    def text(self) -> str:
        return self._inner.text

    @property
    def body(self) -> dict:
        return self._inner.body

    def cancel(self) -> None:
        self._inner.cancel()

    def __iter__(self) -> Iterator[str]:
        with self.server._count_lock:
            self.server.in_flight += 1
        try:
            yield from self._inner
        except GenerationError as exc:
            self._raise_if_died(exc)
            raise
        finally:
            with self.server._count_lock:
                self.server.in_flight -= 1
        if not self._inner.completed and not self._inner.stop_event.is_set():
            # The stream ended without the server saying so: the connection closed under it.
            self.stats.finish_reason = "error"
            self._raise_if_died(None)
            raise LlamaServerError(
                f"The connection to the llama.cpp server for {self.server.name} closed in the middle of this "
                f"answer; the text so far is kept. Its log: {self.server.log_path}"
            )

    def _raise_if_died(self, cause: BaseException | None) -> None:
        process = self.server.process
        deadline = time.monotonic() + 1.0  # a killed child's connection breaks a moment before it is reaped
        while process is not None and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if process is not None and process.poll() is not None:
            self.stats.finish_reason = "error"
            raise LlamaServerError(
                f"The llama.cpp server stopped in the middle of this answer (exit code {process.returncode}); "
                "the text so far is kept, and it restarts for your next message."
            ) from cause


def _mtime_ns(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def llama_fields(params: GenerationParams, lora: list[dict]) -> dict:
    """Fields llama-server's /completions takes beyond the OpenAI ones.

    Greedy answers (temperature 0) with top-k off send `top_k: 1`: the same token (the most likely
    one, after the repetition penalty), but llama.cpp's sampler chain then works on one candidate
    instead of softmaxing and sorting the whole vocabulary for top-p on every token of every slot.
    """
    top_k = 1 if params.temperature == 0 and params.top_k == 0 else params.top_k
    fields: dict = {"top_k": top_k, "repeat_penalty": params.repetition_penalty, "cache_prompt": True}
    if lora:
        fields["lora"] = lora
    return fields


def lora_export(adapter_dir: Path) -> Path:
    """Where `finetune export --gguf` writes an adapter's GGUF LoRA."""
    return Path(adapter_dir) / "adapter.gguf"


def _adapter_dir(ref: str) -> Path | None:
    from babl_core.engine.catalog import looks_like_path

    return settings.resolve_path(ref) if looks_like_path(ref) else None


def _export_hint(ref: str) -> str:
    folder = _adapter_dir(ref)
    name = folder.name if folder else ref
    return f"adapter {ref} has no GGUF export for the llama.cpp engine; run: python -m finetune export --gguf --adapter {name}"


# --------------------------------------------------------------------------------------------------
# The engine as the catalog and the cache see it


def availability_problem(spec) -> str | None:
    """Why an `engine: llama.cpp` entry cannot be served here (no binary, an adapter not exported)."""
    if find_server() is None:
        return missing_reason()
    if spec.adapter:
        folder = _adapter_dir(spec.adapter)
        if folder is not None and folder.is_dir() and not lora_export(folder).is_file():
            return _export_hint(spec.adapter)
    return None


def engine_for(spec) -> str:
    """The engine that serves `spec`: llama.cpp when asked; with `auto`, llama.cpp on CPU when the binary
    exists and every adapter of that base has a GGUF export (one engine per base: one copy in memory)."""
    if spec.engine == "llama.cpp":
        return "llama.cpp"
    if spec.engine != "auto" or not spec.gguf_file or spec.backend != "local" or find_server() is None:
        return "transformers"
    from babl_core.engine.catalog import discover_adapters, same_base
    from babl_core.engine.devices import resolve_device

    if resolve_device() != "cpu":
        return "transformers"
    adapters = [info.path for info in discover_adapters()[0] if same_base(spec, info.base, info.gguf_file)]
    if spec.adapter:
        adapters.append(_adapter_dir(spec.adapter))
    if any(folder is None or not lora_export(folder).is_file() for folder in adapters):
        return "transformers"
    return "llama.cpp"


def gguf_tokenizer(path: Path):
    """The Hugging Face tokenizer inside a GGUF file (for the entry's PromptStyle), read once and
    kept next to the converted weights: reading it from the GGUF takes seconds, a saved copy ms."""
    from transformers import AutoTokenizer

    from babl_core.engine import gguf

    folder = settings.gguf_dir() / f"{gguf.known_sha256(path)[:16]}-tokenizer"
    if not (folder / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
        tokenizer.save_pretrained(staging)
        if folder.exists():
            shutil.rmtree(staging, ignore_errors=True)
        else:
            os.replace(staging, folder)
    return AutoTokenizer.from_pretrained(str(folder))


def load_server(spec, plan):
    """Start `spec`'s llama-server (the cache's loader for llama.cpp entries); a `LoadedModel` whose
    `model` is the `LlamaServer`.

    Raises:
        ModelUnavailable: no GGUF file or binary, or the server did not start (the message says why).
    """
    from babl_core.engine import gguf
    from babl_core.engine.loaded import LoadedModel, ModelUnavailable

    start = time.perf_counter()
    try:
        path = gguf.locate(gguf.parse_ref(spec.gguf_file, spec.base), download=True)
    except gguf.GGUFUnavailable as exc:
        raise ModelUnavailable(spec.id, str(exc)) from exc
    binary = find_server()
    if binary is None:
        raise ModelUnavailable(spec.id, missing_reason())
    tokenizer = gguf_tokenizer(path)
    server = LlamaServer(path, server_settings(spec.llama_cpp), binary=binary, name=spec.id)
    try:
        server.start()
    except LlamaServerError as exc:
        raise ModelUnavailable(spec.id, str(exc)) from exc
    footprint = server_footprint_bytes(path, server.settings)
    return LoadedModel(model=server, tokenizer=tokenizer, kind="causal", base=spec.base, plan=plan,
                       footprint_bytes=footprint, load_seconds=time.perf_counter() - start)  # fmt: skip


def attach_lora(loaded, ref: str):
    """Add adapter `ref` (its GGUF export) to the base's server: restarted with the longer adapter list
    (the cache calls this only while no answer runs on that base). Returns a view using it."""
    from babl_core.engine.loaded import ModelUnavailable

    folder = _adapter_dir(ref)
    lora = lora_export(folder) if folder else None
    if lora is None or not lora.is_file():
        raise ModelUnavailable(ref, _export_hint(ref))
    server: LlamaServer = loaded.model
    if lora not in server.loras:
        try:
            server.restart_with((*server.loras, lora))
        except LlamaServerError as exc:
            raise ModelUnavailable(ref, str(exc)) from exc
    view = loaded.with_adapter(str(lora), ref)
    view.footprint_bytes = loaded.footprint_bytes + lora.stat().st_size
    return view


atexit.register(stop_all)
