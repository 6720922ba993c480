"""Continuous batching: concurrent streams equal sequential runs, per-row stop, seeds, mixed adapters.

The model here is a tiny Llama initialised with a large std, so its top tokens are well separated: a
batched forward (other matmul shapes, padding) rounds differently from a lone one by ~1e-6, and on
the demo models, whose top logits are nearly tied, that alone can flip a greedy pick (ENVIRONMENT.md).
"""

from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest

from babl_core.engine.batching import BatchedStream, generate_text, scheduler_for, scheduler_status, stream
from babl_core.engine.cache import ModelCache
from babl_core.engine.catalog import ModelSpec
from babl_core.engine.generation import GenerationParams, GenerationStream
from babl_core.engine.loading import attach_adapter, load_model
from tests.conftest import make_lora_adapter

PROMPTS = [
    "def main():",
    "<body><h1>",
    "import os\nx = ",
    "Dear team,",
    "question: who wrote it?",
    "SELECT * FROM",
    "class Widget:",
    "# Landing page\n",
]


def separated_spec(path) -> ModelSpec:
    return ModelSpec(id="sep", label="sep", task="html", base=str(path), kind="causal",
                     quantization="none", dtype="float32", prompt_style="plain-chat")  # fmt: skip


@pytest.fixture(scope="module")
def separated_dir(session_models_dir, tmp_path_factory):
    """A tiny Llama whose top-1 logit leads the runner-up by ≥ 1e-3 on these prompts (std 0.3)."""
    from transformers import AutoTokenizer

    from babl_core.demo import build_llama

    tok = AutoTokenizer.from_pretrained(session_models_dir / "demo" / "demo-html")
    path = tmp_path_factory.mktemp("separated") / "llama"
    build_llama(tok, hidden=64, layers=2, init_std=0.3, seed=3).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loaded(separated_dir):
    return load_model(separated_spec(separated_dir))


def raw_generate(loaded, prompt: str, n: int, **kwargs) -> str:
    """The unbatched reference: transformers' own generate() on this prompt alone."""
    import torch

    enc = loaded.tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = loaded.model.generate(
            **enc, max_new_tokens=n, do_sample=False, pad_token_id=loaded.tokenizer.pad_token_id, **kwargs
        )
    return loaded.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def run_concurrently(jobs, stagger: dict[int, float] | None = None) -> dict[int, object]:
    """Run `jobs[i]()` in threads; job i starts `stagger[i]` seconds after the others began."""
    results: dict[int, object] = {}
    errors: list[BaseException] = []

    def worker(i, job):
        try:
            time.sleep((stagger or {}).get(i, 0.0))
            results[i] = job()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i, job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]
    return results


def test_causal_models_batch_and_the_rest_keep_the_thread_path(loaded, monkeypatch):
    params = GenerationParams(max_new_tokens=4, temperature=0)
    assert isinstance(stream(loaded, "x", params), BatchedStream)
    monkeypatch.setenv("BABL_BATCHING", "0")
    assert isinstance(stream(loaded, "x", params), GenerationStream)


def test_eight_concurrent_streams_equal_sequential_runs(loaded):
    # Four start together; four more join the running batch once it has decoded a few tokens (their
    # shorter contexts get left-padded); the first four finish first, so the batch then drops rows and
    # the padding columns nobody needs any more.
    lengths = [20, 25, 30, 35, 50, 60, 45, 55]
    reference = [raw_generate(loaded, p, n) for p, n in zip(PROMPTS, lengths, strict=True)]
    assert len(set(reference)) == 8 and all(len(r) > 10 for r in reference)
    sequential = [
        generate_text(loaded, p, GenerationParams(max_new_tokens=n, temperature=0))
        for p, n in zip(PROMPTS, lengths, strict=True)
    ]
    assert sequential == reference  # one request alone in the scheduler = generate()

    scheduler = scheduler_for(loaded.model)
    scheduler.peak_rows = 0
    streams = [stream(loaded, p, GenerationParams(max_new_tokens=n, temperature=0)) for p, n in zip(PROMPTS, lengths, strict=True)]  # fmt: skip
    running = threading.Semaphore(0)  # released once by each of the first four after 5 chunks

    def consume(i):
        chunks = []
        if i >= 4:
            assert running.acquire(timeout=30)
        for chunk in streams[i]:
            chunks.append(chunk)
            if i < 4 and len(chunks) == 5:
                running.release()
        return "".join(chunks)

    results = run_concurrently([lambda i=i: consume(i) for i in range(8)])
    assert [results[i] for i in range(8)] == reference
    for i in range(8):
        assert streams[i].stats.completion_tokens == lengths[i] and streams[i].stats.finish_reason == "length"
    assert scheduler.status()["peak_rows"] == 8, "the late requests did not join the running batch"
    assert scheduler.status()["active_rows"] == 0 and scheduler.status()["kv_cache_mb"] == 0


