"""Babl's chat app (`app.py`, unchanged) with scripted answers, for browser tests that need an exact
answer: random-weight demo models cannot be made to write a given text.

A message holding a key of `SCRIPTED` is answered with that text, through the whole real path (the
session's model is loaded and acquired, the prompt rendered, the answer streamed, formatted,
recorded and stored); only the model's generation is replaced. Every other message is answered by the
model as usual. Run by the tests as `chainlit run tests/assets/scripted_app.py` from the repo root.
"""

from __future__ import annotations

import time

import app  # noqa: F401 (registers Babl's Chainlit hooks and API routes)
from babl_core.engine.batching import stream
from babl_core.engine.generation import GenerationStats
from babl_core.engine.service import ChatService
from babl_core.web import runtime

SCRIPTED = {
    # Nothing but Markdown syntax: as Markdown, an empty quote.
    "[markdown only]": "> \n>\n> >",
    "[bakery page]": (
        "<!DOCTYPE html>\n<html><head><title>Bakery</title></head>"
        "<body><h1>Crumb &amp; Co</h1><p>Fresh bread every morning.</p></body></html>"
    ),
}


class ScriptedGeneration:
    """A generation's iterator and stats, for a fixed text (one chunk per line)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.stats = GenerationStats()

    def __iter__(self):
        for line in self.text.splitlines(keepends=True):
            self.stats.completion_tokens += 1
            if self.stats.first_chunk_at is None:
                self.stats.first_chunk_at = time.perf_counter()
            yield line
        self.stats.finish_reason = "stop"
        self.stats.finished_at = time.perf_counter()


def scripted_stream(loaded, prompt: str, params, stop_event, **kwargs):
    for key, answer in SCRIPTED.items():
        if key in prompt:
            return ScriptedGeneration(answer)
    return stream(loaded, prompt, params, stop_event, **kwargs)


runtime.reset_service(ChatService(stream_fn=scripted_stream))
