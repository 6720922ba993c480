"""Loading a catalog entry: quantization policy, device placement, tokenizer, PEFT adapters.

The policy (DESIGN.md): with CUDA, bitsandbytes nf4 with double quantization and the entry's compute
dtype (the seeds' configs). On CPU the same request goes through bitsandbytes' CPU backend, which loads
nf4/int8 in 0.50; if that fails the model loads in a plain dtype instead, and `describe()` says so.
Nothing here caches: `babl_core.engine.cache.ModelCache` decides what stays in memory.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import re
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

from babl_core import settings
from babl_core.engine.catalog import ModelSpec, availability, detect_kind, is_offline, looks_like_path
from babl_core.engine.devices import apply_thread_setting, in_passing_thread, resolve_device

log = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch (adapter_names=...)


class ModelUnavailable(RuntimeError):
    """A model that cannot be served here; the message says why and how to fix it."""

    def __init__(self, model_id: str, reason: str):
        self.model_id = model_id
        self.reason = reason
        super().__init__(f"{model_id} is unavailable: {reason}")


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


@dataclass(frozen=True)
class LoadPlan:
    device: str
    quantization: str  # nf4 | int8 | none — what we will try
    dtype: str  # compute dtype for nf4, weight dtype otherwise
    notes: tuple[str, ...] = ()
    engine: str = "transformers"  # or llama.cpp: a managed llama-server runs the GGUF file as it is

    @property
    def cache_key(self) -> tuple[str, str, str, str]:
        return (self.quantization, self.dtype, self.device, self.engine)


def plan_load(spec: ModelSpec, device: str | None = None) -> LoadPlan:
    """Apply the quantization policy to an entry on a device (see the module docstring)."""
    import torch

    from babl_core.engine.llama_cpp import engine_for

    if engine_for(spec) == "llama.cpp":  # the GGUF file's own precision, on llama.cpp's CPU backend
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


@dataclass
class LoadedModel:
    """A model ready to generate: weights, tokenizer, and the adapter to use (None = the base)."""

    model: Any
    tokenizer: Any
    kind: str  # causal | seq2seq
    base: str
    plan: LoadPlan
    adapter_name: str | None = None
    adapter_ref: str | None = None
    footprint_bytes: int = 0
    load_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def device(self) -> str:
        return self.plan.device

    @property
    def context_length(self) -> int:
        return context_length(self.model, self.tokenizer, self.kind)

    @property
    def is_peft(self) -> bool:
        return hasattr(self.model, "peft_config")

    def adapter_names(self, batch: int = 1) -> list[str] | None:
        """Per-row PEFT adapter names for this view (None for a model without adapters)."""
        if not self.is_peft:
            return None
        return [self.adapter_name or BASE_ADAPTER] * batch

    def selecting_adapter(self, batch: int = 1):
        """Context for one forward/generate call in this thread: use this view's adapter."""
        return selected_adapters(self.adapter_names(batch))

    def with_adapter(self, name: str | None, ref: str | None = None) -> LoadedModel:
        """The same weights seen through another adapter (or the bare base with None)."""
        return LoadedModel(
            model=self.model, tokenizer=self.tokenizer, kind=self.kind, base=self.base, plan=self.plan,
            adapter_name=name, adapter_ref=ref, footprint_bytes=self.footprint_bytes,
            load_seconds=self.load_seconds, notes=list(self.notes),
        )  # fmt: skip

    def describe(self) -> str:
        """What was loaded, e.g. "nf4 on cpu, 75 MB + adapter MG650/CodeLlama_HTML_FineTuned"."""
        if self.plan.engine == "llama.cpp":
            what = self.model.describe() if self.model is not None else "llama.cpp"
            return f"{what}, {self.footprint_bytes / 1e6:.0f} MB" + (
                f" + adapter {self.adapter_ref}" if self.adapter_ref else ""
            )
        if self.plan.quantization == "nf4":
            what = f"nf4 (double quant, {self.plan.dtype} compute)"
        elif self.plan.quantization == "int8":
            what = "int8"
        else:
            what = self.plan.dtype
        text = f"{what} on {self.device}, {self.footprint_bytes / 1e6:.0f} MB"
        if self.adapter_ref:
            text += f" + adapter {self.adapter_ref}"
        if self.notes:
            text += f" ({'; '.join(self.notes)})"
        return text


def context_length(model, tokenizer, kind: str) -> int:
    """Longest input the model takes: its position limit, else the tokenizer's, else 2048."""
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0 and kind == "causal":
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        return limit
    return 2048 if kind == "causal" else 512


