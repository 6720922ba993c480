"""Streaming overhead: ChatService streaming vs raw `model.generate`, same prompt and settings.

    .venv/bin/python bench/stream.py [--model llama-105m|smollm2] [--runs 5] [--tokens 200] [--skip-large]

Builds a ~105M-parameter random Llama in-process (hidden 768, 12 layers; or, with `--model smollm2`,
takes SmolLM2-135M-Instruct with real weights from its converted GGUF) and the tiny demo Llama,
serves each through a temporary catalog, and alternates raw and streamed runs. Prints, per model:
tokens/s ratio (streamed / raw; goal ≥ 0.97 on the large model) and first non-empty chunk vs raw
prefill + 1 token (goal ≤ 1.2×). Medians of the alternating runs; JSON to bench/results/stream.json
(stream-smollm2.json for SmolLM2). A real model may stop before --tokens: both sides count what they
wrote.
The tiny model's figures sit at the noise floor and are reported, not gated.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_models(root: Path, skip_large: bool, model: str = "llama-105m") -> dict[str, Path]:
    from babl_core.demo import build_causal_tokenizer, build_llama

    tok = build_causal_tokenizer()
    dirs = {}
    if model == "smollm2" and not skip_large:
        from bench_models import model_dir

        dirs["smollm2"] = model_dir("smollm2", root)
        skip_large = True  # the tiny Llama still comes next, as the noise floor
    large = dict(hidden=768, layers=12, heads=12, kv_heads=12, intermediate=2560)
    sizes = {"tiny": {}} if skip_large else {"105m": large, "tiny": {}}
    for name, kw in sizes.items():
        model = build_llama(tok, **kw)
        path = root / name
        model.save_pretrained(path)
        tok.save_pretrained(path)
        params = sum(p.numel() for p in model.parameters())
        print(f"built {name}: {params / 1e6:.1f}M parameters", file=sys.stderr)
        dirs[name] = path
    return dirs


def write_catalog(root: Path, dirs: dict[str, Path]) -> Path:
    import yaml

    entries = [
        {
            "id": f"bench-{name}",
            "task": "chat",
            "base": str(path),
            "kind": "causal",
            "quantization": "none",
            "dtype": "float32",
            "prompt_style": "plain-chat",
        }
        for name, path in dirs.items()
    ]
    path = root / "models.yaml"
    path.write_text(yaml.safe_dump({"models": entries}))
    return path


def measure(model_id: str, runs: int, tokens: int) -> dict:
    import torch

    from babl_core.engine.devices import in_passing_thread
    from babl_core.engine.service import ChatService, ChatSession

    service = ChatService()
    settings = {"temperature": 0, "max_new_tokens": tokens}
    question = "Write a short landing page for a bakery."

    async def streamed() -> tuple[float, float, int, str]:
        session = ChatSession(model_id=model_id, settings=settings)
        start = time.perf_counter()
        first = None
        reply = service.respond(session, question)
        async for chunk in reply:
            if first is None and chunk:
                first = time.perf_counter() - start
        total = time.perf_counter() - start
        return first, total, reply.stats.completion_tokens, reply.prompt.text

    # Warm-up: loads the model into the cache and gives the exact prompt text the service renders.
    _, _, _, prompt_text = asyncio.run(streamed())
    loaded = service.cache.acquire(service.spec(model_id))
    service.cache.release(loaded)
    model, tok = loaded.model, loaded.tokenizer
    enc = tok(prompt_text, return_tensors="pt", add_special_tokens=False)

    def raw_here(n: int) -> tuple[float, int]:
        with torch.inference_mode():
            start = time.perf_counter()
            out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
            return time.perf_counter() - start, out.shape[1] - enc["input_ids"].shape[1]

    def raw(n: int) -> tuple[float, int]:
        # In a thread that ends, like Babl's loads: a generate() on this (main) thread would leave it an
        # OpenMP pool that slows Babl's generating thread by a third (see devices.in_passing_thread).
        return in_passing_thread(raw_here, n)

    raw(4)
    rows = []
    for i in range(runs):
        order = ("raw", "stream") if i % 2 == 0 else ("stream", "raw")
        row = {}
        for what in order:
            if what == "raw":
                t_first, _ = raw(1)
                t_total, n = raw(tokens)
                row.update(raw_first_s=t_first, raw_tok_s=n / t_total)
            else:
                first, total, n, _ = asyncio.run(streamed())
                row.update(stream_first_s=first, stream_tok_s=n / total)
        rows.append(row)
        print(f"  {model_id} run {i + 1}: {row}", file=sys.stderr)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {
        "model": model_id,
        "runs": rows,
        "median": med,
        "tok_s_ratio": med["stream_tok_s"] / med["raw_tok_s"],
        "first_chunk_ratio": med["stream_first_s"] / med["raw_first_s"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5, help="alternating runs per model (default 5)")
    parser.add_argument("--tokens", type=int, default=200, help="new tokens per run (default 200)")
    parser.add_argument("--skip-large", action="store_true", help="only the tiny model (a quick smoke run)")
    parser.add_argument(
        "--model", choices=("llama-105m", "smollm2"), default="llama-105m",
        help="the large model: llama-105m (random weights, default) or smollm2 (SmolLM2-135M, real weights)",
    )  # fmt: skip
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dirs = build_models(root, args.skip_large, args.model)
        os.environ["BABL_MODELS"] = str(write_catalog(root, dirs))
        results = [measure(f"bench-{name}", args.runs, args.tokens) for name in dirs]
    print(f"\n{'model':<12} {'raw tok/s':>10} {'stream tok/s':>13} {'ratio':>7}   "
          f"{'raw first':>10} {'stream first':>13} {'ratio':>7}")  # fmt: skip
    for r in results:
        m = r["median"]
        print(f"{r['model']:<12} {m['raw_tok_s']:>10.1f} {m['stream_tok_s']:>13.1f} {r['tok_s_ratio']:>7.3f}   "
              f"{m['raw_first_s'] * 1000:>8.1f}ms {m['stream_first_s'] * 1000:>11.1f}ms {r['first_chunk_ratio']:>7.2f}")  # fmt: skip
    large = next((r for r in results if r["model"] != "bench-tiny"), None)
    if large:
        print(f"\ngoals on {large['model']}: tokens/s ratio {large['tok_s_ratio']:.3f} (≥ 0.97: "
              f"{'met' if large['tok_s_ratio'] >= 0.97 else 'NOT met'}), first chunk {large['first_chunk_ratio']:.2f}× "
              f"(≤ 1.2: {'met' if large['first_chunk_ratio'] <= 1.2 else 'NOT met'})")  # fmt: skip
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    name = "stream.json" if args.model == "llama-105m" else f"stream-{args.model}.json"
    (out / name).write_text(json.dumps(results, indent=2))
    print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
