"""The pass@k code sandbox (finetune.metrics.run_code_tests): what a program under evaluation can and
cannot do. Each escape found against the earlier sandbox (a child process with `unshare -n` or an audit
hook) has a test: processes left running after the run, signalling the evaluator, a forged verdict,
sockets (TCP, Unix by path, abstract), and the user's files. The programs are written to escape."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from finetune import metrics

REPO_ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("bubblewrap")


def run_as_separate_evaluator(program: str, **kwargs) -> dict:
    """`run_code_tests` in an evaluator process of its own, so a program that kills its evaluator
    kills that process and not pytest. Returns the ExecResult as a dict (or the evaluator's death)."""
    code = (
        "import dataclasses, json, sys\n"
        "from finetune import metrics\n"
        "program = sys.stdin.read()\n"
        f"print(json.dumps(dataclasses.asdict(metrics.run_code_tests(program, **{kwargs!r}))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], input=program, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT
    )
    if done.returncode != 0:
        return {"evaluator_died": done.returncode, "stderr": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_passing_failing_and_erroring_programs():
    passed = metrics.run_code_tests("assert sum([1, 2]) == 3")
    assert (passed.passed, passed.status, passed.sandbox) == (True, "passed", "bubblewrap")
    failed = metrics.run_code_tests("assert sum([1, 2]) == 4, 'wrong sum'")
    assert (failed.passed, failed.status) == (False, "failed")
    assert "wrong sum" in failed.detail
    error = metrics.run_code_tests("1 / 0")
    assert (error.passed, error.status) == (False, "error")
    assert "ZeroDivisionError" in error.detail
    assert metrics.run_code_tests("def broken(:\n    pass").status == "error"
    # Leaving early is not passing, whether politely or not.
    assert metrics.run_code_tests("raise SystemExit(0)\nassert False").status == "error"
    assert metrics.run_code_tests("import os\nos._exit(0)\nassert False").status == "error"


FORGERIES = {
    # The earlier sandbox read its verdict from result.json in the working folder, named in sys.argv.
    "result_file": (
        "import json, os, sys\n"
        "for path in [*sys.argv[1:], 'result.json', '/tmp/result.json']:\n"
        "    try:\n"
        "        open(path, 'w').write(json.dumps({'status': 'passed', 'detail': ''}))\n"
        "    except OSError:\n"
        "        pass\n"
        "os._exit(0)\n"
    ),
    # The verdict pipe is some open descriptor: write a made-up verdict to every one.
    "verdict_pipe": (
        "import json, os\n"
        "line = (json.dumps({'nonce': '0' * 32, 'status': 'passed', 'detail': ''}) + '\\n').encode()\n"
        "for fd in range(3, 64):\n"
        "    try:\n"
        "        os.write(fd, line)\n"
        "    except OSError:\n"
        "        pass\n"
        "os._exit(0)\n"
    ),
    "stdout": "print('passed')\nprint('{\"status\": \"passed\"}')\nimport os\nos._exit(0)\n",
}


@pytest.mark.parametrize("how", sorted(FORGERIES))
def test_a_program_cannot_report_itself_passed(how):
    result = metrics.run_code_tests(FORGERIES[how] + "assert False, 'the tests, never reached'\n")
    assert (result.passed, result.status) == (False, "error"), result
    assert "before reporting a result" in result.detail


@pytest.mark.parametrize(
    "program",
    ["while True:\n    pass\n", "import time\nwhile True:\n    time.sleep(0.05)\n"],
    ids=["busy", "sleeping"],
)
def test_infinite_loop_times_out_in_bounded_time(program):
    started = time.monotonic()
    result = metrics.run_code_tests(program, timeout_s=1.0)
    elapsed = time.monotonic() - started
    assert (result.passed, result.status) == (False, "timeout")
    assert elapsed < 4.0


def processes_with(marker: str) -> list[str]:
    """Live (not zombie) processes on this machine whose command line holds `marker`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            cmdline = (stat.parent / "cmdline").read_bytes().decode(errors="replace")
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker in cmdline and state != "Z":
            found.append(f"{stat.parent.name}: {cmdline!r}")
    return found


# Each leaves a process behind that sleeps a minute, its command line holding MARKER.
LINGERING = {
    "setsid_double_fork": (
        "import os, sys\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', 'MARKER'])\n"
        "    os._exit(0)\n"
        "os.wait()\n"
    ),
    "new_session_popen": (
        "import subprocess, sys\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', 'MARKER'], start_new_session=True)\n"
    ),
    "daemon_signals_ignored": (
        "import os, signal, sys\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):\n"
        "        signal.signal(sig, signal.SIG_IGN)\n"
        "    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', 'MARKER'])\n"
    ),
}


@pytest.mark.parametrize("ending", ["passes", "times_out"])
@pytest.mark.parametrize("how", sorted(LINGERING))
def test_nothing_the_program_started_outlives_the_run(how, ending):
    marker = f"babl-linger-{uuid.uuid4().hex}"
    program = LINGERING[how].replace("MARKER", marker) + "import time\ntime.sleep(0.5)\n"
    if ending == "times_out":
        program += "while True:\n    time.sleep(0.05)\n"
    result = metrics.run_code_tests(program, timeout_s=3.0)
    assert result.status == ("passed" if ending == "passes" else "timeout"), result
    deadline = time.monotonic() + 3.0
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = processes_with(marker)
    for line in left:  # clean up after a failure, so one failing test leaves nothing running either
        os.kill(int(line.split(":")[0]), signal.SIGKILL)
    assert left == [], "processes outlived the sandbox"


STILL_RUNNING = "import time\ntime.sleep(0.5)\nraise AssertionError('still running')\n"


@pytest.mark.parametrize(
    "program",
    [
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
        "import os, signal\nos.kill(1, signal.SIGKILL)\n",
        "import os, signal\nos.kill(-1, signal.SIGKILL)\n",
        "import os, signal\nos.killpg(os.getpgid(os.getppid()), signal.SIGKILL)\n",
    ],
    ids=["parent", "pid-1", "everything", "parent-group"],
)
def test_the_program_cannot_signal_its_evaluator(program):
    result = run_as_separate_evaluator(program + STILL_RUNNING, timeout_s=5.0)
    assert "evaluator_died" not in result, result
    assert not result["passed"]
    assert result["status"] in ("failed", "error"), result


def test_the_program_cannot_see_or_signal_outside_processes():
    here = os.getpid()
    result = metrics.run_code_tests(
        f"import os, signal\nos.kill({here}, signal.SIGTERM)\n"  # pytest's own pid: not in the namespace
    )
    assert (result.status, "ProcessLookupError" in result.detail) == ("error", True), result
    listing = metrics.run_code_tests("import os\nraise AssertionError(sorted(os.listdir('/proc')))")
    pids = [name for name in re.findall(r"'(\d+)'", listing.detail)]
    assert len(pids) <= 3, pids  # bubblewrap's init, the program, and nothing of the machine's


def test_the_program_sees_only_the_python_installation(tmp_path, monkeypatch):
    secret = tmp_path / "secret.txt"
    secret.write_text("do-not-read")
    target = tmp_path / "written-by-the-program"
    probe = (
        "import json, os, sys\n"
        "report = {'uid': os.getuid(), 'gid': os.getgid(), 'cwd': os.getcwd(), 'root': sorted(os.listdir('/')),\n"
        "          'caps': [l for l in open('/proc/self/status') if l.startswith('CapEff')][0].split()[1],\n"
        "          'env': sorted(os.environ)}\n"
        "for name, path in [('secret', __SECRET__), ('repo', __REPO__)]:\n"
        "    try:\n"
        "        open(path).read()\n"
        "        report[name] = 'read'\n"
        "    except OSError as exc:\n"
        "        report[name] = type(exc).__name__\n"
        "try:\n"
        "    open(__TARGET__, 'w').write('x')\n"
        "    report['write'] = 'written'\n"
        "except OSError as exc:\n"
        "    report['write'] = type(exc).__name__\n"
        "try:\n"
        "    report['home'] = sorted(os.listdir(__HOME__))\n"
        "except OSError as exc:\n"
        "    report['home'] = type(exc).__name__\n"
        "for path in (sys.executable, os.__file__):\n"
        "    try:\n"
        "        open(path, 'a').close()\n"
        "        report['python_writable'] = path\n"
        "    except OSError:\n"
        "        pass\n"
        "raise AssertionError('REPORT' + json.dumps(report))\n"
    )
    for name, value in [("__SECRET__", secret), ("__REPO__", REPO_ROOT / "README.md"), ("__TARGET__", target),
                        ("__HOME__", Path.home())]:  # fmt: skip
        probe = probe.replace(name, repr(str(value)))
    monkeypatch.setenv("BABL_SECRET_PROBE", "do-not-leak")
    result = metrics.run_code_tests(probe)
    report = json.loads(result.detail.rsplit("AssertionError: REPORT", 1)[1].strip().splitlines()[0])
    assert (report["uid"], report["gid"]) == (65534, 65534)  # nobody, not the user who evaluates
    assert int(report["caps"], 16) == 0  # no capability left
    assert report["cwd"] == "/tmp"
    assert set(report["root"]) <= {
        "tmp",
        "proc",
        "dev",
        "usr",
        "lib",
        "lib64",
        "lib32",
        "root",
        "home",
        "opt",
    }
    assert "work" not in report["root"] and "etc" not in report["root"]
    assert (report["secret"], report["repo"]) == ("FileNotFoundError", "FileNotFoundError")
    assert report["write"] == "FileNotFoundError" and not target.exists()
    # The home folder is absent, or (a Python installed under it, e.g. by pyenv) shows only that path.
    python_home = Path(sys.base_prefix).resolve()
    if python_home.is_relative_to(Path.home()):
        assert report["home"] == [python_home.relative_to(Path.home()).parts[0]]
    else:
        assert report["home"] == "FileNotFoundError"
    assert "python_writable" not in report
    assert "BABL_SECRET_PROBE" not in report["env"]
    assert set(report["env"]) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "LC_CTYPE", "PWD"}  # PWD: /tmp


def test_resource_limits():
    memory = metrics.run_code_tests("block = bytearray(3 * 1024**3)", memory_mb=512)
    assert memory.status == "error"
    assert "MemoryError" in memory.detail
    big_file = metrics.run_code_tests("open('big.bin', 'wb').write(b'x' * (4 * 1024 * 1024))", max_file_mb=1)
    assert big_file.status == "error"
    assert "File too large" in big_file.detail


@pytest.fixture
def listening_server(listening_server):
    """conftest's recording server, after a control connection from this process: "no connection"
    below then means the sandbox blocked it, not that the server was deaf."""
    port, accepted = listening_server
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    deadline = time.monotonic() + 2
    while not accepted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(accepted) == 1
    return listening_server


# If the connection went through, each program would run to its end and pass.
CONNECTING_PROGRAMS = {
    "create_connection": "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'hi')\n",
    "raw_connect": "import socket\ns = socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))\n",
    "via_subprocess": (
        "import subprocess, sys\n"
        "code = \"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)\"\n"
        "subprocess.run([sys.executable, '-c', code], check=True)\n"
    ),
    "via_ctypes": (  # the earlier fallback's audit hook never saw this one
        "import ctypes, socket, struct\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "fd = libc.socket(socket.AF_INET, socket.SOCK_STREAM, 0)\n"
        "address = struct.pack('!HH4s8x', socket.AF_INET, {port}, socket.inet_aton('127.0.0.1'))\n"
        "address = struct.pack('=H', socket.AF_INET) + address[2:]\n"
        "assert libc.connect(fd, address, len(address)) == 0, ctypes.get_errno()\n"
    ),
}


@pytest.mark.parametrize("how", sorted(CONNECTING_PROGRAMS))
def test_network_connection_fails_and_never_reaches_server(listening_server, how):
    port, accepted = listening_server
    result = metrics.run_code_tests(CONNECTING_PROGRAMS[how].format(port=port), timeout_s=5.0)
    assert not result.passed
    assert result.status in ("error", "failed"), result.detail
    time.sleep(0.2)  # give a connection that slipped through time to be accepted
    assert len(accepted) == 1, "the sandboxed program reached the server"


@pytest.fixture
def unix_servers(tmp_path):
    """A Unix socket by path and one in the abstract namespace, each recording what connects."""
    import threading

    path = tmp_path / "evaluator.sock"
    abstract = f"\0babl-test-{uuid.uuid4().hex}"
    servers, accepted = [], []
    for address in (str(path), abstract):
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(address)
        server.listen()
        server.settimeout(0.05)
        servers.append(server)
    stop = threading.Event()

    def accept_forever():
        while not stop.is_set():
            for server in servers:
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                accepted.append(server.getsockname())
                conn.close()

    thread = threading.Thread(target=accept_forever, daemon=True)
    thread.start()
    # Control: this process can connect to both.
    for address in (str(path), abstract):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(address)
    deadline = time.monotonic() + 2
    while len(accepted) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(accepted) == 2
    yield str(path), abstract, accepted
    stop.set()
    thread.join()
    for server in servers:
        server.close()


def test_no_unix_socket_is_reachable(unix_servers):
    path, abstract, accepted = unix_servers
    for address in (path, abstract):
        program = (
            f"import socket\ns = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\ns.connect({address!r})\n"
        )
        result = metrics.run_code_tests(program, timeout_s=5.0)
        assert (result.passed, result.status) == (False, "error"), (address, result)
    time.sleep(0.2)
    assert len(accepted) == 2, "the sandboxed program reached a Unix socket"


def test_without_namespaces_pass_at_k_is_refused_unless_asked_unsafe(monkeypatch, caplog):
    monkeypatch.setattr(
        metrics, "sandbox_problem", lambda: "bubblewrap is not installed (apt-get install bubblewrap)"
    )
    monkeypatch.setattr(metrics, "_unsafe_warned", False)
    with pytest.raises(metrics.SandboxUnavailable) as refused:
        metrics.run_code_tests("assert True")
    message = str(refused.value)
    assert "\n" not in message
    assert "bubblewrap is not installed" in message and "--eval_unsafe_no_sandbox true" in message
    with pytest.raises(metrics.SandboxUnavailable):
        metrics.evaluate_code([{"test_list": ["assert True"]}], [["pass"]])
    with caplog.at_level(logging.WARNING, logger="finetune.metrics"):
        unsafe = metrics.run_code_tests("assert True", unsafe=True)
    assert (unsafe.status, unsafe.sandbox) == ("passed", "unsafe")
    assert "WITHOUT it" in caplog.text
    # The unsafe mode still keeps the verdict out of the program's reach and its audit hook.
    assert metrics.run_code_tests(FORGERIES["result_file"], unsafe=True).status == "error"
    blocked = metrics.run_code_tests("import subprocess\nsubprocess.run(['true'])", unsafe=True)
    assert "subprocess.Popen is not allowed" in blocked.detail
