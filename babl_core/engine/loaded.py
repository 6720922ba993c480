"""What a load gives: the plan it followed (`LoadPlan`), the model ready to generate (`LoadedModel`,
seen through one adapter at a time), and `ModelUnavailable` when an entry cannot be served here.

Apart from `loading` so that the engines that load in their own way (`llama_cpp`'s managed server)
return the same objects without importing the transformers loader, which dispatches to them.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Any

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch (adapter_names=...)


class ModelUnavailable(RuntimeError):
    """A model that cannot be served here; the message says why and how to fix it."""

    def __init__(self, model_id: str, reason: str):
        self.model_id = model_id
        self.reason = reason
        super().__init__(f"{model_id} is unavailable: {reason}")


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
