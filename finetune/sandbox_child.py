"""The child side of the code sandbox: runs one program and reports its outcome to the evaluator.

`finetune.metrics.run_code_tests` starts this source with `python -I -c` (inside bubblewrap's
namespaces, or, only when the user asked for it, unsandboxed). It imports only the standard library.

Protocol: `python -I -c SOURCE VERDICT_FD MODE`. The request arrives on stdin as one JSON document
`{"program": ..., "nonce": ...}`; stdin is then closed. The verdict goes to the pipe VERDICT_FD as one
JSON line `{"nonce", "status", "detail"}`. The evaluator keeps the pipe's other end outside the
sandbox and accepts only a line that carries the run's nonce (never on the command line, in the
environment or in a file), so a program that writes a result file, prints "passed" or writes a made-up
line to the pipe and exits is not scored as passing. MODE `audit-hook` (the unsafe mode, no
namespaces) installs an audit hook that refuses socket and process calls before the program runs.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

# Socket calls that would reach the network, and calls that start processes (a child process is not
# covered by this process's audit hook, so it could open sockets unguarded).
BLOCKED_EVENTS = frozenset(
    {
        "socket.connect",
        "socket.bind",
        "socket.sendto",
        "socket.sendmsg",
        "socket.getaddrinfo",
        "socket.gethostbyname",
        "socket.gethostbyaddr",
        "socket.getnameinfo",
        "subprocess.Popen",
        "os.system",
        "os.exec",
        "os.posix_spawn",
        "os.spawn",
        "os.fork",
        "os.forkpty",
    }
)

DETAIL_CHARS = 2000
PROGRAM_FILE = "program.py"  # written to the working directory so tracebacks show the source lines


def refuse_network_and_processes(event: str, args: tuple) -> None:
    """Audit hook: raise on any blocked event (audit hooks cannot be removed once added)."""
    if event in BLOCKED_EVENTS:
        raise PermissionError(f"sandbox: {event} is not allowed (network and processes are blocked)")


def run(source: str) -> tuple[str, str]:
    """Run the program as `__main__`; return (status, detail) with status passed/failed/error."""
    try:
        code = compile(source, PROGRAM_FILE, "exec")
    except SyntaxError:
        return "error", traceback.format_exc(limit=0)[-DETAIL_CHARS:]
    try:
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    except AssertionError:
        # A failed assert is a wrong answer; anything else (exceptions, exit calls) is an error.
        return "failed", traceback.format_exc()[-DETAIL_CHARS:]
    except BaseException:
        return "error", traceback.format_exc()[-DETAIL_CHARS:]
    return "passed", ""


def main() -> None:
    verdict_fd, mode = int(sys.argv[1]), sys.argv[2]
    os.set_inheritable(verdict_fd, False)  # processes the program starts do not get the pipe
    request = json.loads(sys.stdin.buffer.read())
    nonce, source = request["nonce"], request["program"]
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    try:
        with open(PROGRAM_FILE, "w", encoding="utf-8") as handle:
            handle.write(source)
    except OSError:
        pass  # only the tracebacks' source lines are lost
    if mode == "audit-hook":
        sys.addaudithook(refuse_network_and_processes)
    status, detail = run(source)
    verdict = json.dumps({"nonce": nonce, "status": status, "detail": detail}) + "\n"
    os.write(verdict_fd, verdict.encode("utf-8"))
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter shutdown: a program's leftover non-daemon threads or atexit hooks must not
    # turn a finished run into a timeout.
    os._exit(0)


if __name__ == "__main__":
    main()
