"""`python -m finetune merge`: fold a LoRA adapter into its base model for export, checked before it is kept.

    python -m finetune merge --adapter models/adapters/<run> [--out DIR] [--base REF] [--dtype D]
                             [--tolerance T] [--overwrite]
    python -m finetune merge --config configs/finetune/<recipe>.yaml [same options]

`--adapter` names the adapter directory (or just its run name); `--config` names the run's training config
instead, and merges the adapter that config trained. The result, `models/merged/<run>/` unless `--out`
says otherwise, is a plain model directory (safetensors weights, config, tokenizer) that serves as any
catalog entry's `base`; the command prints the entry to paste into configs/models.yaml.

Never into a 4-/8-bit base: LoRA's low-rank update is small next to the weights, and adding it to 4-bit
(nf4) or 8-bit weights rounds most of it away, so the export would not be the model that was trained. The
base is always loaded unquantized: float32 on CPU, the entry's dtype on CUDA (bfloat16 where supported for
`auto`). A QLoRA adapter (trained on an nf4 base) is merged the same way; serve the merged model in nf4
again if you like (catalog `quantization: nf4`), which quantizes it after the merge. Asking for a
quantized merge (`--quantization nf4|int8`, or a `--base` checkpoint saved already quantized) is refused,
with the fix in the message.

The check: logits of base + adapter on a few examples in the adapter's prompt style (prompt and answer, so
the answer positions count too) are computed before merging; the merged weights are saved to a staging
directory, loaded back through `babl_core.engine.loading` as the app would load them, and run on the same
examples. The largest absolute logit difference is reported; above `--tolerance` (default by dtype:
0.01 for float32, 0.05 for float16, 0.25 for bfloat16) the staged output is deleted and the command exits
1. Only a checked merge is renamed into place, so `models/merged/` never holds an unchecked export.

Exit codes as for `train`: 0 ok, 1 the check failed, 2 bad arguments or a refused merge, 3 base unavailable.
Heavy imports happen inside the functions, so `--help` is instant.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from babl_core import settings
from finetune.files import RunNotFound, find_adapter_dir, staged_dir

log = logging.getLogger("finetune")

MERGED_META_FILE = "babl-merged.json"
CATALOG_SNIPPET_FILE = "catalog-entry.yaml"
QUANTIZED = ("nf4", "int8")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# Float rounding differs between W·x + B(A·x) and (W + BA)·x. Measured on random-weight models: float32
# 4e-7 (tiny Llama) to 1.2e-4 (tiny T5 with a strong adapter), 7e-6 on a 105M Llama; bfloat16 0.08 on
# the 105M Llama. The defaults leave room for larger logits on real models and still catch a merge that
# lost part of its update (scaling one attention weight of the tiny Llama by 0.9 moved the logits by 0.07).
DEFAULT_TOLERANCE = {"float32": 1e-2, "float16": 5e-2, "bfloat16": 2.5e-1}

# Check examples, written for this check. Each style takes the fields it knows; the answer is included so
# that logits at answer positions (what the adapter was trained on) are compared too.
CHECK_EXAMPLES = (
    {
        "instruction": "Write a function that returns the sum of a list of numbers.",
        "input": "",
        "output": "def total(numbers):\n    return sum(numbers)\n",
        "response": "<!DOCTYPE html><html><body><h1>Sums</h1><p>1 + 2 = 3</p></body></html>",
        "prompt": "What is the sum of one and two?",
        "key_points": "meeting moved to Friday; bring the budget",
        "body": "Hi Ben, the meeting is now on Friday. Please bring the budget. Ana",
        "sender": "Ana",
        "recipient": "Ben",
        "question": "When is the meeting?",
        "context": "The weekly meeting was moved from Thursday to Friday at ten.",
        "answer": "Friday at ten",
        "text": "Return the sum of a list of numbers.",
        "code": "def total(numbers):\n    return sum(numbers)",
    },
    {
        "instruction": "Make a landing page for a bakery with a menu and opening hours.",
        "input": "Bakery name: Crumb",
        "output": "def opening_hours():\n    return {'mon': '8-18', 'sun': None}\n",
        "response": "<!DOCTYPE html><html><head><title>Crumb</title></head><body><ul><li>Bread</li></ul></body></html>",
        "prompt": "Name three kinds of bread.",
        "key_points": "order confirmed; delivery on Monday",
        "body": "Dear customer, your order is confirmed and will be delivered on Monday.",
        "sender": "Crumb bakery",
        "recipient": "a customer",
        "question": "Who bakes the bread?",
        "context": "Crumb is a small bakery; its two bakers start at four every morning.",
        "answer": "two bakers",
        "text": "Return the opening hours of a shop as a dictionary.",
        "code": "def opening_hours():\n    return {'mon': '8-18'}",
    },
    {
        "instruction": "Reverse the words in a sentence.",
        "input": "hello brave new world",
        "output": "def reverse_words(text):\n    return ' '.join(reversed(text.split()))\n",
        "response": "<form><label for='q'>Search</label><input id='q'><button>Go</button></form>",
        "prompt": "Say hello in French.",
        "key_points": "thanks for the report; two questions on page 3",
        "body": "Thank you for the report. I have two questions about page 3; can we talk tomorrow?",
        "sender": "Li",
        "recipient": "the finance team",
        "question": "What does the function return?",
        "context": None,
        "answer": "the reversed sentence",
        "text": "Reverse the order of the words in a sentence.",
        "code": "def reverse_words(text):\n    return ' '.join(reversed(text.split()))",
    },
)


class MergeError(ValueError):
    """The merge cannot run as asked (bad arguments, or a refused quantized merge); the message has the fix."""


class MergeCheckFailed(RuntimeError):
    """The merged model's logits differ from base + adapter by more than the tolerance."""

    def __init__(self, message: str, check: MergeCheck):
        super().__init__(message)
        self.check = check


