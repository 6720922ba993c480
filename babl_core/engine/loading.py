"""Loading a catalog entry: quantization policy, device placement, tokenizer, PEFT adapters.

`plan_load` and `load_base` take a catalog entry (`ModelSpec`: the app, the API, the CLI) or just a base
(`BaseWeights`: fine-tuning, merging and evaluation load the same way without an entry).

The policy (DESIGN.md): with CUDA, bitsandbytes nf4 with double quantization and the entry's compute
dtype (the seeds' configs). On CPU the same request goes through bitsandbytes' CPU backend, which loads
nf4/int8 in 0.50; if that fails the model loads in a plain dtype instead, and `describe()` says so.
Nothing here caches: `babl_core.engine.cache.ModelCache` decides what stays in memory.
"""

from __future__ import annotations

import gc
import logging
import re
import time
import warnings

from babl_core import settings
from babl_core.engine.availability import availability, base_availability
from babl_core.engine.catalog import BaseWeights, ModelSpec, detect_kind, is_offline, looks_like_path
from babl_core.engine.devices import apply_thread_setting, in_passing_thread, resolve_device
from babl_core.engine.loaded import (
    LoadedModel,
    LoadPlan,
    ModelUnavailable,
    install_adapter_selector,
)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Known noise: bitsandbytes logs a failed optional-kernel import on every CPU 4-bit load, and a cast
# warning on every int8 matmul (hundreds per answer). Both are expected here and say nothing new.


class _DropKnownNoise(logging.Filter):
    PATTERNS = ("Failed to load CPU gemm_4bit_forward", "inputs will be cast from")

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not any(p in message for p in self.PATTERNS)


def quiet_known_warnings() -> None:
    """Silence the known-harmless messages of bitsandbytes, PEFT and transformers' progress bars."""
    noise = _DropKnownNoise()
    for name in ("bitsandbytes.backends.cpu.ops", "bitsandbytes.autograd._functions"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownNoise) for f in logger.filters):
            logger.addFilter(noise)
    warnings.filterwarnings("ignore", message=r".*inputs will be cast from.*")
    warnings.filterwarnings("ignore", message=r".*MatMul8bitLt.*")
    # PEFT 0.21 reads transformers 5.23's deprecated `is_gradient_checkpointing` on every adapter load
    # (a FutureWarning per load in the app, `finetune eval` and `merge`); nothing for the user to change.
    warnings.filterwarnings(
        "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
    )
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


quiet_known_warnings()


# --------------------------------------------------------------------------------------------------
# The plan: what will actually be loaded, decided before touching weights


def plan_load(spec: ModelSpec | BaseWeights, device: str | None = None) -> LoadPlan:
    """Apply the quantization policy to an entry (or a base) on a device (see the module docstring)."""
    import torch

    from babl_core.engine.llama_cpp import engine_for

    # llama.cpp runs the GGUF file in its own precision, on its CPU backend (catalog entries only).
    if isinstance(spec, ModelSpec) and engine_for(spec) == "llama.cpp":
        return LoadPlan(device="cpu", quantization="gguf", dtype="gguf", engine="llama.cpp")

    device = device or resolve_device()
    notes: list[str] = []
    kind = detect_kind(spec)
    quant = spec.quantization
    if quant == "auto":
        quant = "nf4" if device.startswith("cuda") and kind == "causal" else "none"
    if quant in ("nf4", "int8") and device == "mps":
        notes.append(f"{quant} needs CUDA or CPU bitsandbytes; loaded unquantized on mps")
        quant = "none"
    dtype = spec.dtype
    if dtype == "auto":
        if device.startswith("cuda"):
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            dtype = "bfloat16" if quant == "nf4" else "float32"
    if device == "cpu" and dtype == "float16":
        # fp16 matmuls are slow or unsupported on many CPUs; bf16 keeps the memory saving.
        target = "bfloat16" if quant == "nf4" else "float32"
        notes.append(f"float16 compute is slow on CPU; used {target}")
        dtype = target
    return LoadPlan(device=device, quantization=quant, dtype=dtype, notes=tuple(notes))


def _torch_dtype(name: str):
    import torch

    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def quantization_config(quantization: str, compute_dtype: str):
    """The BitsAndBytesConfig of seeds 001/002 (nf4 + double quant), or 8-bit; shared with finetune."""
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=_torch_dtype(compute_dtype),
        )
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


# --------------------------------------------------------------------------------------------------
# Loaded models


def adapter_name_for(ref: str) -> str:
    """A PEFT adapter name for a hub id or path (module dict keys: no dots or slashes)."""
    return "a_" + re.sub(r"[^A-Za-z0-9_]", "_", ref.strip("./"))[-60:]


def _source(ref: str) -> tuple[str, dict]:
    """Where from_pretrained should read `ref`, and the kwargs that keep it offline when needed."""
    if looks_like_path(ref):
        return str(settings.resolve_path(ref)), {}
    return ref, ({"local_files_only": True} if is_offline() else {})


def base_source(spec: ModelSpec | BaseWeights, plan: LoadPlan) -> tuple[str, dict]:
    """Where `spec`'s base weights and tokenizer are read from: for a GGUF base, its safetensors
    folder in the plan's dtype (converted on first use, see `babl_core.engine.gguf`); else `_source`."""
    weights = _weights(spec)
    if not weights.gguf_file:
        return _source(weights.base)
    from babl_core.engine.gguf import GGUFUnavailable, converted_dir

    try:
        return str(converted_dir(weights, plan.dtype)), {}
    except GGUFUnavailable as exc:
        raise ModelUnavailable(weights.display_name, str(exc)) from exc


