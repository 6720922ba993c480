"""The catalog: schema, errors naming entry/field/fix, availability words, adapter discovery."""

from __future__ import annotations

import json

import pytest
import yaml

from babl_core.engine import availability as availability_mod
from babl_core.engine import gguf
from babl_core.engine.availability import availability, default_model
from babl_core.engine.catalog import (
    AVAILABILITY_WORDS,
    Catalog,
    CatalogError,
    ModelSpec,
    UnknownModel,
    parse_catalog,
)
from tests.conftest import REPO_ROOT, install_adapter


def entry(**kw):
    base = {"id": "m1", "label": "M1", "task": "python", "base": "models/demo/demo-python"}
    base.update(kw)
    return base


def test_shipped_catalog_loads_with_real_and_demo_entries():
    cat = Catalog.load(REPO_ROOT / "configs" / "models.yaml")
    ids = [s.id for s in cat.entries]
    for wanted in ("html-codellama", "python-codegen", "email-t5", "qa-t5", "code-t5"):
        assert wanted in ids
    for wanted in ("demo-html", "demo-python", "demo-email", "demo-qa"):
        assert wanted in ids
    html = cat.get("html-codellama")
    assert (html.base, html.adapter) == (
        "TinyPixel/CodeLlama-7B-Instruct-bf16-sharded",
        "MG650/CodeLlama_HTML_FineTuned",
    )
    assert (html.quantization, html.dtype, html.prompt_style) == ("nf4", "bfloat16", "codellama-inst")
    py = cat.get("python-codegen")
    assert (py.base, py.quantization, py.dtype) == ("Salesforce/codegen-350M-mono", "nf4", "float16")
    assert py.adapter == "01GangaPutraBheeshma/colab_code_generator_FT_code_gen_UT"
    assert cat.get("email-t5").requires_adapter and "finetune train" in cat.get("email-t5").train_command
    assert cat.get("demo-email").base == cat.get("demo-qa").base  # one tiny T5 for both tasks


