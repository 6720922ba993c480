"""`python -m finetune.launch`: `accelerate launch` with one line, not a traceback, when a process fails.

    .venv/bin/python -m finetune.launch --config_file configs/accelerate/ddp.yaml -m finetune train --config FILE

It takes exactly `accelerate launch`'s arguments and runs its launcher in this process. Under plain
`accelerate launch`, a training process that stops with a reason (a config problem, a missing base)
prints that reason, and then the launcher adds ~30 lines: torch elastic's log lines, a Python traceback
of the launcher itself and a failure table that says only "exitcode: 2". Here the reason (printed once,
by the main process: `finetune` keeps the other processes quiet about errors they all share) is followed
by one line naming the failed process, and the exit code is that process's own (2: bad config, 3: base
unavailable, as `python -m finetune`).
"""

from __future__ import annotations

import logging
import subprocess
import sys


def failure_line(rank: int, exitcode: int) -> str:
    how = f"exit code {exitcode}" if exitcode >= 0 else f"signal {-exitcode}"
    return f"finetune.launch: training process {rank} stopped ({how}); its reason is printed above"


def main(argv: list[str] | None = None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    parser = launch_command_parser()
    parser.prog = "python -m finetune.launch"
    args = parser.parse_args(argv)
    # torch elastic logs each process it stops and each failure (W/E lines) before raising: the line below
    # says the same once.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        launch_command(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()  # the root cause: the first process that stopped
        print(failure_line(rank, failure.exitcode), file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    except subprocess.CalledProcessError as exc:  # the single-process launcher (e.g. --cpu)
        print(failure_line(0, exc.returncode), file=sys.stderr)
        return exc.returncode if exc.returncode > 0 else 1
    except KeyboardInterrupt:
        print("finetune.launch: interrupted", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