def _weights(spec: ModelSpec | BaseWeights) -> BaseWeights:
    return spec.weights if isinstance(spec, ModelSpec) else spec


def _check(spec: ModelSpec | BaseWeights) -> None:
    if isinstance(spec, BaseWeights):
        avail = base_availability(spec)
    elif spec.backend != "local":
        raise ModelUnavailable(spec.id, f"backend {spec.backend!r} is served remotely, not loaded here")
    else:
        avail = availability(spec)
    if not avail.servable:
        raise ModelUnavailable(_weights(spec).display_name, avail.reason)


def load_tokenizer(ref: str, kind: str):
    from transformers import AutoTokenizer

    source, extra = _source(ref)
    tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if kind == "causal":
        tokenizer.padding_side = "left"  # batched generation appends on the right
    return tokenizer


def load_base(spec: ModelSpec | BaseWeights, plan: LoadPlan | None = None) -> LoadedModel:
    """Load the base weights and tokenizer of `spec` (an entry: without its adapter), following the policy.

    Raises:
        ModelUnavailable: the entry cannot be served here (the message has the reason and the fix).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    _check(spec)
    plan = plan or plan_load(spec)
    if plan.engine == "llama.cpp":
        if not isinstance(spec, ModelSpec):
            raise ValueError(
                "llama.cpp serves catalog entries: load a bare base with the transformers engine"
            )
        from babl_core.engine.llama_cpp import load_server

        return load_server(spec, plan)
    apply_thread_setting()
    weights = _weights(spec)
    kind = detect_kind(weights)
    auto_cls = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    notes = list(plan.notes)
    start = time.perf_counter()
    source, extra = base_source(weights, plan)
    try:
        tokenizer = load_tokenizer(source if weights.gguf_file else weights.base, kind)
        model = None
        if plan.quantization in ("nf4", "int8"):
            try:
                model = auto_cls.from_pretrained(
                    source,
                    quantization_config=quantization_config(plan.quantization, plan.dtype),
                    device_map={"": plan.device},
                    dtype=_torch_dtype(plan.dtype),
                    **extra,
                )
            except (ImportError, RuntimeError, ValueError, NotImplementedError) as exc:
                if plan.device.startswith("cuda"):
                    raise
                fallback = "float32"
                notes.append(
                    f"{plan.quantization} failed on {plan.device} ({exc.__class__.__name__}); loaded {fallback}"
                )
                log.warning(
                    "%s: %s load failed on %s: %s", weights.display_name, plan.quantization, plan.device, exc
                )
                plan = LoadPlan(plan.device, "none", fallback, plan.notes)
        if model is None:
            model = auto_cls.from_pretrained(source, dtype=_torch_dtype(plan.dtype), **extra)
            model.to(plan.device)
    except (OSError, ValueError) as exc:  # missing/corrupt files, unknown architecture
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise ModelUnavailable(weights.display_name, f"could not read {weights.base}: {first_line}") from exc
    model.eval()
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        kind=kind,
        base=weights.base,
        plan=plan,
        footprint_bytes=int(model.get_memory_footprint()),
        load_seconds=time.perf_counter() - start,
        notes=notes,
    )
    log.info("loaded %s: %s in %.1f s", weights.base, loaded.describe(), loaded.load_seconds)
    return loaded


def attach_adapter(loaded: LoadedModel, ref: str) -> LoadedModel:
    """Load the PEFT adapter `ref` onto `loaded`'s base as a named adapter; return a view using it.

    The first adapter wraps the base in a PeftModel; later ones are added with `load_adapter`, so a
    base in memory carries any number of adapters and each request picks its own.
    """
    if loaded.plan.engine == "llama.cpp":
        from babl_core.engine.llama_cpp import attach_lora

        return attach_lora(loaded, ref)
    from peft import PeftModel

    name = adapter_name_for(ref)
    source, extra = _source(ref)
    try:
        if not loaded.is_peft:
            loaded.model = PeftModel.from_pretrained(
                loaded.model, source, adapter_name=name, is_trainable=False, **extra
            )
        elif name not in loaded.model.peft_config:
            loaded.model.load_adapter(source, adapter_name=name, is_trainable=False, **extra)
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(ref, f"could not load adapter {ref}: {exc}") from None
    loaded.model.eval()
    install_adapter_selector(loaded.model)
    loaded.footprint_bytes = int(loaded.model.get_memory_footprint())
    return loaded.with_adapter(name, ref)


# --------------------------------------------------------------------------------------------------
# Per-thread adapter selection.
#
def load_model(spec: ModelSpec, device: str | None = None) -> LoadedModel:
    """Base plus the entry's adapter, uncached (the CLI and tests; the app goes through ModelCache).

    Loaded in a thread that ends afterwards, so the caller's thread keeps no OpenMP pool that would
    slow the threads that generate (`devices.in_passing_thread`)."""

    def load() -> LoadedModel:
        loaded = load_base(spec, plan_load(spec, device))
        if spec.adapter:
            loaded = attach_adapter(loaded, spec.adapter)
        return loaded

    return in_passing_thread(load)


def release(loaded: LoadedModel) -> None:
    """Drop references to the weights and return memory to the allocator."""
    import torch

    loaded.model = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
