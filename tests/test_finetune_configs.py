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


REAL_TO_TWIN = {
    "python-codegen-lora": "demo-python",
    "html-codellama-qlora": "demo-html",
    "email-t5": "demo-email",
    "qa-t5-squad": "demo-qa",
    "code-t5-mbpp": "demo-code",
}


# Recipes on the real SmolLM2 that need no hub: offline already, so they have no twin.
SMOLLM2 = {"smollm2-python": "smollm2-python", "smollm2-html": "smollm2-html", "smollm2-qa": "smollm2-chat"}


def test_every_recipe_has_an_offline_twin():
    names = {path.stem for path in CONFIGS}
    assert set(REAL_TO_TWIN) | set(REAL_TO_TWIN.values()) | set(SMOLLM2) == names
    for real, twin in REAL_TO_TWIN.items():
        a, b = load(CONFIG_DIR / f"{real}.yaml"), load(CONFIG_DIR / f"{twin}.yaml")
        # Same recipe code, prompt style, task and data columns; only size and speed differ.
        assert (a.model.kind, a.style_name, a.run.task) == (b.model.kind, b.style_name, b.run.task), real
        assert a.data.columns == b.data.columns, real
        assert a.model.quantization == b.model.quantization or a.model.quantization == "auto", real
        assert f"configs/finetune/{twin}.yaml" in (CONFIG_DIR / f"{real}.yaml").read_text(), real


def test_catalog_entries_that_wait_for_training_name_an_existing_recipe():
    """email-t5, qa-t5 and code-t5 wait for an adapter directory; their recipe must train exactly that
    directory on exactly the entry's base, with the entry's prompt style."""
    from babl_core import settings
    from babl_core.engine.catalog import Catalog

    waiting = [spec for spec in Catalog.load().entries if spec.requires_adapter]
    assert {spec.id for spec in waiting} == {"email-t5", "qa-t5", "code-t5"}
    for spec in waiting:
        path = REPO_ROOT / spec.train_command.split("--config ")[1].split()[0]
        config = load(path)
        assert settings.resolve_path(spec.adapter) == settings.adapters_dir() / config.run.run_name, spec.id
        assert config.model.base == spec.base, spec.id
        assert config.style_name == spec.prompt_style and config.run.task == spec.task, spec.id
        assert config.adapter.finetuning == "lora", spec.id


def test_real_causal_recipes_train_the_catalog_bases():
    from babl_core.engine.catalog import Catalog

    bases = {spec.id: spec.base for spec in Catalog.load().entries}
    assert load(CONFIG_DIR / "html-codellama-qlora.yaml").model.base == bases["html-codellama"]
    assert load(CONFIG_DIR / "python-codegen-lora.yaml").model.base == bases["python-codegen"]


@pytest.mark.parametrize("recipe", sorted(SMOLLM2))
def test_smollm2_recipes_train_the_catalog_base_and_give_their_measured_time(recipe):
    """Each trains the very base the catalog's smollm2 entries serve (same base + GGUF file: one copy in
    memory serves base and adapter), and its header gives the command and the time measured."""
    from babl_core.engine.catalog import Catalog

    config = load(CONFIG_DIR / f"{recipe}.yaml")
    entry = Catalog.load().get(SMOLLM2[recipe])
    assert (config.model.base, config.model.gguf_file) == (entry.base, entry.gguf_file)
    assert (config.model.quantization, config.model.dtype) == (entry.quantization, entry.dtype)
    assert config.eval.eval_base is True
    header = (CONFIG_DIR / f"{recipe}.yaml").read_text().split("\n# ---", 1)[0]
    assert f"--config configs/finetune/{recipe}.yaml" in header and "Measured" in header