def test_every_problem_is_reported_at_once_with_entry_field_and_fix():
    data = {
        "models": [
            entry(id="ok"),
            entry(id="bad-task", task="htm"),
            entry(id="Bad Id"),
            entry(id="typo", quantisation="nf4"),
            entry(id="gen", generation={"temperature": -1, "max_new_tokens": 0, "top_q": 1}),
            entry(id="remote", backend="openai", base=None),
            entry(id="ok"),
        ]
    }
    with pytest.raises(CatalogError) as info:
        parse_catalog(data, "test.yaml")
    message = str(info.value)
    problems = info.value.problems
    assert "test.yaml has" in message
    assert any("'bad-task'" in p and "'task'" in p and "did you mean 'html'" in p for p in problems)
    assert any("'Bad Id'" in p and "slug" in p for p in problems)
    assert any("'quantisation'" in p and "did you mean 'quantization'" in p for p in problems)
    assert any("generation.temperature" in p and "from 0 to 2" in p for p in problems)
    assert any("generation.max_new_tokens" in p for p in problems)
    assert any("generation.top_q" in p and "top_p" in p for p in problems)
    assert any("'remote'" in p and "base_url" in p for p in problems)
    assert any("duplicate" in p for p in problems)
    assert len(problems) >= 9


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(CatalogError, match="file not found"):
        Catalog.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [\n")
    with pytest.raises(CatalogError, match="not valid YAML"):
        Catalog.load(bad)
    bad.write_text("entries: []\n")
    with pytest.raises(CatalogError, match="expected `models:`"):
        Catalog.load(bad)


def test_unknown_model_suggests_a_close_id():
    cat = Catalog([ModelSpec(id="demo-html", label="x", task="html", base="b")])
    with pytest.raises(UnknownModel) as info:
        cat.get("demo-htm")
    assert "Did you mean 'demo-html'" in str(info.value)


def test_availability_local_and_missing_demo_path(models_dir):
    cat = Catalog.load(REPO_ROOT / "configs" / "models.yaml")
    local = availability(cat.get("demo-python"))
    assert local.word == "local" and local.servable
    missing = availability(ModelSpec(id="d", label="d", task="html", base="models/demo/nope", demo=True))
    assert missing.word == "unavailable"
    assert "python -m babl_core demo" in missing.reason


def test_availability_offline_hub_id_names_the_download_command():
    spec = ModelSpec(id="real", label="r", task="python", base="someorg/not-cached-model")
    avail = availability(spec)
    assert avail.word == "unavailable" and not avail.servable
    assert "offline" in avail.reason and "python -m babl_core download real" in avail.reason


def test_availability_downloadable_when_online(monkeypatch):
    monkeypatch.setattr(availability_mod, "is_offline", lambda: False)
    spec = ModelSpec(id="real", label="r", task="python", base="someorg/not-cached-model")
    assert availability(spec).word == "downloadable"


def test_availability_cached_from_a_local_hf_cache(tmp_path, monkeypatch):
    # The HF cache layout: models--org--name/snapshots/<rev>/files (+ refs/main).
    hub = tmp_path / "hub"
    snap = hub / "models--someorg--cached-model" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (snap / "model.safetensors").write_bytes(b"0")
    (hub / "models--someorg--cached-model" / "refs").mkdir()
    (hub / "models--someorg--cached-model" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    spec = ModelSpec(id="c", label="c", task="python", base="someorg/cached-model")
    assert availability(spec).word == "cached"


def test_needs_training_until_the_adapter_exists(models_dir, html_adapters):
    spec = ModelSpec(
        id="email-x", label="e", task="html", base="models/demo/demo-html", adapter="models/adapters/email-x",
        requires_adapter=True, train_command="python -m finetune train --config configs/finetune/email-x.yaml",
    )  # fmt: skip
    before = availability(spec)
    assert before.word == "needs-training"
    assert "python -m finetune train --config configs/finetune/email-x.yaml" in before.reason
    install_adapter(html_adapters["ad-a"], models_dir, "email-x")
    assert availability(spec).word == "local"


def test_words_are_the_contract():
    assert AVAILABILITY_WORDS == ("local", "cached", "downloadable", "needs-training", "unavailable")


def test_discovered_adapter_appears_on_the_next_listing(models_dir, html_adapters):
    cat = Catalog.load(REPO_ROOT / "configs" / "models.yaml")
    before = cat.ids()
    assert "my-run" not in before
    install_adapter(html_adapters["ad-a"], models_dir, "my-run")
    meta_path = models_dir / "adapters" / "my-run" / "babl.json"
    meta = json.loads(meta_path.read_text())
    meta["base"] = "models/demo/demo-html"  # relative, as finetune writes it
    meta_path.write_text(json.dumps(meta))
    spec = cat.get("my-run")
    assert spec.source == "discovered"
    # It shares the demo entry's loading settings, so both hit the same cache key.
    twin = cat.get("demo-html")
    assert (spec.quantization, spec.dtype, spec.kind) == (twin.quantization, twin.dtype, twin.kind)
    assert availability(spec).word == "local"


def test_adapter_named_by_a_catalog_entry_fills_that_entry(models_dir, html_adapters, tmp_path):
    data = {"models": [entry(id="filled", task="html", base="models/demo/demo-html",
                             adapter="models/adapters/filled-run", requires_adapter=True)]}  # fmt: skip
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(data))
    cat = Catalog.load(path)
    assert availability(cat.get("filled")).word == "needs-training"
    install_adapter(html_adapters["ad-a"], models_dir, "filled-run")
    assert cat.ids() == ["filled"]  # no second entry: the adapter filled the one waiting for it
    assert availability(cat.get("filled")).word == "local"


def test_broken_babl_json_is_skipped_with_a_warning(models_dir):
    bad = models_dir / "adapters" / "broken"
    bad.mkdir()
    (bad / "babl.json").write_text("{not json")
    cat = Catalog.load(REPO_ROOT / "configs" / "models.yaml")
    assert "broken" not in cat.ids()
    assert any("broken" in w for w in cat.warnings)


def test_default_model_offline_is_the_first_usable_and_prefer_gpu_skipped_on_cpu(monkeypatch):

    monkeypatch.delenv("BABL_DEFAULT_MODEL", raising=False)
    monkeypatch.setattr(gguf, "package_dir", lambda name: None)  # without the real weights' package
    cat = Catalog.load(REPO_ROOT / "configs" / "models.yaml")
    assert default_model(cat, cuda=False).id == "demo-html"
    # Online on CPU: the CodeGen entry (the 7B CodeLlama is passed over without CUDA).
    for module in (availability_mod, gguf):  # where availability asks whether the hub answers
        monkeypatch.setattr(module, "is_offline", lambda: False)
    assert default_model(cat, cuda=False).id == "python-codegen"
    assert default_model(cat, cuda=True).id == "html-codellama"


def test_display_label_mentions_task_quantization_and_demo():
    cat = Catalog.load(REPO_ROOT / "configs" / "models.yaml")
    assert "demo — random weights" in cat.get("demo-python").display_label
    assert "nf4" in cat.get("html-codellama").display_label


def test_babl_models_replaces_the_catalog(tmp_path, monkeypatch):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"models": [entry(id="only-me")]}))
    monkeypatch.setenv("BABL_MODELS", str(path))
    assert Catalog.load().ids() == ["only-me"]
