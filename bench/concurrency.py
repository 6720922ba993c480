"""Many users at once: aggregate tokens/s and time to first chunk at 1, 4 and 8 concurrent requests.

    .venv/bin/python bench/concurrency.py [--model llama-105m|smollm2] [--repeats 3] [--tokens 128]
                                          [--threads N] [--inprocess] [--babl-url URL]
                                          [--babl-dtype bfloat16 | --babl-quantization nf4]

Starts, as children of this process, Babl (`chainlit run app.py` with a temporary catalog holding the
~105M random Llama, or SmolLM2-135M-Instruct with real weights with `--model smollm2`) and `transformers serve DIR --continuous-batching` on the same model directory in
the same dtype (fp32), then sends streamed greedy `POST /v1/completions` requests (128 new tokens,
a different prompt each) to:
  babl        Babl's API, N requests at once
  sequential  the same N requests to Babl, one after another
  serve       transformers serve with continuous batching, N requests at once
Rounds rotate the order of the targets; each figure is the median over --repeats rounds. Tokens are
the servers' usage counts when they send them, else streamed chunks (Babl streams one per token).

Goals (issue 10): babl@8 ≥ 1.0× serve@8 (≈ 3.7× sequential@8); p95 first chunk babl@8 ≤ 3× babl@1.
Stretch: `--babl-dtype bfloat16` or `--babl-quantization nf4` runs Babl with its CPU policy instead of
fp32 (serve stays fp32) and reports the logit drift of that load against fp32.

`--inprocess` measures Babl through `ChatService.complete` in this process instead of HTTP (for a
checkout without the API routes); its rows are labelled so. `--babl-url` uses a Babl you started
yourself (its catalog must have the entry `bench-model`). SmolLM2's prompts are framed by its chat template. JSON: bench/results/concurrency.json
(concurrency-smollm2.json for SmolLM2). A real model may end an answer before --tokens: tokens/s counts
the tokens written.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_models import (
    PROMPTS,
    ROOT,
    add_model_option,
    median,
    model_dir,
    percentile,
    result_name,
    say,
    write_catalog,
    write_result,
)

ENTRY = "bench-model"  # the benchmark catalog's one entry, on the --model chosen
LEVELS = (1, 4, 8)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A child server process, its log in a temp file; stopped when the benchmark ends."""

    def __init__(self, name: str, argv: list[str], port: int, env: dict, log_dir: Path, health: str):
        self.name, self.port, self.health = name, port, health
        self.log = log_dir / f"{name}.log"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 180) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(
                    f"{self.name} exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}"
                )
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}{self.health}", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"{self.name} did not answer {self.health} within {timeout_s:.0f} s; see {self.log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# --------------------------------------------------------------------------------------------------
# Clients


async def one_request(client, url: str, body: dict, t0: float) -> dict:
    """One streamed completion; times are from `t0` (when the whole group was sent)."""
    first = None
    chunks = 0
    usage_tokens = None
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")[:500]
            raise SystemExit(f"{url} answered {response.status_code}: {text}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            for choice in event.get("choices") or []:
                text = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                if text:
                    chunks += 1
                    if first is None:
                        first = time.perf_counter() - t0
            if event.get("usage"):
                usage_tokens = event["usage"].get("completion_tokens")
    return {"first_s": first, "tokens": usage_tokens if usage_tokens is not None else chunks,
            "done_s": time.perf_counter() - t0}  # fmt: skip


async def http_round(
    url: str, model: str, n: int, tokens: int, sequential: bool, prompts: list[str] = PROMPTS
) -> dict:
    import httpx

    bodies = [
        {"model": model, "prompt": prompts[i % len(prompts)], "max_tokens": tokens, "temperature": 0,
         "stream": True, "stream_options": {"include_usage": True}}
        for i in range(n)
    ]  # fmt: skip
    headers = (
        {"Authorization": f"Bearer {os.environ['BABL_API_KEY']}"} if os.environ.get("BABL_API_KEY") else {}
    )
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=10), headers=headers) as client:
        start = time.perf_counter()
        if sequential:
            results = []
            for body in bodies:
                results.append(await one_request(client, url, body, time.perf_counter()))
        else:
            results = await asyncio.gather(*(one_request(client, url, body, start) for body in bodies))
        wall = time.perf_counter() - start
    return summarize(results, wall)


