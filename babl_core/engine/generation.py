"""Streaming generation for causal and seq2seq models: text chunks decoded per token.

`stream(loaded, prompt, params)` yields text as soon as each token decodes to printable text. Causal
models generate in their base's continuous batch (`babl_core.engine.batching`, one scheduler thread per base);
seq2seq models run `model.generate` in a worker thread per request. Both feed the same consumer
(`TokenStream`). Why not transformers' `TextIteratorStreamer`: it holds text back until a space or
newline and queues empty strings (ENVIRONMENT.md measured 136 of 201 items empty), so the browser saw
text in bursts. We decode incrementally per token instead (a window of recent ids, emitting only text
that can no longer change).

Sampling uses a `torch.Generator` per request, so a seed gives the same text whatever else runs in the
process or shares the batch (transformers samples from the global RNG). Stop strings are matched on the
decoded text and never leak into the output; a stop event (the UI's stop button, a closed HTTP
connection) ends the generation within one decoding step.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from typing import Any

from babl_core.engine.catalog import GenerationDefaults
from babl_core.engine.generation_settings import SETTINGS
from babl_core.engine.generation_settings import problems as setting_problems

_END = object()


class GenerationError(RuntimeError):
    """The model failed while generating; raised in the caller's thread with the original as cause."""


@dataclass(frozen=True)
class GenerationParams:
    """Settings of one generation. `temperature == 0` means greedy decoding. Defaults and bounds come
    from `generation_settings.SETTINGS` (the one definition the catalog, API, chat and CLI share)."""

    max_new_tokens: int = SETTINGS["max_new_tokens"].default
    temperature: float = SETTINGS["temperature"].default
    top_p: float = SETTINGS["top_p"].default
    top_k: int = SETTINGS["top_k"].default
    repetition_penalty: float = SETTINGS["repetition_penalty"].default
    seed: int | None = SETTINGS["seed"].default
    stop: tuple[str, ...] = SETTINGS["stop"].default

    @classmethod
    def from_defaults(cls, defaults: GenerationDefaults | None = None, **overrides: Any) -> GenerationParams:
        """Entry defaults, then any non-None override (a user's or an API request's settings)."""
        base = cls()
        if defaults is not None:
            base = replace(
                base,
                max_new_tokens=defaults.max_new_tokens,
                temperature=defaults.temperature,
                top_p=defaults.top_p,
                top_k=defaults.top_k,
                repetition_penalty=defaults.repetition_penalty,
                stop=tuple(defaults.stop),
            )
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown generation setting(s): {', '.join(sorted(unknown))}")
        clean = {k: v for k, v in overrides.items() if v is not None}
        if "stop" in clean:
            stop = clean["stop"]
            clean["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
        return replace(base, **clean)

    def problems(self) -> list[tuple[str, str]]:
        """(field, message) for every invalid setting; empty when all are fine."""
        return setting_problems(self.__dict__)

    def validate(self) -> GenerationParams:
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(f"{name}: {msg}" for name, msg in problems))
        return self


