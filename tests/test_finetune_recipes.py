"""The causal recipe end to end on the demo twins: the loss falls, the adapter is written atomically with
babl.json, the catalog lists it, and it loads in babl_core and changes the model's outputs."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.config import ConfigError, load_config

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS = REPO_ROOT / "configs" / "finetune"
# Short rows and runs keep each training test to a few seconds on two cores; the twins' own lengths
# and step counts are for a person watching the loss.
QUICK = {"max_length": 128, "logging_steps": 5, "save_steps": 1000}


def train_twin(name: str, **overrides):
    from finetune.recipes import run_training

    config = load_config(CONFIGS / f"{name}.yaml", {**QUICK, **overrides})
    return config, run_training(config)


async def collect(reply) -> str:
    return "".join([chunk async for chunk in reply])


def logged_losses(log_history: list[dict]) -> list[float]:
    return [entry["loss"] for entry in log_history if "loss" in entry]


def logits_for(loaded, text: str):
    import torch

    ids = loaded.tokenizer(text, return_tensors="pt")
    with torch.no_grad(), loaded.selecting_adapter():
        return loaded.model(**ids).logits[0, -1]


@pytest.mark.parametrize(
    ("twin", "run_name", "base_id", "task", "style"),
    [
        ("demo-python", "demo-python-lora", "demo-python", "python", "alpaca-code"),
        ("demo-html", "demo-html-lora", "demo-html", "html", "codellama-inst"),
    ],
)
def test_twin_trains_loss_falls_and_the_app_serves_the_adapter(
    models_dir, twin, run_name, base_id, task, style
):
    import torch

    from babl_core.catalog import Catalog, UnknownModel, availability
    from babl_core.chat import ChatService
    from babl_core.loading import load_model

    service = ChatService()  # a running app: it must see the adapter without a restart
    with pytest.raises(UnknownModel):
        service.spec(run_name)

    _config, result = train_twin(twin, max_steps=30)

    # Loss: the first logged value is the untrained model (step 1); the end must be far below it.
    losses = logged_losses(result.log_history)
    assert len(losses) >= 6
    assert sum(losses[-2:]) / 2 < losses[0] - 1.0, losses

    # The adapter directory: PEFT files (LoRA weights only), our metadata, the loss curve; no leftovers.
    out = models_dir / "adapters" / run_name
    assert result.output_dir == out
    assert {"adapter_config.json", "adapter_model.safetensors", "babl.json", "loss.png", "finetune.yaml"} <= {
        p.name for p in out.iterdir()
    }
    assert not (models_dir / "adapters" / ".partial").exists()
    assert not (models_dir / "checkpoints" / run_name).exists()  # deleted after success by default
    from safetensors import safe_open

    with safe_open(out / "adapter_model.safetensors", "pt") as weights:
        assert all("lora_" in key for key in weights.keys())  # noqa: SIM118 - safe_open has no __iter__
    meta = json.loads((out / "babl.json").read_text())
    assert meta["id"] == run_name and meta["task"] == task and meta["prompt_style"] == style
    assert meta["base"] == f"models/demo/{base_id}"  # portable, as the catalog writes bases
    assert meta["recipe"] == twin
    assert meta["metrics"]["steps"] == 30 and meta["metrics"]["trainable_parameters"] > 0
    assert meta["metrics"]["eval_loss"] < losses[0]
    assert meta["created"].endswith("Z")

    # Discovered on the next listing, with the base entry's loading settings.
    spec = Catalog.load().get(run_name)
    assert spec.source == "discovered" and spec.adapter == f"models/adapters/{run_name}"
    assert availability(spec).word == "local"

    # The running service lists it and answers with it, through the app's own generation path.
    reply = service.complete(
        run_name, [{"role": "user", "content": "A page"}], max_new_tokens=6, temperature=0
    )
    text = asyncio.run(collect(reply))
    assert reply.spec.id == run_name and reply.stats.completion_tokens > 0 and text
    assert reply.description.endswith(f"+ adapter models/adapters/{run_name}")

    # It loads through babl_core and changes what the base model predicts.
    tuned = load_model(spec)
    base = load_model(Catalog.load().get(base_id))
    prompt = "Write a function that adds two numbers."
    assert not torch.allclose(logits_for(tuned, prompt), logits_for(base, prompt), atol=1e-3)


def test_packing_trains_through_trl(models_dir, monkeypatch):
    """packing: true hands the tokenized rows (labels included) to TRL's SFTTrainer, which packs them."""
    import trl

    made = []

    class RecordingSFTTrainer(trl.SFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(trl, "SFTTrainer", RecordingSFTTrainer)
    with pytest.raises(ConfigError, match="LoRA on lm_head would never train"):
        load_config(CONFIGS / "demo-python.yaml", {"packing": True})
    _config, result = train_twin(
        "demo-python",
        packing=True,
        max_steps=3,
        max_length=512,
        run_name="demo-python-packed",
        target_modules="qkv_proj,out_proj",
    )
    (trainer,) = made
    packed = trainer.train_dataset
    assert "seq_lengths" in packed.column_names  # one row holds several examples
    assert len(packed) < result.metrics["train_examples"]
    # The answer-only mask survived packing: some tokens carry no loss.
    assert any(label == -100 for row in packed["labels"] for label in row)
    assert (models_dir / "adapters" / "demo-python-packed" / "adapter_model.safetensors").is_file()


def test_run_name_rules(models_dir):
    twin = CONFIGS / "demo-python.yaml"
    # A catalog id is refused, unless --overwrite.
    with pytest.raises(ConfigError, match="'demo-html' is already a model id in the catalog"):
        load_config(twin, {"run_name": "demo-html"})
    load_config(twin, {"run_name": "demo-html", "overwrite": "true"})
    # Except when a catalog entry waits for exactly this adapter directory: training fills it.
    load_config(twin, {"run_name": "email-t5"})
    # An existing adapter directory is refused unless --overwrite.
    (models_dir / "adapters" / "demo-python-lora").mkdir()
    with pytest.raises(ConfigError, match="already exists; pass --overwrite true"):
        load_config(twin)
    load_config(twin, {"overwrite": True})
    # Checkpoints an interrupted run left: --resume or --overwrite, never silently ignored.
    (models_dir / "checkpoints" / "other-run" / "checkpoint-5").mkdir(parents=True)
    with pytest.raises(ConfigError, match="pass --resume true to continue it"):
        load_config(twin, {"run_name": "other-run"})
    with pytest.raises(ConfigError, match=r"no checkpoint in .* to continue from"):
        load_config(twin, {"run_name": "fresh-run", "resume": True})


@pytest.mark.slow
def test_cli_train_then_babl_core_models_lists_it(models_dir):
    """The real commands, as a user types them: train exits 0, then a new process lists the adapter."""
    env = {**os.environ, "BABL_MODELS_DIR": str(models_dir), "HF_HUB_OFFLINE": "1"}
    train = subprocess.run(
        [sys.executable, "-m", "finetune", "train", "--config", "configs/finetune/demo-html.yaml",
         "--max_steps", "6", "--max-length", "96", "--eval_steps", "3"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    assert "trained demo-html-lora: 6 steps" in train.stdout
    assert "trainable parameters:" in train.stderr
    assert "6/6" in train.stderr  # Trainer's progress bar reached the end
    listing = subprocess.run(
        [sys.executable, "-m", "babl_core", "models", "--json"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert listing.returncode == 0, listing.stderr
    rows = {row["id"]: row for row in json.loads(listing.stdout)}
    assert rows["demo-html-lora"]["availability"] == "local"
    assert rows["demo-html-lora"]["source"] == "discovered"
