"""The child side of the code sandbox: runs one program file and writes its outcome as JSON.

`finetune.metrics.run_code_tests` starts this file as a script (`python -I sandbox_child.py ...`)
inside a temporary directory, with resource limits already set and, where the kernel allows, in a
network namespace of its own. It imports only the standard library: `-I` keeps the repo and the
user's site-packages settings off `sys.path`.

Usage: `python -I sandbox_child.py PROGRAM RESULT_JSON GUARD` where GUARD is the network guard the
parent chose; for `audit-hook` this script installs an audit hook that refuses socket and process
calls before the program runs (the fallback when no network namespace can be made).
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


def refuse_network_and_processes(event: str, args: tuple) -> None:
    """Audit hook: raise on any blocked event (audit hooks cannot be removed once added)."""
    if event in BLOCKED_EVENTS:
        raise PermissionError(f"sandbox: {event} is not allowed (network and processes are blocked)")


def run(program_path: str) -> tuple[str, str]:
    """Run the program as `__main__`; return (status, detail) with status passed/failed/error."""
    with open(program_path, encoding="utf-8") as handle:
        source = handle.read()
    try:
        code = compile(source, "program.py", "exec")
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
    program_path, result_path, guard = sys.argv[1:4]
    if guard == "audit-hook":
        sys.addaudithook(refuse_network_and_processes)
    status, detail = run(program_path)
    with open(result_path, "w", encoding="utf-8") as handle:
        json.dump({"status": status, "detail": detail}, handle)
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter shutdown: a program's leftover non-daemon threads or atexit hooks must not
    # turn a finished run into a timeout.
    os._exit(0)


if __name__ == "__main__":
    main()