def adapter_name_for(ref: str) -> str:
    """A PEFT adapter name for a hub id or path (module dict keys: no dots or slashes)."""
    return "a_" + re.sub(r"[^A-Za-z0-9_]", "_", ref.strip("./"))[-60:]


def _source(ref: str) -> tuple[str, dict]:
    """Where from_pretrained should read `ref`, and the kwargs that keep it offline when needed."""
    if looks_like_path(ref):
        return str(settings.resolve_path(ref)), {}
    return ref, ({"local_files_only": True} if is_offline() else {})


def base_source(spec: ModelSpec, plan: LoadPlan) -> tuple[str, dict]:
    """Where `spec`'s base weights and tokenizer are read from: for a GGUF entry, its safetensors
    folder in the plan's dtype (converted on first use, see `babl_core.engine.gguf`); else `_source`."""
    if not spec.gguf_file:
        return _source(spec.base)
    from babl_core.engine.gguf import GGUFUnavailable, converted_dir

    try:
        return str(converted_dir(spec, plan.dtype)), {}
    except GGUFUnavailable as exc:
        raise ModelUnavailable(spec.id, str(exc)) from exc


def _check(spec: ModelSpec) -> None:
    if spec.backend != "local":
        raise ModelUnavailable(spec.id, f"backend {spec.backend!r} is served remotely, not loaded here")
    avail = availability(spec)
    if not avail.servable:
        raise ModelUnavailable(spec.id, avail.reason)


def load_tokenizer(ref: str, kind: str):
    from transformers import AutoTokenizer

    source, extra = _source(ref)
    tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if kind == "causal":
        tokenizer.padding_side = "left"  # batched generation appends on the right
    return tokenizer


def load_base(spec: ModelSpec, plan: LoadPlan | None = None) -> LoadedModel:
    """Load the base weights and tokenizer of `spec` (no adapter), following the policy.

    Raises:
        ModelUnavailable: the entry cannot be served here (the message has the reason and the fix).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    _check(spec)
    plan = plan or plan_load(spec)
    if plan.engine == "llama.cpp":
        from babl_core.engine.llama_cpp import load_server

        return load_server(spec, plan)
    apply_thread_setting()
    kind = detect_kind(spec)
    auto_cls = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    notes = list(plan.notes)
    start = time.perf_counter()
    source, extra = base_source(spec, plan)
    try:
        tokenizer = load_tokenizer(source if spec.gguf_file else spec.base, kind)
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
                log.warning("%s: %s load failed on %s: %s", spec.id, plan.quantization, plan.device, exc)
                plan = LoadPlan(plan.device, "none", fallback, plan.notes)
        if model is None:
            model = auto_cls.from_pretrained(source, dtype=_torch_dtype(plan.dtype), **extra)
            model.to(plan.device)
    except (OSError, ValueError) as exc:  # missing/corrupt files, unknown architecture
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise ModelUnavailable(spec.id, f"could not read {spec.base}: {first_line}") from exc
    model.eval()
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        kind=kind,
        base=spec.base,
        plan=plan,
        footprint_bytes=int(model.get_memory_footprint()),
        load_seconds=time.perf_counter() - start,
        notes=notes,
    )
    log.info("loaded %s: %s in %.1f s", spec.base, loaded.describe(), loaded.load_seconds)
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
# PEFT selects adapters per row with `generate(..., adapter_names=[...])`, but it does so by adding
# forward hooks to the shared LoRA modules for the duration of the call: two threads generating on one
# base with different adapters then see each other's hooks (measured: wrong adapter's text). We install
# one permanent hook per LoRA module that reads the names from a thread-local set around each call, so
# concurrent generations on one base each get their own adapter, and nothing global is ever switched.

_selection = threading.local()


@contextlib.contextmanager
def selected_adapters(names: list[str] | None):
    previous = getattr(_selection, "names", None)
    _selection.names = names
    try:
        yield
    finally:
        _selection.names = previous


def _inject_adapter_names(module, args, kwargs):
    names = getattr(_selection, "names", None)
    if names is None or module.training:
        return None
    kwargs["adapter_names"] = names
    return args, kwargs


def install_adapter_selector(model) -> None:
    """Hook every LoRA module once (idempotent) so `selected_adapters` reaches it."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    for module in model.modules():
        if isinstance(module, (LoraLayer, AuxiliaryTrainingWrapper)) and not getattr(
            module, "_babl_selector", False
        ):
            module.register_forward_pre_hook(_inject_adapter_names, with_kwargs=True)
            module._babl_selector = True


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
