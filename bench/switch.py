"""Switching models: a warm switch (both cached) and a cold load against bare `from_pretrained`.

    .venv/bin/python bench/switch.py [--model llama-105m|smollm2] [--repeats 5] [--tiny]

In one process, with the ~105M random Llama (fp32; or SmolLM2-135M-Instruct, real weights, from its
converted folder with `--model smollm2`) and the tiny demo Llama in a temporary catalog:
  warm  `ChatService.switch_model` between the two while both are in the cache (what a user waits
        for when changing the dropdown back and forth)
  cold  `ChatService.switch_model` onto the large model with an empty cache (catalog check, load
        plan, tokenizer, weights, footprint), alternating with a bare
        `AutoModelForCausalLM.from_pretrained(dir)` + `AutoTokenizer.from_pretrained(dir)`
A first untimed round of each warms the OS page cache; figures are medians over --repeats.
Goals (issue 10): warm switch ≤ 100 ms; cold load ≤ 1.1× bare from_pretrained.
JSON: bench/results/switch.json (switch-smollm2.json for SmolLM2).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench_models import (
    add_model_option,
    build_llama_105m,
    median,
    model_dir,
    result_name,
    say,
    write_catalog,
    write_result,
)

BIG, SMALL = "bench-model", "bench-tiny"  # the --model chosen, and the tiny demo-size Llama


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each kind (default 5)")
    parser.add_argument(
        "--tiny", action="store_true", help="the tiny demo-size Llama only: a quick smoke run"
    )
    add_model_option(parser)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="babl-bench-"))
    try:
        big_dir = model_dir(args.model, tmp, tiny=args.tiny)
        small_dir = build_llama_105m(tmp / "llama-tiny", tiny=True)
        os.environ["BABL_MODELS"] = str(
            write_catalog(tmp / "models.yaml", {BIG: {"base": big_dir}, SMALL: {"base": small_dir}})
        )
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from babl_core.engine.cache import ModelCache
        from babl_core.engine.service import ChatService, ChatSession

        # -- warm: both bases cached, switch back and forth -------------------------------------
        service = ChatService(cache=ModelCache(max_models=2))
        session = ChatSession(model_id=SMALL)
        asyncio.run(service.switch_model(session, BIG))
        asyncio.run(service.switch_model(session, SMALL))
        warm = []
        for i in range(args.repeats * 2):
            target = BIG if i % 2 == 0 else SMALL
            start = time.perf_counter()
            asyncio.run(service.switch_model(session, target))
            warm.append(time.perf_counter() - start)
        assert service.cache.loads == 2, "a warm switch loaded a model again"
        del service, session
        gc.collect()

        # -- cold: an empty cache each time, alternating with bare from_pretrained ---------------
        def cold_switch() -> float:
            cold_service = ChatService(cache=ModelCache(max_models=1))
            start = time.perf_counter()
            asyncio.run(cold_service.switch_model(ChatSession(model_id=SMALL), BIG))
            elapsed = time.perf_counter() - start
            cold_service.cache.clear()
            return elapsed

        def bare() -> tuple[float, float]:
            start = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(big_dir, dtype=torch.float32)
            model_only = time.perf_counter() - start
            AutoTokenizer.from_pretrained(big_dir)
            elapsed = time.perf_counter() - start
            del model
            gc.collect()
            return elapsed, model_only

        cold_switch(), bare()  # page cache and first-call imports, untimed
        cold, bare_full, bare_model = [], [], []
        for i in range(args.repeats):
            for kind in ("cold", "bare") if i % 2 == 0 else ("bare", "cold"):
                if kind == "cold":
                    cold.append(cold_switch())
                else:
                    full, model_only = bare()
                    bare_full.append(full)
                    bare_model.append(model_only)
                gc.collect()
            say(f"round {i + 1}: cold switch {cold[-1] * 1000:.0f} ms, bare {bare_full[-1] * 1000:.0f} ms "
                f"(model only {bare_model[-1] * 1000:.0f} ms)")  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    figures = {
        "warm_switch_ms": median(warm) * 1000,
        "cold_switch_ms": median(cold) * 1000,
        "bare_from_pretrained_ms": median(bare_full) * 1000,
        "bare_model_only_ms": median(bare_model) * 1000,
    }
    ratio = figures["cold_switch_ms"] / figures["bare_from_pretrained_ms"]
    print(f"\nwarm switch (both cached): {figures['warm_switch_ms']:.1f} ms (goal ≤ 100 ms)")
    print(f"cold load via switch_model: {figures['cold_switch_ms']:.0f} ms; bare from_pretrained + tokenizer: "
          f"{figures['bare_from_pretrained_ms']:.0f} ms (model alone {figures['bare_model_only_ms']:.0f} ms)")  # fmt: skip
    print(f"cold / bare: {ratio:.2f}× (goal ≤ 1.1×)")
    path = write_result(result_name("switch", args.model), {"command": " ".join(sys.argv), "model": args.model, "median": figures, "cold_vs_bare": ratio,
                                   "runs": {"warm_s": warm, "cold_s": cold, "bare_s": bare_full,
                                            "bare_model_only_s": bare_model}})  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