@dataclass
class GenerationStats:
    """What one generation did; filled while streaming, complete when the iterator ends."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    first_chunk_at: float | None = None
    finished_at: float | None = None
    finish_reason: str | None = None  # stop | length | cancelled | error

    @property
    def elapsed(self) -> float:
        return (self.finished_at or time.perf_counter()) - self.started

    @property
    def time_to_first_chunk(self) -> float | None:
        return None if self.first_chunk_at is None else self.first_chunk_at - self.started

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.elapsed if self.elapsed > 0 else 0.0


# --------------------------------------------------------------------------------------------------
# Text: incremental detokenization and stop strings


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas, one call per token.

    Decodes a small window (from the last emission point) and emits only the part that is final:
    a trailing U+FFFD means an incomplete UTF-8 sequence, which the next token may complete.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_ids: list[int]) -> str:
        self.ids.extend(token_ids)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Whatever is left at the end (e.g. a dangling partial character)."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix) :] if len(text) > len(prefix) else ""


class StopMatcher:
    """Finds stop strings in streamed text; holds back a tail that could still become one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, stopped)."""
        if not self.stops:
            return text, False
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        keep = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:n]):
                    keep = max(keep, n)
                    break
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


# --------------------------------------------------------------------------------------------------
# Hooks into transformers' generate


def sampling_probs(scores, temperature: float, top_p: float, top_k: int):
    """Temperature, then top-k, then top-p (nucleus) over `scores` [rows, vocab]; returns probabilities.

    Shared by the per-thread sampler below and the batch scheduler (`babl_core.engine.batching`), so a seed
    gives the same text on either path.
    """
    import torch

    scores = scores.float() / temperature
    if top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        probs = torch.softmax(sorted_scores, dim=-1)
        cumulative = probs.cumsum(dim=-1)
        remove = cumulative - probs > top_p  # keep the smallest set reaching top_p
        sorted_scores = sorted_scores.masked_fill(remove, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    return torch.softmax(scores, dim=-1)


def request_generator(params: GenerationParams, row: int = 0):
    """The torch.Generator of one sampled sequence (seed + row), or None for greedy decoding.

    Without a seed the request gets a random one, still private to it: nothing samples from torch's
    global RNG, so no request can shift another's draws.
    """
    import torch

    if params.temperature == 0:
        return None
    seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
    return torch.Generator().manual_seed(seed + row)


def _seeded_sampler_cls():
    import torch
    from transformers import LogitsProcessor

    class SeededSampler(LogitsProcessor):
        """Samples the next token with a per-row torch.Generator and masks all other logits.

        generate() then runs greedy (argmax), which picks exactly our sample. Temperature, top-k and
        top-p are applied here, so sampling never touches the global RNG.
        """

        def __init__(self, temperature: float, top_p: float, top_k: int, generators: list):
            self.temperature = temperature
            self.top_p = top_p
            self.top_k = top_k
            self.generators = generators

        def __call__(self, input_ids, scores):
            probs = sampling_probs(scores, self.temperature, self.top_p, self.top_k)
            picks = [
                torch.multinomial(probs[i].cpu(), 1, generator=self.generators[i % len(self.generators)])
                for i in range(probs.shape[0])
            ]
            chosen = torch.cat(picks).to(scores.device)
            out = torch.full_like(scores, float("-inf"))
            out[torch.arange(scores.shape[0], device=scores.device), chosen] = 0.0
            return out

    return SeededSampler


def make_sampler(params: GenerationParams, rows: int = 1):
    """A SeededSampler for `rows` sequences, or None for greedy decoding."""
    if params.temperature == 0:
        return None
    seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
    generators = [request_generator(replace(params, seed=seed), i) for i in range(rows)]
    return _seeded_sampler_cls()(params.temperature, params.top_p, params.top_k, generators)


def _stop_criteria(should_stop):
    import torch
    from transformers import StoppingCriteria

    class EventStop(StoppingCriteria):
        """Ends generate() at the next step once `should_stop()` is true (stop button, disconnect)."""

        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), should_stop(), dtype=torch.bool, device=input_ids.device)

    return EventStop()


class _QueueStreamer:
    """generate()'s streamer: forwards new token ids to a queue (the first put is the prompt)."""

    def __init__(self, q: queue.Queue):
        self.q = q
        self.skipped_prompt = False

    def put(self, value):
        if not self.skipped_prompt:
            self.skipped_prompt = True
            return
        self.q.put(value.reshape(-1).tolist())

    def end(self):
        pass


def generation_config(loaded, params: GenerationParams):
    """A GenerationConfig for greedy decoding with our settings (sampling is our logits processor)."""
    import copy

    model = loaded.model
    tokenizer = loaded.tokenizer
    config = copy.deepcopy(model.generation_config)
    config.do_sample = False
    config.num_beams = 1
    config.temperature = None
    config.top_p = None
    config.top_k = None
    config.max_length = None
    config.max_new_tokens = params.max_new_tokens
    config.repetition_penalty = params.repetition_penalty if params.repetition_penalty != 1.0 else None
    if config.pad_token_id is None:
        config.pad_token_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
    if config.eos_token_id is None:
        config.eos_token_id = tokenizer.eos_token_id
    return config


# --------------------------------------------------------------------------------------------------
# The stream