@dataclass
class MergePlan:
    """What `merge_adapter` will do, decided (and checked) before any weights are loaded."""

    adapter_dir: Path
    run_name: str
    base: str
    """As the catalog writes it: a hub id or a path (relative to the repo root, or models/...)."""
    kind: str
    task: str
    prompt_style: str
    label: str
    device: str
    dtype: str
    tolerance: float
    out_dir: Path
    overwrite: bool = False
    serve_quantization: str = "auto"
    """What the printed catalog entry suggests for serving (the adapter's catalog twin's setting)."""
    notes: list[str] = field(default_factory=list)


@dataclass
class MergeCheck:
    """How closely the merged model reproduces base + adapter."""

    max_abs_diff: float
    tolerance: float
    examples: int
    positions: int
    top1_agreement: float
    """Share of positions whose most likely next token is the same in both."""

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def as_dict(self) -> dict:
        return {
            "max_abs_diff": self.max_abs_diff,
            "tolerance": self.tolerance,
            "examples": self.examples,
            "positions": self.positions,
            "top1_agreement": round(self.top1_agreement, 6),
            "passed": self.passed,
        }


@dataclass
class MergeResult:
    out_dir: Path
    check: MergeCheck
    seconds: float
    catalog_entry: dict


# --------------------------------------------------------------------------------------------------
# Planning: every refusal happens here, before weights are read


