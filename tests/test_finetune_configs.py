"""Every recipe YAML under configs/finetune/ loads into its dataclasses, says how to launch it, and keeps
the values its seed prescribes; the offline twins train demo models on our sample sets."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from finetune.config import all_fields, build_config, read_yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs" / "finetune"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
TWINS = [path for path in CONFIGS if path.name.startswith("demo-")]


def load(path: Path):
    config, problems = build_config(read_yaml(path), source=f"configs/finetune/{path.name}")
    assert problems == [], problems
    return config


def test_the_recipes_of_issue_5_exist():
    names = {path.stem for path in CONFIGS}
    assert {"python-codegen-lora", "demo-python", "demo-html"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_yaml_loads_into_the_dataclasses(path):
    config = load(path)
    assert config.run.run_name and config.run.task and config.model.base and config.data.dataset
    assert config.recipe == path.stem
    # Every key in the file is a real setting (a typo would have been a problem above), and the
    # resolved config round-trips through YAML.
    assert set(read_yaml(path)) <= set(all_fields())
    again, problems = build_config(yaml.safe_load(config.to_yaml()))
    assert problems == [] and again.as_flat_dict() == config.as_flat_dict()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_header_has_the_launch_command_and_keys_are_commented(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line)
    assert any(f"python -m finetune train --config configs/finetune/{path.name}" in line for line in header)
    commented = [line for line in lines if line and not line.startswith("#") and "  # " in line]
    assert len(commented) >= 3, "explain the choices next to the keys"


def test_python_codegen_lora_keeps_seed_002():
    config = load(CONFIG_DIR / "python-codegen-lora.yaml")
    assert config.model.base == "Salesforce/codegen-350M-mono"
    assert config.model.kind == "causal"
    assert config.model.quantization == "auto"  # nf4 + double quant where CUDA is present
    assert config.model.dtype == "float16"  # the seed's compute dtype
    adapter = config.adapter
    assert (adapter.lora_r, adapter.lora_alpha, adapter.lora_dropout, adapter.lora_bias) == (
        64,
        16,
        0.1,
        "none",
    )
    assert config.style_name == "alpaca-code"
    assert config.data.dataset == "iamtarun/python_code_instructions_18k_alpaca"
    assert config.data.loss_on_prompt is False
    assert config.data.packing is False  # available as an option (the seed packed)
    assert config.run.task == "python"


@pytest.mark.parametrize("path", TWINS, ids=lambda p: p.name)
def test_twins_run_offline_on_demo_models_and_our_samples(path):
    from babl_core.catalog import Catalog

    config = load(path)
    assert config.model.base.startswith("models/demo/")
    assert config.data.dataset.startswith("finetune/samples/")
    assert (REPO_ROOT / config.data.dataset).is_file()
    demo_bases = {spec.base for spec in Catalog.load().entries if spec.demo}
    assert config.model.base in demo_bases
    # A twin's run name is its own: it must not be refused as a catalog id.
    assert config.run.run_name not in {spec.id for spec in Catalog.load().entries}


def test_quantization_follows_the_app_policy():
    """`auto` means what babl_core.loading means: nf4 with CUDA for causal models, none on CPU."""
    from babl_core.loading import plan_load
    from finetune.factories import model_spec

    config = load(CONFIG_DIR / "python-codegen-lora.yaml")
    spec = model_spec(config)
    gpu = plan_load(spec, "cuda:0")
    assert (gpu.quantization, gpu.dtype) == ("nf4", "float16")
    cpu = plan_load(spec, "cpu")
    assert (cpu.quantization, cpu.dtype) == ("none", "float32")
    assert any("float16 compute is slow on CPU" in note for note in cpu.notes)
