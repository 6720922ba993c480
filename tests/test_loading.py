"""The loader: quantization policy, adapters, describe(), unavailable models, quiet warnings."""

from __future__ import annotations

import logging

import pytest

from babl_core.engine.batching import generate_text
from babl_core.engine.catalog import BaseWeights, Catalog, ModelSpec
from babl_core.engine.generation import GenerationParams
from babl_core.engine.loaded import ModelUnavailable
from babl_core.engine.loading import load_model, plan_load
from tests.conftest import REPO_ROOT

GREEDY = GenerationParams(max_new_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def catalog():
    return Catalog.load(REPO_ROOT / "configs" / "models.yaml")


def test_plan_on_cpu_follows_the_policy():
    nf4 = ModelSpec(
        id="a", label="a", task="html", base="x/y", quantization="nf4", dtype="float16", kind="causal"
    )
    plan = plan_load(nf4, "cpu")
    assert (plan.quantization, plan.dtype) == ("nf4", "bfloat16")
    assert any("float16" in n for n in plan.notes)
    auto = ModelSpec(id="b", label="b", task="html", base="x/y", kind="causal")
    assert (plan_load(auto, "cpu").quantization, plan_load(auto, "cpu").dtype) == ("none", "float32")
    t5 = ModelSpec(
        id="c", label="c", task="qa", base="x/t5", quantization="none", dtype="float32", kind="seq2seq"
    )
    assert plan_load(t5, "cpu").quantization == "none"


def test_bad_device_setting_names_the_variable(monkeypatch, catalog):
    monkeypatch.setenv("BABL_DEVICE", "gpu0")
    with pytest.raises(ValueError, match="BABL_DEVICE"):
        plan_load(catalog.get("demo-python"))
    monkeypatch.setenv("BABL_DEVICE", "cuda")
    with pytest.raises(ValueError, match="CUDA is not available"):
        plan_load(catalog.get("demo-python"))


def test_demo_model_loads_and_describes_itself(catalog):
    loaded = load_model(catalog.get("demo-python"))
    text = loaded.describe()
    assert text.startswith("float32 on cpu, ") and " MB" in text
    assert loaded.kind == "causal" and loaded.context_length == 2048
    assert loaded.tokenizer.padding_side == "left"


def test_nf4_on_cpu_through_bitsandbytes(catalog, caplog):
    import bitsandbytes as bnb

    spec = ModelSpec(
        id="q", label="q", task="html", base="models/demo/demo-html", quantization="nf4", dtype="bfloat16",
        kind="causal", prompt_style="codellama-inst",
    )  # fmt: skip
    with caplog.at_level(logging.WARNING):
        loaded = load_model(spec)
        text = generate_text(loaded, "<s>[INST] hi [/INST]", GREEDY, add_special_tokens=False)
    assert loaded.plan.quantization == "nf4"
    assert loaded.describe().startswith("nf4 (double quant, bfloat16 compute) on cpu, ")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in loaded.model.modules())
    assert isinstance(text, str)
    # The known-harmless bitsandbytes kernel message is filtered out.
    assert not any("gemm_4bit_forward" in r.getMessage() for r in caplog.records)


def test_int8_on_cpu_without_cast_warning_flood(catalog, caplog):
    spec = ModelSpec(id="q8", label="q8", task="html", base="models/demo/demo-html", quantization="int8",
                     dtype="float32", kind="causal")  # fmt: skip
    with caplog.at_level(logging.WARNING):
        loaded = load_model(spec)
        generate_text(loaded, "hello", GREEDY)
    assert loaded.describe().startswith("int8 on cpu")
    assert not any("inputs will be cast" in r.getMessage() for r in caplog.records)


def test_adapter_changes_the_output(models_dir, html_adapters):
    base_spec = ModelSpec(id="b", label="b", task="html", base="models/demo/demo-html", kind="causal",
                          quantization="none", dtype="float32")  # fmt: skip
    with_adapter = ModelSpec(**{**base_spec.__dict__, "id": "ba", "adapter": str(html_adapters["ad-a"])})
    plain = load_model(base_spec)
    adapted = load_model(with_adapter)
    assert adapted.is_peft and not plain.is_peft
    assert "+ adapter" in adapted.describe()
    a = generate_text(adapted, "<div>", GREEDY)
    b = generate_text(plain, "<div>", GREEDY)
    assert a != b
    # The same weights viewed without the adapter give the base's text (per-request selection).
    assert generate_text(adapted.with_adapter(None), "<div>", GREEDY) == b


def test_unavailable_is_a_clear_error_not_a_traceback(catalog):
    with pytest.raises(ModelUnavailable) as info:
        load_model(catalog.get("html-codellama"))
    assert "offline" in str(info.value) and "python -m babl_core download html-codellama" in str(info.value)
    with pytest.raises(ModelUnavailable, match=r"needs|train"):
        load_model(catalog.get("email-t5"))


def test_corrupt_local_model_is_unavailable_with_the_cause(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    spec = ModelSpec(
        id="broken", label="b", task="html", base=str(broken), kind="causal", quantization="none"
    )
    with pytest.raises(ModelUnavailable, match="could not read"):
        load_model(spec)


def test_seq2seq_demo_loads(catalog):
    loaded = load_model(catalog.get("demo-qa"))
    assert loaded.kind == "seq2seq"
    assert loaded.context_length == 1024


def test_a_base_without_an_entry_loads_as_its_entry_would(catalog):
    """Fine-tuning, merging and evaluation load a bare base (`BaseWeights`): same plan, same weights."""
    from babl_core.engine.loading import load_base, release

    entry = catalog.get("demo-python")
    base = BaseWeights(base=entry.base, quantization=entry.quantization, dtype=entry.dtype, name="my-run")
    assert plan_load(base, "cpu") == plan_load(entry, "cpu")
    assert entry.weights.name == "demo-python" and entry.weights.base == entry.base
    loaded = load_base(base, plan_load(base, "cpu"))
    try:
        assert loaded.kind == "causal" and loaded.base == entry.base
        assert generate_text(loaded, "def add(a, b):", GREEDY) == generate_text(
            load_model(entry), "def add(a, b):", GREEDY
        )
    finally:
        release(loaded)


def test_a_bare_base_that_is_missing_names_the_run_and_a_fix_that_applies_to_it(monkeypatch, tmp_path):
    from babl_core.engine.loading import load_base

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelUnavailable) as hub:
        load_base(BaseWeights(base="someone/not-here", name="my-run"))
    message = str(hub.value)
    assert message.startswith("my-run is unavailable") and "not in the Hugging Face cache" in message
    assert "babl_core download" not in message  # that command takes catalog ids, and my-run is none
    with pytest.raises(ModelUnavailable) as folder:
        load_base(BaseWeights(base=str(tmp_path / "gone"), name="my-run"))
    assert "is missing; fix the path or restore the directory" in str(folder.value)
    assert "catalog" not in str(folder.value)