def test_smollm2_python_documents_its_humaneval_subset_and_draws_it_every_run():
    """pass@1 is measured on a fixed subset; the recipe lists it, and eval_limit + eval_seed draw it."""
    from finetune.metrics import load_humaneval

    path = CONFIG_DIR / "smollm2-python.yaml"
    config = load(path)
    (line,) = [x for x in path.read_text().splitlines() if x.startswith("# HumanEval subset:")]
    documented = [f"HumanEval/{n.strip()}" for n in line.split(":", 1)[1].split("(")[0].split(",")]
    for _ in range(2):
        drawn = load_humaneval(limit=config.eval.eval_limit, seed=config.eval.eval_seed)
        assert [problem["task_id"] for problem in drawn] == documented


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
    from babl_core.engine.catalog import Catalog

    config = load(path)
    assert config.model.base.startswith("models/demo/")
    assert config.data.dataset.startswith("finetune/samples/")
    assert (REPO_ROOT / config.data.dataset).is_file()
    demo_bases = {spec.base for spec in Catalog.load().entries if spec.demo}
    assert config.model.base in demo_bases
    # A twin's run name is its own: it must not be refused as a catalog id.
    assert config.run.run_name not in {spec.id for spec in Catalog.load().entries}


def test_quantization_follows_the_app_policy():
    """`auto` means what babl_core.engine.loading means: nf4 with CUDA for causal models, none on CPU."""
    from babl_core.engine.loading import plan_load
    from finetune.factories import base_weights

    config = load(CONFIG_DIR / "python-codegen-lora.yaml")
    spec = base_weights(config)
    gpu = plan_load(spec, "cuda:0")
    assert (gpu.quantization, gpu.dtype) == ("nf4", "float16")
    cpu = plan_load(spec, "cpu")
    assert (cpu.quantization, cpu.dtype) == ("none", "float32")
    assert any("float16 compute is slow on CPU" in note for note in cpu.notes)


def test_html_codellama_qlora_keeps_seed_001():
    config = load(CONFIG_DIR / "html-codellama-qlora.yaml")
    assert (config.model.quantization, config.model.dtype) == ("nf4", "bfloat16")
    assert config.model.gradient_checkpointing is True
    assert config.adapter.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert config.data.dataset == "jawerty/html_dataset"
    assert config.data.columns == {"instruction": "label", "response": "html"}
    assert (config.data.eval_fraction, config.data.max_length) == (0.2, 512)
    assert config.style_name == "codellama-inst"
    twin = load(CONFIG_DIR / "demo-html.yaml")
    assert (twin.model.quantization, twin.model.gradient_checkpointing) == ("nf4", True)  # QLoRA offline too


def test_t5_recipes_keep_their_seeds():
    email = load(CONFIG_DIR / "email-t5.yaml")
    assert email.data.columns == {"key_points": "subject_line", "body": "email_body"}  # aeslc reversed
    qa = load(CONFIG_DIR / "qa-t5-squad.yaml")
    assert qa.data.columns["answer"] == "answers.text.0" and qa.data.with_context is True
    assert qa.data.max_train_samples == 50000  # seed 004's 50k rows
    code = load(CONFIG_DIR / "code-t5-mbpp.yaml")
    assert code.data.columns == {"text": "text", "code": "code"}
    for config in (email, qa, code):
        assert config.model.kind == "seq2seq" and config.model.quantization == "none"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"eval_temperature": "100"}, "eval_temperature: must be a number from 0 to 2"),
        ({"eval_temperature": "-1"}, "eval_temperature: must be a number from 0 to 2"),
        ({"eval_max_new_tokens": "100000"}, "eval_max_new_tokens: must be a whole number from 1 to 4096"),
    ],
)
def test_eval_generation_settings_have_the_apps_bounds(overrides, message):
    # The same definition as the app's, so an eval setting the app would refuse fails before training.
    path = sorted((REPO_ROOT / "configs" / "finetune").glob("demo-*.yaml"))[0]
    _, problems = build_config(read_yaml(path), overrides=overrides)
    assert any(message in p for p in problems), problems