def quantized_checkpoint_reason(base: str) -> str | None:
    """Why `base` is a checkpoint saved quantized (its config.json has a quantization_config), or None."""
    from babl_core.engine.catalog import hub_cached_dir, looks_like_path

    config_dir = settings.resolve_path(base) if looks_like_path(base) else hub_cached_dir(base)
    if config_dir is None or not (config_dir / "config.json").is_file():
        return None
    try:
        config = json.loads((config_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    quant = config.get("quantization_config")
    if not quant:
        return None
    method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else "unknown"
    bits = ""
    if isinstance(quant, dict):
        bits = "4-bit " if quant.get("load_in_4bit") else "8-bit " if quant.get("load_in_8bit") else ""
    return f"{base} is a checkpoint saved {bits}quantized ({method})"


def _catalog_twin(adapter_dir: Path, base: str):
    """The catalog entry serving this adapter (claimed or discovered), or one on the same base, or None."""
    from babl_core.engine.catalog import Catalog, CatalogError

    try:
        catalog = Catalog.load()
        specs = catalog.list()
    except CatalogError:
        return None
    target = adapter_dir.resolve()
    for spec in specs:
        if spec.adapter and settings.resolve_path(spec.adapter).resolve() == target:
            return spec
    for spec in catalog.entries:
        if spec.backend == "local" and spec.base == base:
            return spec
    return None


def plan_merge(
    adapter: str, *, base: str | None = None, out: str | None = None, dtype: str = "auto",
    quantization: str = "none", tolerance: float | None = None, overwrite: bool = False,
    entry_dtype: str | None = None,
) -> MergePlan:  # fmt: skip
    """Decide what to load and where to write, refusing what must not be done.

    Args:
        adapter: adapter directory or run name.
        base: the base to merge into (default: the one the adapter was trained on, from babl.json).
        out: output directory (default models/merged/<run>).
        dtype: weight dtype for the merge; auto: float32 on CPU, the entry's dtype on CUDA.
        quantization: must be none; nf4/int8 are refused (see the module docstring).
        tolerance: largest allowed absolute logit difference (default by dtype).
        overwrite: replace an existing output directory.
        entry_dtype: the dtype the run or catalog entry uses (the CUDA default), when known.

    Raises:
        MergeError: every problem found, in one message.
    """
    from babl_core.engine.catalog import DEFAULT_STYLE_FOR_TASK, BaseWeights, detect_kind
    from babl_core.engine.devices import resolve_device

    problems: list[str] = []
    if quantization in QUANTIZED:
        problems.append(
            f"--quantization {quantization}: refusing to merge into a {quantization} base: adding the LoRA "
            f"update to {'4' if quantization == 'nf4' else '8'}-bit weights rounds most of it away, so the "
            "export would not be the model you trained. Drop --quantization (the base loads unquantized: "
            "float32 on CPU, bfloat16/float16 on CUDA) and quantize when serving instead: set "
            f"`quantization: {quantization}` on the merged model's catalog entry"
        )
    elif quantization not in ("none", "auto"):
        problems.append(f"--quantization {quantization!r}: use none (merges never load a quantized base)")
    if dtype not in DTYPES:
        problems.append(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if tolerance is not None and not tolerance > 0:
        problems.append(f"--tolerance {tolerance}: must be above 0, e.g. 0.01")
    try:
        adapter_dir = find_adapter_dir(adapter)
    except RunNotFound as exc:
        raise MergeError(str(exc)) from None
    meta = _read_json(adapter_dir / "babl.json")
    adapter_config = _read_json(adapter_dir / "adapter_config.json") or {}
    if adapter_config.get("peft_type", "LORA") != "LORA":
        problems.append(
            f"--adapter: {adapter_config.get('peft_type')} adapters cannot be merged here; only LoRA adapters"
        )
    from finetune.outputs import portable_base

    base_ref = base or (meta or {}).get("base") or adapter_config.get("base_model_name_or_path")
    if not base_ref:
        problems.append(
            "--base: the adapter records no base model (no babl.json base, no base_model_name_or_path); "
            "name it with --base <hub id or model directory>"
        )
    else:
        base_ref = portable_base(base_ref)
        reason = quantized_checkpoint_reason(base_ref)
        if reason:
            problems.append(
                f"--base: {reason}; merging into it would round the LoRA update away. Point --base at the "
                "unquantized original (the bf16/fp32 checkpoint it was made from)"
            )
    if problems:
        raise MergeError("cannot merge:\n" + "\n".join(f"  - {p}" for p in problems))

    run_name = adapter_dir.name
    task = (meta or {}).get("task") or "chat"
    style = (meta or {}).get("prompt_style") or DEFAULT_STYLE_FOR_TASK.get(task, "plain-chat")
    task_type = adapter_config.get("task_type")
    kind_hint = {"SEQ_2_SEQ_LM": "seq2seq", "CAUSAL_LM": "causal"}.get(task_type)
    kind = kind_hint or detect_kind(BaseWeights(base=base_ref))
    twin = _catalog_twin(adapter_dir, base_ref)
    device = resolve_device()
    notes: list[str] = []
    chosen = dtype
    if chosen == "auto":
        if device.startswith("cuda"):
            import torch

            wanted = entry_dtype or (twin.dtype if twin else "auto")
            bf16 = torch.cuda.is_bf16_supported()
            chosen = wanted if wanted in ("float32", "float16") else "bfloat16" if bf16 else "float16"
            if wanted == "bfloat16" and not bf16:
                notes.append("bfloat16 is not supported on this GPU; merged in float16")
        else:
            chosen = "float32"  # half precision is slow on CPU, and float32 is the exact merge
    out_dir = settings.resolve_path(out) if out else settings.models_dir() / "merged" / run_name
    if out_dir.exists() and not overwrite:
        raise MergeError(
            f"--out: {settings.portable_path(out_dir)} already exists; pass --overwrite to replace it, or "
            "choose another --out"
        )
    serve_quantization = twin.quantization if twin else "auto"
    return MergePlan(
        adapter_dir=adapter_dir, run_name=run_name, base=base_ref, kind=kind, task=task, prompt_style=style,
        label=(meta or {}).get("label") or run_name, device=device, dtype=chosen,
        tolerance=tolerance if tolerance is not None else DEFAULT_TOLERANCE[chosen], out_dir=out_dir,
        overwrite=overwrite, serve_quantization=serve_quantization, notes=notes,
    )  # fmt: skip


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MergeError(f"--adapter: {settings.portable_path(path)} is not valid JSON: {exc}") from None
    return data if isinstance(data, dict) else None


# --------------------------------------------------------------------------------------------------
# The merge and its check


def check_inputs(tokenizer, *, style_name: str, kind: str) -> list[dict]:
    """Model inputs (CPU tensors) for the check: each example's prompt and answer in the adapter's style."""
    import torch

    from babl_core.engine.prompts import get_style

    style = get_style(style_name)
    names = (*style.required_fields, *style.optional_fields)
    inputs = []
    for example in CHECK_EXAMPLES:
        fields = {name: example.get(name) for name in names}
        prompt, target = style.training_pair(fields, tokenizer)
        if kind == "seq2seq":
            source = tokenizer(prompt, return_tensors="pt")["input_ids"]
            labels = tokenizer(text_target=target)["input_ids"]
            start = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            inputs.append({"input_ids": source, "decoder_input_ids": torch.tensor([[start, *labels[:-1]]])})
        else:
            add_special = not style.uses_bos_in_text(tokenizer)
            prompt_ids = tokenizer(prompt, add_special_tokens=add_special)["input_ids"]
            target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
            inputs.append({"input_ids": torch.tensor([prompt_ids + target_ids])})
    return inputs


def logits_on(model, inputs: list[dict], device: str) -> list:
    """float32 CPU logits of `model` on each input (one forward pass each, no padding involved)."""
    import torch

    outputs = []
    with torch.inference_mode():
        for item in inputs:
            batch = {key: value.to(device) for key, value in item.items()}
            outputs.append(model(**batch).logits[0].float().cpu())
    return outputs


def compare_logits(reference: list, merged: list, tolerance: float) -> MergeCheck:
    """The largest absolute difference and the top-1 agreement between two lists of [positions, vocab]."""
    worst, agree, positions = 0.0, 0, 0
    for ref, new in zip(reference, merged, strict=True):
        if ref.shape != new.shape:
            raise MergeCheckFailed(
                f"merged logits have shape {tuple(new.shape)}, expected {tuple(ref.shape)}",
                MergeCheck(float("inf"), tolerance, len(reference), 0, 0.0),
            )
        worst = max(worst, float((ref - new).abs().max()))
        agree += int((ref.argmax(-1) == new.argmax(-1)).sum())
        positions += ref.shape[0]
    return MergeCheck(worst, tolerance, len(reference), positions, agree / max(positions, 1))


def catalog_entry(plan: MergePlan, out_dir: Path) -> dict:
    """The configs/models.yaml entry that serves the merged model."""
    return {
        "id": f"{plan.run_name}-merged",
        "label": f"{plan.label} (merged)",
        "task": plan.task,
        "base": settings.portable_path(out_dir),
        "kind": plan.kind,
        "quantization": plan.serve_quantization,
        "dtype": plan.dtype,
        "prompt_style": plan.prompt_style,
    }


def merge_adapter(plan: MergePlan) -> MergeResult:
    """Merge, save to a staging directory, reload, check, and move into place (see the module docstring).

    Raises:
        ModelUnavailable: the base cannot be loaded here.
        MergeCheckFailed: the reloaded merged model is off by more than the tolerance (nothing is kept).
    """
    from peft import PeftModel

    from babl_core.engine.catalog import BaseWeights
    from babl_core.engine.loaded import LoadPlan
    from babl_core.engine.loading import load_base, release
    from finetune.factories import quiet_training_noise

    started = time.perf_counter()
    quiet_training_noise()
    unquantized = LoadPlan(device=plan.device, quantization="none", dtype=plan.dtype)
    base = BaseWeights(
        base=plan.base, kind=plan.kind, quantization="none", dtype=plan.dtype, name=plan.run_name
    )
    loaded = load_base(base, unquantized)
    log.info("base %s: %s", plan.base, loaded.describe())
    tokenizer = loaded.tokenizer
    inputs = check_inputs(tokenizer, style_name=plan.prompt_style, kind=plan.kind)

    peft_model = PeftModel.from_pretrained(loaded.model, str(plan.adapter_dir), is_trainable=False)
    peft_model.eval()
    reference = logits_on(peft_model, inputs, plan.device)
    # safe_merge checks the merged weights for NaNs before they replace the originals.
    merged = peft_model.merge_and_unload(safe_merge=True)
    del peft_model

    # Saved aside and moved into place only once checked: models/merged/ never holds an unchecked export.
    appeared = MergeError(
        f"--out: {settings.portable_path(plan.out_dir)} appeared meanwhile; pass --overwrite"
    )
    with staged_dir(plan.out_dir, overwrite=plan.overwrite, refusal=appeared) as staging:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        loaded.model = merged
        release(loaded)
        del merged

        # Reload the export exactly as the app would serve it: a plain base, no adapter.
        merged_weights = BaseWeights(
            base=str(staging),
            kind=plan.kind,
            quantization="none",
            dtype=plan.dtype,
            name=f"{plan.run_name}-merged",
        )
        reloaded = load_base(merged_weights, unquantized)
        check = compare_logits(reference, logits_on(reloaded.model, inputs, plan.device), plan.tolerance)
        release(reloaded)
        if not check.passed:
            raise MergeCheckFailed(
                f"merged model's logits differ from base + adapter by up to {check.max_abs_diff:.3g}, above "
                f"the tolerance {plan.tolerance:.3g} (top-1 agreement {100 * check.top1_agreement:.1f}%); "
                "nothing was kept. Check that --base is the model the adapter was trained on; for half "
                "precision, merge in float32 (--dtype float32) or raise --tolerance",
                check,
            )
        entry = catalog_entry(plan, plan.out_dir)
        meta = {
            "adapter": settings.portable_path(plan.adapter_dir),
            "base": plan.base,
            "kind": plan.kind,
            "task": plan.task,
            "prompt_style": plan.prompt_style,
            "dtype": plan.dtype,
            "device": plan.device,
            "check": check.as_dict(),
            "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        (staging / MERGED_META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        (staging / CATALOG_SNIPPET_FILE).write_text(catalog_snippet(entry), encoding="utf-8")
    return MergeResult(plan.out_dir, check, time.perf_counter() - started, entry)


def catalog_snippet(entry: dict) -> str:
    import yaml

    body = yaml.safe_dump([entry], sort_keys=False, allow_unicode=True)
    indented = "".join(f"  {line}\n" for line in body.splitlines())
    return f"# add under `models:` in configs/models.yaml to serve the merged model\n{indented}"
