"""Which precision to serve SmolLM2-135M-Instruct in on CPU: answer quality and speed, measured together.

    .venv/bin/python bench/precision.py [--loads fp32,bf16,nf4] [--tokens 48] [--users 8]

Loads the shipped `smollm2-chat` entry (its system prompt, chat template and greedy settings) three
ways through ChatService — fp32, bf16, and bitsandbytes nf4 with bf16 compute — one at a time, and
for each:
  quality  ten short questions with known answers (facts, arithmetic, one Python function), asked one
           by one; an answer counts when it contains the expected word (any of a few spellings)
  speed    tokens/s of those answers (one user), and aggregate tokens/s with --users questions at
           once (one batch)
The GGUF's weights are 4-bit (Q4_1): dequantized to fp32 they are exact; bf16 rounds them; nf4
quantizes them a second time. JSON: bench/results/precision.json.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from dataclasses import replace

from bench_models import ROOT, say, write_result

# (question, pattern the answer must contain; case-insensitive)
QUESTIONS = [
    ("What is the capital of France?", r"paris"),
    ("What is the largest planet in our solar system?", r"jupiter"),
    ("How many days are in a week?", r"\b(seven|7)\b"),
    ("What is the chemical formula of water?", r"h2o|h₂o"),
    ("Who wrote Romeo and Juliet?", r"shakespeare"),
    ("What is 12 times 12?", r"\b144\b"),
    ("Which gas do plants take in from the air to make food?", r"carbon dioxide|co2|co₂"),
    (
        "Write a Python function named add that returns the sum of two numbers.",
        r"def add\(.*\n(.*\n)*.*return",
    ),
    ("At what temperature in degrees Celsius does water boil at sea level?", r"\b100\b"),
    ("On which continent is Kenya?", r"africa"),
]
LOADS = {
    "fp32": {"quantization": "none", "dtype": "float32"},
    "bf16": {"quantization": "none", "dtype": "bfloat16"},
    "nf4": {"quantization": "nf4", "dtype": "bfloat16"},
}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--loads", default="fp32,bf16,nf4", help="which loads, comma-separated (default all)")
    parser.add_argument("--tokens", type=int, default=48, help="max new tokens per answer (default 48)")
    parser.add_argument(
        "--users", type=int, default=8, help="questions at once for the batch speed (default 8)"
    )
    args = parser.parse_args()

    from babl_core.engine.cache import ModelCache
    from babl_core.engine.catalog import Catalog
    from babl_core.engine.service import ChatService

    shipped = Catalog.load(ROOT / "configs" / "models.yaml").get("smollm2-chat")
    names = [name.strip() for name in args.loads.split(",") if name.strip()]
    specs = {name: replace(shipped, id=f"smollm2-{name}", **LOADS[name]) for name in names}
    service = ChatService(Catalog(list(specs.values())), ModelCache(max_models=1))

    async def ask(model_id: str, question: str) -> tuple[str, int, float]:
        start = time.perf_counter()
        reply = service.complete(
            model_id, [{"role": "user", "content": question}], max_new_tokens=args.tokens
        )
        text = "".join([chunk async for chunk in reply])
        return text, reply.stats.completion_tokens, time.perf_counter() - start

    async def batch(model_id: str) -> tuple[int, float]:
        start = time.perf_counter()
        questions = [QUESTIONS[i % len(QUESTIONS)][0] for i in range(args.users)]
        results = await asyncio.gather(*(ask(model_id, q) for q in questions))
        return sum(r[1] for r in results), time.perf_counter() - start

    rows = {}
    for name, spec in specs.items():
        asyncio.run(ask(spec.id, "Hello"))  # load (evicting the previous one) and warm up
        answers, tokens, seconds = [], 0, 0.0
        for question, pattern in QUESTIONS:
            text, n, s = asyncio.run(ask(spec.id, question))
            tokens, seconds = tokens + n, seconds + s
            answers.append(
                {"question": question, "answer": text, "right": bool(re.search(pattern, text, re.I))}
            )
            say(
                f"{name}: {'right' if answers[-1]['right'] else 'WRONG'}: {question} -> {text.strip()[:80]!r}"
            )
        batch_tokens, batch_seconds = asyncio.run(batch(spec.id))
        loaded = service.cache.status()["bases"][0]
        rows[name] = {
            "right": sum(a["right"] for a in answers),
            "tok_s_one_user": tokens / seconds,
            f"tok_s_{args.users}_users": batch_tokens / batch_seconds,
            "memory_mb": loaded["memory_mb"],
            "description": loaded["description"],
            "answers": answers,
        }
        say(f"{name}: {rows[name]['right']}/10, {rows[name]['tok_s_one_user']:.1f} tok/s (1 user), "
            f"{rows[name][f'tok_s_{args.users}_users']:.1f} tok/s ({args.users} users)")  # fmt: skip

    print(f"\n{'load':<6} {'right':>6} {'tok/s 1 user':>13} {f'tok/s {args.users} users':>14} {'memory':>8}")
    for name, row in rows.items():
        print(f"{name:<6} {row['right']:>4}/10 {row['tok_s_one_user']:>13.1f} "
              f"{row[f'tok_s_{args.users}_users']:>14.1f} {row['memory_mb']:>6.0f}MB")  # fmt: skip
    if "fp32" in rows:
        base = rows["fp32"]
        for name, row in rows.items():
            if name != "fp32":
                print(f"{name} vs fp32: {row['tok_s_one_user'] / base['tok_s_one_user']:.2f}× (1 user), "
                      f"{row[f'tok_s_{args.users}_users'] / base[f'tok_s_{args.users}_users']:.2f}× "
                      f"({args.users} users), {row['right'] - base['right']:+d} right")  # fmt: skip
    path = write_result("precision", {"command": " ".join(sys.argv), "tokens": args.tokens, "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