def test_stopping_one_row_leaves_the_others_intact(loaded):
    n = 80
    reference = [raw_generate(loaded, p, n) for p in PROMPTS[:4]]
    events = [threading.Event() for _ in range(4)]
    greedy = GenerationParams(max_new_tokens=n, temperature=0)
    stop_string = reference[3][12:15]  # a stop string cuts row 3 early, in the middle of the batch
    params = [greedy, greedy, greedy, GenerationParams(max_new_tokens=n, temperature=0, stop=(stop_string,))]
    streams = [stream(loaded, p, params[i], events[i]) for i, p in enumerate(PROMPTS[:4])]
    stopped_at: list[int] = []

    def consume(i):
        chunks = []
        for chunk in streams[i]:
            chunks.append(chunk)
            if i == 0 and len(chunks) == 5:
                events[0].set()  # the user presses stop on row 0 only
                stopped_at.append(streams[0].stats.completion_tokens)
        return "".join(chunks)

    results = run_concurrently([lambda i=i: consume(i) for i in range(4)])
    assert streams[0].stats.finish_reason == "cancelled"
    assert streams[0].stats.completion_tokens <= stopped_at[0] + 2
    assert reference[0].startswith(results[0]) and len(results[0]) < len(reference[0])
    assert results[1] == reference[1] and results[2] == reference[2]
    assert results[3] == reference[3][: reference[3].index(stop_string)]
    assert streams[3].stats.finish_reason == "stop"
    assert streams[1].stats.finish_reason == streams[2].stats.finish_reason == "length"


def test_seeded_sampling_is_identical_alone_and_in_a_busy_batch(loaded, monkeypatch):
    seeded = GenerationParams(max_new_tokens=50, temperature=1.0, top_p=0.9, top_k=40, seed=1234)
    alone = generate_text(loaded, PROMPTS[0], seeded)
    assert alone != generate_text(loaded, PROMPTS[0], GenerationParams(max_new_tokens=50, temperature=0))
    assert alone != generate_text(
        loaded, PROMPTS[0], GenerationParams(max_new_tokens=50, temperature=1.0, top_p=0.9, top_k=40, seed=7)
    )
    others = [
        GenerationParams(max_new_tokens=70, temperature=0.8, seed=1),
        GenerationParams(max_new_tokens=30, temperature=1.3, top_k=5),  # unseeded: a random seed of its own
        GenerationParams(max_new_tokens=60, temperature=0, repetition_penalty=1.3),
        GenerationParams(max_new_tokens=45, temperature=1.0, seed=1234),  # same seed, other prompt
    ]
    jobs = [lambda: generate_text(loaded, PROMPTS[0], seeded)]
    jobs += [lambda p=p, i=i: generate_text(loaded, PROMPTS[i + 1], p) for i, p in enumerate(others)]
    busy = run_concurrently(jobs, stagger={0: 0.01})
    assert busy[0] == alone
    # The per-thread path (BABL_BATCHING=0) draws from the same generator: the same text again.
    monkeypatch.setenv("BABL_BATCHING", "0")
    assert generate_text(loaded, PROMPTS[0], seeded) == alone


def test_repetition_penalty_matches_generate_alone_and_batched(loaded):
    n = 50
    reference = [raw_generate(loaded, p, n, repetition_penalty=1.4) for p in PROMPTS[:3]]
    assert reference != [raw_generate(loaded, p, n) for p in PROMPTS[:3]]
    params = GenerationParams(max_new_tokens=n, temperature=0, repetition_penalty=1.4)
    assert generate_text(loaded, PROMPTS[0], params) == reference[0]
    jobs = [lambda p=p: generate_text(loaded, p, params) for p in PROMPTS[:3]]
    jobs.append(lambda: generate_text(loaded, PROMPTS[5], GenerationParams(max_new_tokens=n, temperature=0)))
    results = run_concurrently(jobs)
    assert [results[i] for i in range(3)] == reference


