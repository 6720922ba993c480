"""Demo models: tiny random-weight Llama, CodeGen and T5 built locally in seconds.

They stand in for the real catalog entries offline (tests, CI, a first `make run` with no hub):
`demo-html` (Llama), `demo-python` (CodeGen), and `demo-email` / `demo-qa` (one T5). The causal
models share a byte-level BPE tokenizer trained here on local text; T5 uses ByT5's byte tokenizer,
which needs no files. Weights are random, so the text they write is gibberish — the point is that
every code path (loading, adapters, streaming, training, the browser) runs for real.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from babl_core import settings

log = logging.getLogger(__name__)

# Bump when the recipe below changes, so `demo --if-missing` rebuilds stale demo models.
DEMO_VERSION = 6
MARKER = "babl-demo.json"
DEMO_DIRS = {"demo-html": "demo-html", "demo-python": "demo-python", "demo-t5": "demo-t5"}
CAUSAL_CONTEXT = 2048
T5_CONTEXT = 1024

# A Llama-2-style [INST] chat template, so `codellama-inst` renders through the tokenizer's template on
# the demo model exactly as it does on CodeLlama-Instruct, and OpenAI-style servers can use it too.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set messages = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ bos_token }}[INST] {% if loop.first and system %}<<SYS>>\n{{ system }}\n<</SYS>>\n\n{% endif %}"
    "{{ message['content'] | trim }} [/INST]"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ ' ' + message['content'] | trim }} {{ eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

_HTML_TEXT = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Landing page</title>
<style>body { font-family: sans-serif; margin: 0; } header { background: #234; color: white; padding: 1em; }
.button { border-radius: 4px; padding: 0.5em 1em; } footer { text-align: center; }</style></head>
<body><header><h1>Welcome</h1><nav><a href="#about">About</a> <a href="#contact">Contact</a></nav></header>
<main><section id="about"><h2>About us</h2><p>We build things.</p><ul><li>One</li><li>Two</li></ul></section>
<form><label for="email">Email</label><input type="email" id="email"><button class="button">Send</button></form>
<table><tr><th>Name</th><td>Value</td></tr></table><img src="data:image/png;base64," alt="logo"></main>
<footer><p>&copy; 2026 Example</p></footer></body></html>
Dear team, please find the agenda for Friday's meeting attached. Best regards, Alice.
question: Who wrote the report? context: The report was written by the finance group in March.
"""


def _corpus() -> list[str]:
    """Local text to train the demo tokenizer on: a fixed slice of the stdlib plus HTML and prose."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [_HTML_TEXT * 20]
    for name in (
        "json",
        "html",
        "email",
        "http",
        "csv",
        "textwrap",
        "string",
        "difflib",
        "argparse",
        "logging",
    ):
        path = stdlib / name
        files = sorted(path.glob("*.py")) if path.is_dir() else [stdlib / f"{name}.py"]
        for file in files:
            if file.is_file():
                texts.append(file.read_text(encoding="utf-8", errors="ignore"))
    return texts


def build_causal_tokenizer(vocab_size: int = 4096):
    """A byte-level BPE trained on local text in about a second, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    # Prepend <s> like Llama's tokenizer does, so prompts start the same way in training and chat.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=CAUSAL_CONTEXT,
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_t5_tokenizer():
    from transformers import ByT5Tokenizer

    # No sentinel tokens: the demo model would otherwise often pick them, and they decode to nothing.
    return ByT5Tokenizer(extra_ids=0, model_max_length=T5_CONTEXT)


def _ids(tokenizer) -> dict[str, int]:
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def build_llama(
    tokenizer,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    seed: int = 0,
    init_std: float | None = None,
):
    """A random-weight Llama; `init_std` above the default (0.02) gives well-separated top tokens."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate or hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=CAUSAL_CONTEXT,
        tie_word_embeddings=False,
        **({"initializer_range": init_std} if init_std else {}),
        **_ids(tokenizer),
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def build_codegen(tokenizer, *, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 1):
    import torch
    from transformers import CodeGenConfig, CodeGenForCausalLM

    config = CodeGenConfig(
        vocab_size=len(tokenizer),
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        rotary_dim=8,
        n_positions=CAUSAL_CONTEXT,
        n_ctx=CAUSAL_CONTEXT,
        tie_word_embeddings=False,
        **_ids(tokenizer),
    )
    torch.manual_seed(seed)
    return CodeGenForCausalLM(config).eval()


def build_t5(tokenizer, *, d_model: int = 64, layers: int = 2, heads: int = 4, seed: int = 2):
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // heads,
        d_ff=d_model * 2,
        num_layers=layers,
        num_decoder_layers=layers,
        num_heads=heads,
        decoder_start_token_id=tokenizer.pad_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config).eval()
    # Random weights over raw bytes would mostly write invalid UTF-8. Zeroing the output rows of
    # non-printable bytes makes the demo write readable (if meaningless) ASCII; EOS stays possible.
    offset = 3  # ByT5: pad, eos, unk, then bytes 0..255
    printable = [offset + b for b in range(32, 127)] + [offset + 10, tokenizer.eos_token_id]
    with torch.no_grad():
        keep = torch.zeros(model.lm_head.weight.shape[0], dtype=torch.bool)
        keep[printable] = True
        model.lm_head.weight[~keep] = 0.0
        model.lm_head.weight *= 0.3  # flatter logits, so sampling varies
    return model


def _save(model, tokenizer, target: Path, name: str, arch: str) -> None:
    """Write atomically: a temp dir beside the target, renamed into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        params = sum(p.numel() for p in model.parameters())
        marker = {"version": DEMO_VERSION, "name": name, "architecture": arch, "parameters": params,
                  "note": "demo model: random weights, built by python -m babl_core demo"}  # fmt: skip
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_current(path: Path) -> bool:
    try:
        return json.loads((path / MARKER).read_text()).get("version") == DEMO_VERSION
    except (OSError, ValueError):
        return False


def build_demo_models(out_dir: Path | None = None, *, if_missing: bool = False, quiet: bool = False) -> dict:
    """Build the three demo model directories; returns {name: (path, built: bool)}."""
    out_dir = Path(out_dir) if out_dir else settings.demo_dir()
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr))
    targets = {name: out_dir / sub for name, sub in DEMO_DIRS.items()}
    todo = {n: p for n, p in targets.items() if not (if_missing and is_current(p))}
    result = {n: (p, n in todo) for n, p in targets.items()}
    if not todo:
        say(f"demo models are up to date in {settings.portable_path(out_dir)}")
        return result
    start = time.perf_counter()
    causal_tok = build_causal_tokenizer() if {"demo-html", "demo-python"} & set(todo) else None
    builders = {
        "demo-html": lambda: (build_llama(causal_tok), causal_tok, "llama"),
        "demo-python": lambda: (build_codegen(causal_tok), causal_tok, "codegen"),
        "demo-t5": lambda: (build_t5(build_t5_tokenizer()), build_t5_tokenizer(), "t5"),
    }
    for name, path in todo.items():
        model, tokenizer, arch = builders[name]()
        _save(model, tokenizer, path, name, arch)
        say(f"built {name} ({arch}, random weights) in {settings.portable_path(path)}")
    say(f"demo models ready in {time.perf_counter() - start:.1f} s")
    return result