async def inprocess_round(service, n: int, tokens: int, sequential: bool) -> dict:
    async def one(i: int, t0: float) -> dict:
        reply = service.complete(
            ENTRY,
            [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            temperature=0,
            max_new_tokens=tokens,
        )
        first = None
        async for _chunk in reply:
            if first is None:
                first = time.perf_counter() - t0
        return {"first_s": first, "tokens": reply.stats.completion_tokens, "done_s": time.perf_counter() - t0}

    start = time.perf_counter()
    if sequential:
        results = [await one(i, time.perf_counter()) for i in range(n)]
    else:
        results = await asyncio.gather(*(one(i, start) for i in range(n)))
    return summarize(results, time.perf_counter() - start)


def summarize(results: list[dict], wall: float) -> dict:
    firsts = [r["first_s"] for r in results if r["first_s"] is not None]
    total = sum(r["tokens"] for r in results)
    return {"tok_s": total / wall, "tokens": total, "wall_s": wall,
            "first_p50_s": percentile(firsts, 50), "first_p95_s": percentile(firsts, 95)}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Stretch: how far Babl's CPU dtype policy moves the logits


def logit_drift(model_dir: Path, dtype: str, quantization: str, steps: int = 32) -> dict:
    """Teacher-forced on fp32's greedy tokens: max/mean |Δlogit| and how often the top-1 agrees."""
    import torch

    from babl_core.engine.catalog import ModelSpec
    from babl_core.engine.loading import load_model, release

    def spec(d, q):
        return ModelSpec(id="drift", label="drift", task="chat", base=str(model_dir), kind="causal",
                         quantization=q, dtype=d, prompt_style="plain-chat")  # fmt: skip

    reference = load_model(spec("float32", "none"))
    enc = reference.tokenizer(PROMPTS[0], return_tensors="pt")
    with torch.inference_mode():
        out = reference.model.generate(**enc, max_new_tokens=steps, do_sample=False,
                                       pad_token_id=reference.tokenizer.pad_token_id)  # fmt: skip
        ref_logits = reference.model(out).logits[0, enc["input_ids"].shape[1] - 1 : -1].float()
    release(reference)
    other = load_model(spec(dtype, quantization))
    with torch.inference_mode():
        logits = other.model(out).logits[0, enc["input_ids"].shape[1] - 1 : -1].float()
    description = other.describe()
    release(other)
    diff = (logits - ref_logits).abs()
    agree = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    return {"load": description, "steps": steps, "max_abs_diff": diff.max().item(),
            "mean_abs_diff": diff.mean().item(), "top1_agreement": agree,
            "logit_std": ref_logits.std().item()}  # fmt: skip


# --------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3, help="rounds; figures are medians (default 3)")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per request (default 128)")
    parser.add_argument("--inprocess", action="store_true", help="Babl through ChatService here, not HTTP")
    parser.add_argument(
        "--babl-url", help="a running Babl (entry bench-model in its catalog) instead of starting one"
    )
    parser.add_argument("--no-serve", action="store_true", help="skip transformers serve")
    parser.add_argument("--babl-dtype", default="float32", help="Babl's dtype (stretch: bfloat16)")
    parser.add_argument("--babl-quantization", default="none", help="Babl's quantization (stretch: nf4)")
    parser.add_argument("--tiny", action="store_true", help="the tiny demo-size Llama: a quick smoke run")
    add_model_option(parser)
    parser.add_argument(
        "--threads", type=int, help="torch threads for Babl and serve alike (OMP_NUM_THREADS, BABL_THREADS); "
        "1 keeps figures stable on a machine other jobs share"
    )  # fmt: skip
    args = parser.parse_args()
    if args.threads:
        # Both servers read these at start; the in-process Babl applies BABL_THREADS when it loads.
        os.environ["OMP_NUM_THREADS"] = os.environ["BABL_THREADS"] = str(args.threads)

    # A TERM (e.g. from a CI timeout) unwinds through `finally`, so the servers and temp files go too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = Path(tempfile.mkdtemp(prefix="babl-bench-"))
    servers: list[Server] = []
    try:
        model_path = model_dir(args.model, tmp, tiny=args.tiny)
        catalog = write_catalog(
            tmp / "models.yaml",
            {ENTRY: {"base": model_path, "dtype": args.babl_dtype, "quantization": args.babl_quantization}},
        )
        # Every concurrent request comes from this one address: lift the per-client share (admission
        # control, default 4) so the rounds measure batching, not refusals.
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "BABL_MODELS": str(catalog), "PYTHONUNBUFFERED": "1",
               "BABL_MAX_PER_CLIENT": os.environ.get("BABL_MAX_PER_CLIENT", "64")}  # fmt: skip
        # A random-weight model continues any text; SmolLM2 gets each prompt framed by its chat template
        # (the same text to both servers; a bare prompt makes it write template tokens that decode to "").
        prompts = PROMPTS
        if args.model == "smollm2":
            from transformers import AutoTokenizer

            template = AutoTokenizer.from_pretrained(model_path)
            prompts = [
                template.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                )
                for p in PROMPTS
            ]
        service = None
        babl_url = None
        if args.inprocess:
            os.environ["BABL_MODELS"] = str(catalog)
            from babl_core.engine.service import ChatService

            service = ChatService()
        elif args.babl_url:
            babl_url = args.babl_url.rstrip("/") + "/v1/completions"
        else:
            port = free_port()
            chainlit = shutil.which("chainlit", path=str(Path(sys.executable).parent)) or "chainlit"
            babl = Server("babl", [chainlit, "run", "app.py", "--headless", "--host", "127.0.0.1", "--port",
                                   str(port)], port, env, tmp, "/health")  # fmt: skip
            servers.append(babl)
            babl_url = f"http://127.0.0.1:{port}/v1/completions"
        serve_url = None
        if not args.no_serve:
            port = free_port()
            exe = shutil.which("transformers", path=str(Path(sys.executable).parent)) or "transformers"
            serve = Server("serve", [exe, "serve", str(model_path), "--continuous-batching", "--host", "127.0.0.1",
                                     "--port", str(port), "--device", "cpu", "--dtype", "float32"],
                           port, env, tmp, "/health")  # fmt: skip
            servers.append(serve)
            serve_url = f"http://127.0.0.1:{port}/v1/completions"
        for server in servers:
            server.wait_ready()
            say(f"{server.name} ready on port {server.port}")

        # One event loop for every round, like a server's: its worker threads stay warm between rounds.
        loop = asyncio.new_event_loop()

        def run(target: str, n: int) -> dict:
            sequential = target == "sequential"
            if target == "serve":
                return loop.run_until_complete(
                    http_round(serve_url, str(model_path), n, args.tokens, False, prompts)
                )
            if service is not None:
                return loop.run_until_complete(inprocess_round(service, n, args.tokens, sequential))
            return loop.run_until_complete(http_round(babl_url, ENTRY, n, args.tokens, sequential, prompts))

        targets = ["babl", "sequential"] + ([] if args.no_serve else ["serve"])
        for target in targets:  # warm-up: loads the models, first-call kernels
            if target != "sequential":
                run(target, 1)
        rows: dict[str, list[dict]] = {}
        for rep in range(args.repeats):
            for n in LEVELS:
                order = targets[rep % len(targets) :] + targets[: rep % len(targets)]
                for target in order:
                    if target == "sequential" and n == 1:
                        continue  # one request alone is the babl@1 run
                    result = run(target, n)
                    rows.setdefault(f"{target}@{n}", []).append(result)
                    say(f"round {rep + 1} {target}@{n}: {result['tok_s']:.1f} tok/s, first chunk "
                        f"p50 {result['first_p50_s'] * 1000:.0f} ms p95 {result['first_p95_s'] * 1000:.0f} ms")  # fmt: skip
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        rows["sequential@1"] = rows["babl@1"]
        summary = {
            key: {
                metric: median(r[metric] for r in runs) for metric in ("tok_s", "first_p50_s", "first_p95_s")
            }
            for key, runs in rows.items()
        }
        drift = None
        if args.babl_dtype != "float32" or args.babl_quantization != "none":
            drift = logit_drift(model_path, args.babl_dtype, args.babl_quantization)
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    babl_label = "babl (in-process, no HTTP)" if args.inprocess else "babl"
    print(f"\n{'target':<28} {'N':>2} {'tok/s':>8} {'first p50':>10} {'first p95':>10}")
    for target in targets:
        for n in LEVELS:
            s = summary[f"{target}@{n}"]
            label = babl_label if target == "babl" else target
            print(f"{label:<28} {n:>2} {s['tok_s']:>8.1f} {s['first_p50_s'] * 1000:>8.0f}ms "
                  f"{s['first_p95_s'] * 1000:>8.0f}ms")  # fmt: skip
    b8, b1, q8 = summary["babl@8"], summary["babl@1"], summary["sequential@8"]
    ratios = {
        "babl8_vs_sequential8": b8["tok_s"] / q8["tok_s"],
        "babl8_p95_first_vs_babl1": b8["first_p95_s"] / b1["first_p95_s"],
    }
    print(f"\nbabl@8 / sequential@8 tokens/s: {ratios['babl8_vs_sequential8']:.2f}× (issue: ≈ 3.7×)")
    print(f"p95 first chunk babl@8 / babl@1: {ratios['babl8_p95_first_vs_babl1']:.2f}× (goal ≤ 3)")
    if not args.no_serve:
        ratios["babl8_vs_serve8"] = b8["tok_s"] / summary["serve@8"]["tok_s"]
        goal = 2.0 if drift else 1.0
        print(f"babl@8 / serve@8 tokens/s: {ratios['babl8_vs_serve8']:.2f}× (goal ≥ {goal:g})")
    if drift:
        print(f"logit drift of {drift['load']} vs fp32 over {drift['steps']} steps: max |Δ| "
              f"{drift['max_abs_diff']:.4f}, mean |Δ| {drift['mean_abs_diff']:.5f} (logit std "
              f"{drift['logit_std']:.3f}), top-1 agreement {drift['top1_agreement']:.0%}")  # fmt: skip
    path = write_result(result_name("concurrency", args.model), {
        "command": " ".join(sys.argv), "model": args.model, "mode": "inprocess" if args.inprocess else "http", "threads": args.threads,
        "tokens": args.tokens, "repeats": args.repeats, "babl_dtype": args.babl_dtype,
        "babl_quantization": args.babl_quantization, "summary": summary, "ratios": ratios, "drift": drift,
        "runs": rows,
    })  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
