"""finetune.factories: the row order `auto` resolves to per device (chosen by bench/finetune.py)."""

from __future__ import annotations

from pathlib import Path

from babl_core.engine.loaded import LoadPlan
from finetune.config import load_config
from finetune.factories import sampling_strategy, training_arguments

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_auto_row_order_groups_by_length_on_cpu_only():
    assert sampling_strategy("auto", "cpu") == "group_by_length"
    assert sampling_strategy("auto", "cuda:0") == "random"  # not measured on GPUs: the old default stays
    assert sampling_strategy("random", "cpu") == "random"  # an explicit choice always wins
    assert sampling_strategy("group_by_length", "cuda:1") == "group_by_length"


def test_the_twin_trains_length_grouped_on_cpu_by_default(models_dir, tmp_path):
    config = load_config(REPO_ROOT / "configs" / "finetune" / "demo-python.yaml")
    assert config.train.train_sampling_strategy == "auto"
    cpu = LoadPlan(device="cpu", quantization="none", dtype="float32")
    args = training_arguments(config, plan=cpu, output_dir=tmp_path, has_eval=False)
    assert args.train_sampling_strategy == "group_by_length"
    assert args.ddp_find_unused_parameters is False  # LoRA: every trainable weight is used each step
    chosen = load_config(
        REPO_ROOT / "configs" / "finetune" / "demo-python.yaml", {"train_sampling_strategy": "random"}
    )
    assert (
        training_arguments(chosen, plan=cpu, output_dir=tmp_path, has_eval=False).train_sampling_strategy
        == "random"
    )
