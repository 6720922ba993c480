"""Memory per session: RSS with one session, and with eight sessions idle and active, on one model.

    .venv/bin/python bench/memory.py [--model llama-105m|smollm2] [--repeats 3] [--tokens 128]
                                     [--sessions 8] [--tiny]

Each scenario runs in a fresh child process (RSS never shrinks back inside one), alternating
one/eight over --repeats rounds; figures are medians. A child loads the ~105M random Llama (fp32; or
SmolLM2-135M-Instruct, real weights, with `--model smollm2`) through ChatService and:
  one    one session answers (RSS sampled every 20 ms: the peak while answering, then idle)
  eight  eight sessions answer at once (peak while active, with the batch's KV-cache size sampled
         alongside), then sit idle with their histories
Goal (issue 10): eight sessions ≤ 1.15× one session — weights are shared, never copied per session.
The KV cache of the running batch grows with rows × tokens and is reported separately (peak MB).
JSON: bench/results/memory.json (memory-smollm2.json for SmolLM2).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_models import (
    PROMPTS,
    add_model_option,
    median,
    model_dir,
    result_name,
    rss_mb,
    say,
    write_catalog,
    write_result,
)

ENTRY = "bench-model"  # the benchmark catalog's one entry, on the --model chosen


class Sampler:
    """Peak RSS and peak KV-cache MB while a block runs (a thread polling every 20 ms)."""

    def __init__(self, service):
        self.service = service
        self.peak_rss = 0.0
        self.peak_kv = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, rss_mb())
            self.peak_kv = max(self.peak_kv, self.service.cache.status().get("kv_cache_mb", 0.0))
            self._stop.wait(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, rss_mb())


def child(scenario: str, sessions: int, tokens: int) -> dict:
    """One scenario in this (fresh) process; returns its figures."""
    import torch  # noqa: F401  (imported first, so rss_imports_mb counts the libraries)
    import transformers  # noqa: F401

    from babl_core.engine.service import ChatService, ChatSession

    service = ChatService()
    settings = {"temperature": 0, "max_new_tokens": tokens}

    async def answer(session: ChatSession, text: str) -> int:
        reply = service.respond(session, text)
        async for _ in reply:
            pass
        return reply.stats.completion_tokens

    async def answer_all(group: list[ChatSession]) -> list[int]:
        return await asyncio.gather(*(answer(s, PROMPTS[i % len(PROMPTS)]) for i, s in enumerate(group)))

    out: dict = {"scenario": scenario, "rss_imports_mb": rss_mb()}
    # Load the model first (a warm-up answer), so every scenario starts from the same state.
    asyncio.run(answer(ChatSession(model_id=ENTRY, settings={**settings, "max_new_tokens": 4}), "warm up"))
    out["rss_loaded_mb"] = rss_mb()
    count = 1 if scenario == "one" else sessions
    group = [ChatSession(model_id=ENTRY, settings=settings) for _ in range(count)]
    with Sampler(service) as sampler:
        out["tokens"] = sum(asyncio.run(answer_all(group)))
    out["rss_active_peak_mb"] = sampler.peak_rss
    out["kv_cache_peak_mb"] = sampler.peak_kv
    time.sleep(0.2)
    out["rss_idle_mb"] = rss_mb()
    out["sessions_kept"] = sum(len(s.messages) == 2 for s in group)
    out["weights_mb"] = service.cache.status()["memory_mb"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3, help="rounds of (one, eight); medians (default 3)")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per answer (default 128)")
    parser.add_argument("--sessions", type=int, default=8, help="sessions in the busy scenario (default 8)")
    parser.add_argument("--tiny", action="store_true", help="the tiny demo-size Llama: a quick smoke run")
    add_model_option(parser)
    parser.add_argument("--child", choices=("one", "eight"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.sessions, args.tokens)))
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="babl-bench-"))
    rows: dict[str, list[dict]] = {"one": [], "eight": []}
    try:
        model_path = model_dir(args.model, tmp, tiny=args.tiny)
        env = {
            **os.environ,
            "BABL_MODELS": str(write_catalog(tmp / "models.yaml", {ENTRY: {"base": model_path}})),
        }
        for rep in range(args.repeats):
            for scenario in ("one", "eight") if rep % 2 == 0 else ("eight", "one"):
                cmd = [sys.executable, __file__, "--child", scenario, "--tokens", str(args.tokens),
                       "--sessions", str(args.sessions)]  # fmt: skip
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    raise SystemExit(f"child {scenario} failed:\n{done.stderr[-3000:]}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
                rows[scenario].append(result)
                say(f"round {rep + 1} {scenario}: loaded {result['rss_loaded_mb']:.0f} MB, active peak "
                    f"{result['rss_active_peak_mb']:.0f} MB, idle {result['rss_idle_mb']:.0f} MB, KV peak "
                    f"{result['kv_cache_peak_mb']:.1f} MB")  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    keys = (
        "rss_imports_mb",
        "rss_loaded_mb",
        "rss_active_peak_mb",
        "rss_idle_mb",
        "kv_cache_peak_mb",
        "weights_mb",
    )
    med = {s: {k: median(r[k] for r in runs) for k in keys} for s, runs in rows.items()}
    one, eight = med["one"], med["eight"]
    ratios = {
        "idle_eight_vs_one": eight["rss_idle_mb"] / one["rss_idle_mb"],
        "active_eight_vs_one": eight["rss_active_peak_mb"] / one["rss_active_peak_mb"],
        "active_eight_minus_kv_vs_one": (eight["rss_active_peak_mb"] - eight["kv_cache_peak_mb"])
        / (one["rss_active_peak_mb"] - one["kv_cache_peak_mb"]),
    }
    n = args.sessions
    print(
        f"\nweights (cache footprint): {one['weights_mb']:.0f} MB; RSS after imports {one['rss_imports_mb']:.0f} MB"
    )
    print(f"{'':<22} {'1 session':>10} {f'{n} sessions':>12} {'ratio':>7}")
    for label, key, ratio in (("idle (after answers)", "rss_idle_mb", "idle_eight_vs_one"),
                              ("active (peak)", "rss_active_peak_mb", "active_eight_vs_one")):  # fmt: skip
        print(f"{label:<22} {one[key]:>8.0f}MB {eight[key]:>10.0f}MB {ratios[ratio]:>6.3f}×")
    print(f"{'KV cache (peak)':<22} {one['kv_cache_peak_mb']:>8.1f}MB {eight['kv_cache_peak_mb']:>10.1f}MB")
    print(f"\ngoal {n} sessions ≤ 1.15× one: idle {ratios['idle_eight_vs_one']:.3f}×, active "
          f"{ratios['active_eight_vs_one']:.3f}× ({ratios['active_eight_minus_kv_vs_one']:.3f}× without the KV cache)")  # fmt: skip
    path = write_result(result_name("memory", args.model), {"command": " ".join(sys.argv), "model": args.model, "tokens": args.tokens, "sessions": n,
                                   "median": med, "ratios": ratios, "runs": rows})  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