@pytest.mark.slow
def test_mixed_adapters_in_one_batch_each_get_their_own_output(separated_dir, tmp_path):
    adapters = {
        name: make_lora_adapter(separated_dir, tmp_path / name, seed=seed, write_meta=False)
        for name, seed in (("a", 11), ("b", 12))
    }
    base = load_model(separated_spec(separated_dir))
    views = {"a": attach_adapter(base, str(adapters["a"]))}
    views["b"] = attach_adapter(base, str(adapters["b"]))
    views["base"] = base.with_adapter(None)
    assert views["a"].model is views["b"].model is views["base"].model  # one PeftModel, three views
    params = GenerationParams(max_new_tokens=40, temperature=0)
    prompt = PROMPTS[1]
    alone = {name: generate_text(view, prompt, params) for name, view in views.items()}
    assert len(set(alone.values())) == 3, "the adapters do not change the output"

    scheduler = scheduler_for(base.model)
    scheduler.peak_rows = 0
    names = ["a", "b", "base", "a", "b", "base"]
    results = run_concurrently([lambda v=views[name]: generate_text(v, prompt, params) for name in names])
    assert [results[i] for i in range(len(names))] == [alone[name] for name in names]
    assert scheduler.status()["peak_rows"] >= 3, "the adapters never shared a batch"


def test_status_shows_active_rows_and_the_queue(loaded, monkeypatch):
    monkeypatch.setenv("BABL_MAX_BATCH", "2")
    cache = ModelCache()
    with cache.lease(separated_spec(loaded.base)) as view:
        streams = [stream(view, p, GenerationParams(max_new_tokens=400, temperature=0)) for p in PROMPTS[:4]]

        def consume(s):
            for _ in s:
                pass

        threads = [threading.Thread(target=consume, args=(s,)) for s in streams]
        for t in threads:
            t.start()
        time.sleep(0.1)
        during = cache.status()
        for s in streams:
            s.cancel()
        for t in threads:
            t.join(timeout=30)
    base = during["bases"][0]
    assert base["batch"]["active_rows"] == 2 and base["batch"]["max_rows"] == 2
    assert base["batch"]["waiting"] == 2 and during["waiting_to_join"] == 2
    assert during["queue"] == 2 and base["batch"]["kv_cache_mb"] > 0
    after = cache.status()["bases"][0]["batch"]
    assert after["active_rows"] == 0 and after["waiting"] == 0


def test_a_failed_step_fails_its_rows_and_the_next_request_works(loaded, monkeypatch):
    real_forward = loaded.model.forward
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated out of memory")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(loaded.model, "forward", flaky)
    from babl_core.engine.generation import GenerationError

    with pytest.raises(GenerationError, match="simulated out of memory"):
        generate_text(loaded, PROMPTS[0], GenerationParams(max_new_tokens=10, temperature=0))
    monkeypatch.setattr(loaded.model, "forward", real_forward)
    text = generate_text(loaded, PROMPTS[0], GenerationParams(max_new_tokens=10, temperature=0))
    assert text == raw_generate(loaded, PROMPTS[0], 10)


def test_a_failed_prefill_fails_only_the_joining_request(loaded, monkeypatch):
    from babl_core.engine.generation import GenerationError

    real_forward = loaded.model.forward
    broken = threading.Event()

    def prefill_breaks(*args, **kwargs):
        if broken.is_set() and kwargs["input_ids"].shape[1] > 1:
            raise RuntimeError("simulated bad prompt")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(loaded.model, "forward", prefill_breaks)
    reference = raw_generate(loaded, PROMPTS[2], 300)
    running = stream(loaded, PROMPTS[2], GenerationParams(max_new_tokens=300, temperature=0))
    chunks, failure = [], []
    for chunk in running:
        chunks.append(chunk)
        if len(chunks) == 3:  # the batch is running: now a request joins and its prefill fails
            broken.set()
            try:
                generate_text(loaded, PROMPTS[3], GenerationParams(max_new_tokens=5, temperature=0))
            except GenerationError as exc:
                failure.append(exc)
    assert failure and "simulated bad prompt" in str(failure[0])
    assert "".join(chunks) == reference and running.stats.finish_reason in ("length", "stop")


def test_the_scheduler_does_not_keep_an_evicted_model_alive(separated_dir):
    model_loaded = load_model(separated_spec(separated_dir))
    generate_text(model_loaded, PROMPTS[0], GenerationParams(max_new_tokens=8, temperature=0))
    assert scheduler_status(model_loaded.model)["tokens"] == 8
    ref = weakref.ref(model_loaded.model)
    model_loaded.model = None
    del model_loaded
    for _ in range(50):  # the scheduler thread exits once idle
        gc.collect()
        if ref() is None:
            break
        time.sleep(0.02)
    assert ref() is None, "the batch scheduler still references the model"
