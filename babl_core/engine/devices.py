"""Device and thread choice: `BABL_DEVICE` (auto | cpu | cuda | cuda:N | mps) and `BABL_THREADS`."""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

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


def in_passing_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """`fn(*args, **kwargs)` in a new thread that ends when it returns; its result or exception here.

    Used for model loads, because torch's CPU kernels run on OpenMP (libgomp), which keeps a pool of
    worker threads for every thread that ever ran a parallel region, for as long as that thread lives. While such an idle pool
    exists, another thread's parallel regions are much slower: on the 2-core dev machine the 105M
    random Llama decodes at 47 tok/s in a worker thread alone and at 30 tok/s once any other live
    thread has run one 512×512 matmul (`OMP_WAIT_POLICY` and `GOMP_SPINCOUNT` do not help). Loads and
    adapter attaches compute (weight copies, quantization) in whichever thread calls them — usually a
    long-lived asyncio executor thread or the main thread — so they run here instead, and only the
    threads that generate (a batch scheduler, a request's generate thread) hold a pool while they work.
    """
    result: list = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn(*args, **kwargs))
        except BaseException as exc:  # re-raised in the caller's thread
            error.append(exc)

    # A daemon, so Ctrl-C during a CLI load exits at once instead of waiting for the load to finish.
    worker = threading.Thread(target=run, name=f"babl-{getattr(fn, '__name__', 'work')}", daemon=True)
    worker.start()
    worker.join()
    if error:
        raise error[0]
    return result[0]
