"""The recipes end to end on the offline twins: the loss falls, the adapter is written atomically with
babl.json and a loss plot, a running service lists it and answers with it, the email adapter fills the
catalog's email entry, and a run killed by a real signal resumes to the uninterrupted result."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune.config import ConfigError, load_config

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS = REPO_ROOT / "configs" / "finetune"
# Short rows and runs keep each training test to a few seconds on two cores; the twins' own lengths
# and step counts are for a person watching the loss.
QUICK = {"max_length": 128, "max_target_length": 64, "logging_steps": 5, "save_steps": 1000}


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Train on one thread: on a shared 2-core machine, two OpenMP threads competing with other
    processes make tiny-model steps several times slower, not faster (measured: 8.5 s vs 32 s)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def train_twin(name: str, **overrides):
    from finetune.recipes import run_training

    config = load_config(CONFIGS / f"{name}.yaml", {**QUICK, **overrides})
    return config, run_training(config)


async def collect(reply) -> str:
    return "".join([chunk async for chunk in reply])


def logged_losses(log_history: list[dict]) -> list[float]:
    return [entry["loss"] for entry in log_history if "loss" in entry]


def last_logits(loaded, text: str):
    import torch

    ids = loaded.tokenizer(text, return_tensors="pt")
    if loaded.kind == "seq2seq":
        start = loaded.model.config.decoder_start_token_id
        ids["decoder_input_ids"] = torch.tensor([[start]])
    with torch.no_grad(), loaded.selecting_adapter():
        return loaded.model(**ids).logits[0, -1]


TWINS = [
    # twin, run name, catalog entry of its base, task, prompt style, a user message for the app
    ("demo-python", "demo-python-lora", "demo-python", "python", "alpaca-code", "Add two numbers."),
    ("demo-html", "demo-html-qlora", "demo-html", "html", "codellama-inst", "A landing page."),
    ("demo-email", "demo-email-lora", "demo-email", "email", "t5-email", "Key points: lunch on friday"),
    ("demo-qa", "demo-qa-squad", "demo-qa", "qa", "t5-qa", "Question: who?\nContext: Ada wrote it."),
    ("demo-code", "demo-code-mbpp", "demo-email", "code", "t5-code", "Reverse a list."),
]


@pytest.mark.parametrize(
    ("twin", "run_name", "base_id", "task", "style", "message"), TWINS, ids=[t[0] for t in TWINS]
)
def test_twin_trains_loss_falls_and_the_app_serves_the_adapter(
    models_dir, twin, run_name, base_id, task, style, message
):
    import torch
    from PIL import Image

    from babl_core.engine.availability import availability
    from babl_core.engine.catalog import Catalog, UnknownModel
    from babl_core.engine.loading import load_model
    from babl_core.engine.service import ChatService

    service = ChatService()  # a running app: it must see the adapter without a restart
    with pytest.raises(UnknownModel):
        service.spec(run_name)

    config, result = train_twin(twin, max_steps=30, eval_steps=15)

    # Loss: the first logged value is the untrained model (step 1); the end must be far below it.
    losses = logged_losses(result.log_history)
    assert len(losses) >= 6
    assert sum(losses[-2:]) / 2 < losses[0] - 1.0, losses
    evals = [entry["eval_loss"] for entry in result.log_history if "eval_loss" in entry]
    assert len(evals) == 2 and evals[-1] < losses[0]

    # The adapter directory: PEFT files (LoRA weights only), our metadata, the loss curve; no leftovers.
    out = models_dir / "adapters" / run_name
    assert result.output_dir == out
    names = {p.name for p in out.iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "babl.json",
        "loss.png",
        "finetune.yaml",
    } <= names
    assert not (models_dir / "adapters" / ".partial").exists()
    assert not (models_dir / "checkpoints" / run_name).exists()  # deleted after success by default
    from safetensors import safe_open

    with safe_open(out / "adapter_model.safetensors", "pt") as weights:
        assert all("lora_" in key for key in weights.keys())  # noqa: SIM118 - safe_open has no __iter__
    meta = json.loads((out / "babl.json").read_text())
    assert meta["id"] == run_name and meta["task"] == task and meta["prompt_style"] == style
    assert meta["base"] == config.model.base  # portable (models/demo/...), as the catalog writes bases
    assert meta["recipe"] == twin
    assert meta["metrics"]["steps"] == 30 and meta["metrics"]["trainable_parameters"] > 0
    assert meta["metrics"]["eval_loss"] == pytest.approx(evals[-1], abs=1e-5)
    assert meta["created"].endswith("Z")
    with Image.open(out / "loss.png") as image:
        assert image.format == "PNG" and image.size[0] >= 400
        image.verify()

    # Discovered on the next listing of the same, already running service.
    spec = service.spec(run_name)
    assert spec.source == "discovered" and spec.adapter == f"models/adapters/{run_name}"
    assert availability(spec).word == "local"
    reply = service.complete(
        run_name, [{"role": "user", "content": message}], max_new_tokens=6, temperature=0
    )
    asyncio.run(collect(reply))
    assert reply.spec.id == run_name and reply.stats.completion_tokens > 0
    assert reply.description.endswith(f"+ adapter models/adapters/{run_name}")

    # It loads through babl_core and changes what the base model predicts.
    tuned = load_model(spec)
    base = load_model(Catalog.load().get(base_id))
    assert not torch.allclose(last_logits(tuned, message), last_logits(base, message), atol=1e-3)


def test_trained_email_adapter_makes_the_catalog_email_entry_servable(models_dir, tmp_path, monkeypatch):
    """email-t5 waits for models/adapters/email-t5; training under that run name fills the entry."""
    import yaml

    from babl_core.engine.availability import availability
    from babl_core.engine.catalog import Catalog
    from babl_core.engine.service import ChatService

    # The shipped entry, with its hub base (t5-base, not downloadable here) swapped for the demo T5.
    catalog = yaml.safe_load((REPO_ROOT / "configs" / "models.yaml").read_text())
    entry = next(e for e in catalog["models"] if e["id"] == "email-t5")
    assert entry["requires_adapter"] and entry["adapter"] == "models/adapters/email-t5"
    entry["base"] = "models/demo/demo-t5"
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(catalog))
    monkeypatch.setenv("BABL_MODELS", str(path))

    before = availability(Catalog.load().get("email-t5"))
    assert before.word == "needs-training"
    assert "python -m finetune train --config configs/finetune/email-t5.yaml" in before.reason
    assert (REPO_ROOT / "configs" / "finetune" / "email-t5.yaml").is_file()

    # The run name is a catalog id, and allowed: the entry waits for exactly this directory.
    train_twin("demo-email", run_name="email-t5", max_steps=5)
    listing = Catalog.load().list()
    assert [s.id for s in listing].count("email-t5") == 1  # filled, not listed twice
    spec = next(s for s in listing if s.id == "email-t5")
    assert availability(spec).word == "local"
    assert spec.metrics["steps"] == 5
    reply = ChatService().complete("email-t5", [{"role": "user", "content": "Key points: lunch on friday"}],
                                   max_new_tokens=8, temperature=0)  # fmt: skip
    asyncio.run(collect(reply))
    assert reply.stats.completion_tokens > 0
    assert reply.description.endswith("+ adapter models/adapters/email-t5")

    # With the shipped catalog the entry no longer waits for training (its hub base is what is missing).
    monkeypatch.delenv("BABL_MODELS")
    shipped = availability(Catalog.load().get("email-t5"))
    assert shipped.word != "needs-training" and "t5-base" in shipped.reason


def test_full_finetuning_writes_a_complete_model(models_dir):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    config, result = train_twin("demo-qa", finetuning="full", max_steps=3, run_name="demo-qa-full")
    out = models_dir / "finetuned" / "demo-qa-full"
    assert result.output_dir == out and config.adapter_path() == out
    assert {"config.json", "model.safetensors", "babl.json", "loss.png"} <= {p.name for p in out.iterdir()}
    assert not (models_dir / "adapters" / "demo-qa-full").exists()  # not an adapter: nothing to discover
    assert result.metrics["trainable_parameters"] == result.metrics["total_parameters"]
    AutoModelForSeq2SeqLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out)("hi")["input_ids"]


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
        "demo-python", packing=True, max_steps=3, max_length=512, run_name="demo-python-packed",
        target_modules="qkv_proj,out_proj",
    )  # fmt: skip
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


def _adapter_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "adapter_model.safetensors")


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(models_dir, caplog):
    """SIGKILL a real training process after its first checkpoint; --resume finishes the run, and the
    adapter equals the one an uninterrupted run with the same seed produces."""
    import torch

    from finetune.outputs import complete_checkpoints
    from finetune.recipes import run_training

    settings = {**QUICK, "max_steps": 60, "save_steps": 5, "eval_steps": 30, "max_length": 96}
    argv = [f"--{key}={value}" for key, value in settings.items()]
    env = {**os.environ, "BABL_MODELS_DIR": str(models_dir), "BABL_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    checkpoints = models_dir / "checkpoints" / "demo-python-lora"
    process = subprocess.Popen(
        [sys.executable, "-m", "finetune", "train", "--config", "configs/finetune/demo-python.yaml", *argv],
        cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not complete_checkpoints(checkpoints):
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    saved = complete_checkpoints(checkpoints)
    killed_at = int(saved[-1].name.split("-")[1])
    assert 5 <= killed_at < 60, "the run must be killed mid-way"
    assert not (models_dir / "adapters" / "demo-python-lora").exists()

    # Resume (in this process) from the last complete checkpoint and finish.
    with caplog.at_level("INFO", logger="finetune"):
        resumed = run_training(load_config(CONFIGS / "demo-python.yaml", {**settings, "resume": True}))
    assert f"resuming from {saved[-1]}" in caplog.text
    assert resumed.metrics["steps"] == 60
    # The history from before the kill came back with the checkpoint: the curve starts at step 1.
    assert resumed.log_history[0]["step"] == 1

    # The same run, uninterrupted, under another name.
    straight = run_training(
        load_config(CONFIGS / "demo-python.yaml", {**settings, "run_name": "demo-python-straight"})
    )
    a, b = _adapter_weights(resumed.output_dir), _adapter_weights(straight.output_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), key
    assert resumed.metrics["eval_loss"] == pytest.approx(straight.metrics["eval_loss"], abs=1e-4)


def test_resume_refuses_changed_settings(models_dir):
    from finetune.outputs import start_checkpoint_dir

    config = load_config(CONFIGS / "demo-python.yaml")
    start_checkpoint_dir(config)  # what a run writes first: its resolved config
    (config.checkpoint_path() / "checkpoint-5").mkdir()
    (config.checkpoint_path() / "checkpoint-5" / "trainer_state.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"learning_rate \(was 0.02, now 0.001\)"):
        load_config(CONFIGS / "demo-python.yaml", {"resume": True, "learning_rate": "1e-3"})
    load_config(CONFIGS / "demo-python.yaml", {"resume": True, "keep_checkpoints": True})


@pytest.mark.slow
def test_cli_train_then_babl_core_models_lists_it(models_dir):
    """The real commands, as a user types them: train exits 0, then a new process lists the adapter."""
    env = {**os.environ, "BABL_MODELS_DIR": str(models_dir), "HF_HUB_OFFLINE": "1", "BABL_THREADS": "1"}
    train = subprocess.run(
        [sys.executable, "-m", "finetune", "train", "--config", "configs/finetune/demo-html.yaml",
         "--max_steps", "6", "--max-length", "96", "--eval_steps", "3"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    assert "trained demo-html-qlora: 6 steps" in train.stdout
    assert "nf4 (double quant, bfloat16 compute) on cpu" in train.stderr  # QLoRA through bitsandbytes
    assert "trainable parameters:" in train.stderr
    assert "6/6" in train.stderr  # Trainer's progress bar reached the end
    listing = subprocess.run(
        [sys.executable, "-m", "babl_core", "models", "--json"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert listing.returncode == 0, listing.stderr
    rows = {row["id"]: row for row in json.loads(listing.stdout)}
    assert rows["demo-html-qlora"]["availability"] == "local"
    assert rows["demo-html-qlora"]["source"] == "discovered"


@pytest.mark.parametrize("fixed", [True, False], ids=["with-fix", "bitsandbytes-default"])
def test_qlora_gradients_survive_an_evaluation(models_dir, fixed):
    """After an eval-mode forward (what Trainer.evaluate runs), a QLoRA training step must give the same
    gradients as before it. bitsandbytes' CPU repacking breaks that where the CPU has AVX512-BF16."""
    import warnings

    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training

    from babl_core.engine.loading import load_base, plan_load
    from finetune import factories

    config = load_config(CONFIGS / "demo-html.yaml", {"lora_dropout": 0.0})
    base = factories.base_weights(config)
    loaded = load_base(base, plan_load(base, "cpu"))
    assert loaded.plan.quantization == "nf4"
    model = prepare_model_for_kbit_training(loaded.model, use_gradient_checkpointing=False)
    repackable = factories.keep_4bit_weights_trainable(model) if fixed else 0
    torch.manual_seed(0)
    model = get_peft_model(model, factories.lora_config(config, "CAUSAL_LM"))
    batch = loaded.tokenizer(["<s>[INST] A red button [/INST] <button>Go</button>"], return_tensors="pt")
    batch["labels"] = batch["input_ids"].clone()
    first_layer = next(p for n, p in model.named_parameters() if "layers.0.self_attn.q_proj.lora_B" in n)

    def gradient():
        model.train()
        model.zero_grad()
        model(**batch).loss.backward()
        return first_layer.grad.clone()

    before = gradient()
    model.eval()
    with torch.no_grad():
        model(**batch)  # an evaluation pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # without the fix, torch warns about gemv_4bit's missing autograd
        after = gradient()
    assert before.abs().sum() > 0
    from bitsandbytes.cextension import lib  # noqa: F401 - loaded, so has_avx512bf16 is meaningful
    from bitsandbytes.functional import has_avx512bf16

    if fixed:
        assert torch.allclose(before, after, atol=1e-6)
        assert repackable > 0 or not has_avx512bf16()
    elif has_avx512bf16():
        # The failure the fix prevents, shown on this machine: the gradient is no longer the same.
        assert not torch.allclose(before, after, atol=1e-6)
