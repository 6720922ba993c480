"""Device and thread choice: `BABL_DEVICE` (auto | cpu | cuda | cuda:N | mps) and `BABL_THREADS`."""

from __future__ import annotations

import os
import re

DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_device(value: str | None = None) -> str:
    """The torch device string to load onto; raises ValueError naming the setting on bad input."""
    import torch

    value = (value or os.environ.get("BABL_DEVICE") or "auto").strip().lower()
    if not DEVICE_RE.match(value):
        raise ValueError(f"BABL_DEVICE={value!r} is not valid; use auto, cpu, cuda, cuda:N or mps")
    if value == "auto":
        if torch.cuda.is_available():
            return "cuda:0"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if value.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"BABL_DEVICE={value} but CUDA is not available here; use BABL_DEVICE=cpu or auto"
            )
        index = int(value.split(":")[1]) if ":" in value else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"BABL_DEVICE={value} but only {torch.cuda.device_count()} CUDA device(s) exist")
        return f"cuda:{index}"
    if value == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("BABL_DEVICE=mps but MPS is not available here; use BABL_DEVICE=cpu or auto")
    return value


_threads_applied = False


def apply_thread_setting() -> None:
    """Apply `BABL_THREADS` to torch once per process (intra-op threads for CPU generation)."""
    global _threads_applied
    if _threads_applied:
        return
    value = os.environ.get("BABL_THREADS", "").strip()
    if value:
        import torch

        try:
            threads = int(value)
            if threads < 1:
                raise ValueError
        except ValueError:
            raise ValueError(f"BABL_THREADS={value!r} is not valid; use a whole number ≥ 1, e.g. 2") from None
        torch.set_num_threads(threads)
    _threads_applied = True