class TokenStream:
    """An iterator of text chunks; `stats` is complete once iteration ends; `cancel()` stops early.

    The consumer side shared by both producers: token ids arrive on a queue (one list per decoding
    step), are decoded incrementally, cut at stop strings, and counted. A producer — a generate()
    thread (`GenerationStream`) or a row in a batch (`babl_core.engine.batching.BatchedStream`) — puts id
    lists, then `_END` or the exception that ended it, and watches `_stopped()` between steps.
    """

    def __init__(self, loaded, prompt_ids, params: GenerationParams, stop_event: threading.Event | None):
        self.loaded = loaded
        self.params = params
        self.stop_event = stop_event or threading.Event()
        self._internal_stop = threading.Event()  # a stop string matched, or the consumer went away
        self.stats = GenerationStats(prompt_tokens=int(prompt_ids["input_ids"].shape[-1]))
        self.text = ""
        self._queue: queue.Queue = queue.Queue()
        self._started = False
        self._done = False

    def cancel(self) -> None:
        self.stop_event.set()

    def _stopped(self) -> bool:
        return self.stop_event.is_set() or self._internal_stop.is_set()

    # The producer: subclasses start it, and wait for it to let go of the model when iteration ends.
    def _start_producer(self) -> None:
        raise NotImplementedError

    def _release_producer(self) -> None:
        raise NotImplementedError

    def __iter__(self) -> Iterator[str]:
        if self._started:
            raise RuntimeError("a generation stream can be iterated once")
        self._started = True
        decoder = IncrementalDecoder(self.loaded.tokenizer)
        matcher = StopMatcher(self.params.stop)
        eos = eos_token_ids(self.loaded)
        self._start_producer()
        reason = "length"
        try:
            while True:
                item = self._queue.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    self.stats.finish_reason = "error"
                    raise GenerationError(f"generation failed: {item.__class__.__name__}: {item}") from item
                if self._internal_stop.is_set():
                    continue  # drain tokens generated after a stop string matched
                ids = [t for t in item if t not in eos]
                if len(ids) < len(item):
                    reason = "stop"
                self.stats.completion_tokens += len(item)
                text, hit = matcher.feed(decoder.push(ids))
                if text:
                    yield self._emit(text)
                if hit:
                    reason = "stop"
                    self._internal_stop.set()
            if not self._internal_stop.is_set():
                tail, _ = matcher.feed(decoder.flush())
                tail += matcher.flush()
                if tail:
                    yield self._emit(tail)
            if self.stop_event.is_set() and reason != "stop":
                reason = "cancelled"
            self.stats.finish_reason = self.stats.finish_reason or reason
        finally:
            self._release_producer()
            self.stats.finished_at = time.perf_counter()
            self._done = True

    def _emit(self, text: str) -> str:
        if self.stats.first_chunk_at is None:
            self.stats.first_chunk_at = time.perf_counter()
        self.text += text
        return text


class GenerationStream(TokenStream):
    """One `model.generate` in its own thread: seq2seq models, and causal ones when batching is off."""

    def __init__(self, loaded, prompt_ids, params: GenerationParams, stop_event: threading.Event | None):
        super().__init__(loaded, prompt_ids, params, stop_event)
        self._thread = threading.Thread(
            target=self._run, args=(prompt_ids,), name="babl-generate", daemon=True
        )

    def _start_producer(self) -> None:
        self._thread.start()

    def _release_producer(self) -> None:
        if self._thread.is_alive():
            self._internal_stop.set()
            self._thread.join(timeout=30)

    def _run(self, prompt_ids) -> None:
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        try:
            sampler = make_sampler(self.params)
            rows = prompt_ids["input_ids"].shape[0]
            with torch.inference_mode(), self.loaded.selecting_adapter(rows):
                self.loaded.model.generate(
                    **prompt_ids,
                    generation_config=generation_config(self.loaded, self.params),
                    logits_processor=LogitsProcessorList([sampler] if sampler else []),
                    stopping_criteria=StoppingCriteriaList([_stop_criteria(self._stopped)]),
                    streamer=_QueueStreamer(self._queue),
                )
            self._queue.put(_END)
        except BaseException as exc:  # re-raised in the consumer's thread
            self._queue.put(exc)


def eos_token_ids(loaded) -> set[int]:
    """The ids that end an answer: the model's generation config, else the tokenizer's."""
    eos = loaded.model.generation_config.eos_token_id
    if eos is None:
        eos = loaded.tokenizer.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, list) else {eos}


def encode_prompt(loaded, prompt: str, add_special_tokens: bool = True) -> dict:
    """Tokenize a prompt onto the model's device."""
    encoded = loaded.tokenizer(prompt, return_tensors="pt", add_special_tokens=add_special_tokens)
    return {k: v.to(loaded.device) for k, v in encoded.items() if k in ("input_ids", "attention_mask")}
