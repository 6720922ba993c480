"""`python -m finetune merge`: a checked export that serves as a plain catalog entry, the refusal to merge
into a quantized base, and a merge that went wrong is caught and leaves nothing behind."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest
import yaml

from finetune.__main__ import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main
from finetune.merge import CATALOG_SNIPPET_FILE, MERGED_META_FILE, MergeError, plan_merge
from tests.conftest import make_lora_adapter

RUN = "merge-me"


@pytest.fixture
def adapter(models_dir):
    """A LoRA adapter with random (non-zero) B matrices on demo-html, installed as models/adapters/merge-me."""
    return make_lora_adapter(
        models_dir / "demo" / "demo-html", models_dir / "adapters" / RUN, seed=7,
        base_ref="models/demo/demo-html", label="merge test adapter",
    )  # fmt: skip


async def collect(reply) -> str:
    return "".join([chunk async for chunk in reply])


def greedy(service, model_id: str, text: str) -> str:
    reply = service.complete(model_id, [{"role": "user", "content": text}], max_new_tokens=24, temperature=0)
    return asyncio.run(collect(reply))


def test_merged_model_is_checked_and_serves_as_a_plain_catalog_entry(
    adapter, models_dir, tmp_path, capsys, monkeypatch
):
    from safetensors import safe_open

    from babl_core.engine.availability import availability
    from babl_core.engine.catalog import Catalog
    from babl_core.engine.service import ChatService

    assert main(["merge", "--adapter", f"models/adapters/{RUN}"]) == EXIT_OK
    out = capsys.readouterr().out
    merged = models_dir / "merged" / RUN
    assert f"merged {RUN} into models/demo/demo-html (float32): max |logit difference|" in out
    assert f"-> models/merged/{RUN}" in out

    # A plain model directory: safetensors weights with no LoRA left in them, config, tokenizer.
    assert {"model.safetensors", "config.json", "tokenizer.json", MERGED_META_FILE} <= {
        p.name for p in merged.iterdir()
    }
    with safe_open(merged / "model.safetensors", "pt") as weights:
        keys = list(weights.keys())
    assert keys and not any("lora" in key for key in keys)
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    assert not (models_dir / "merged" / ".partial").exists()
    check = json.loads((merged / MERGED_META_FILE).read_text())["check"]
    assert check["passed"] and check["tolerance"] == 0.01  # the float32 default
    assert 0 <= check["max_abs_diff"] <= 1e-4  # float32 rounding only (measured: 4e-7)
    assert check["top1_agreement"] == 1.0 and check["examples"] == 3 and check["positions"] > 30

    # The printed entry, pasted into a catalog next to base + adapter, serves the same greedy text.
    snippet = (merged / CATALOG_SNIPPET_FILE).read_text()
    assert snippet.split("\n", 1)[1] in out
    (entry,) = yaml.safe_load(snippet)
    assert entry["base"] == f"models/merged/{RUN}" and entry["prompt_style"] == "codellama-inst"
    catalog = tmp_path / "models.yaml"
    catalog.write_text(
        yaml.safe_dump(
            {
                "models": [
                    entry,
                    {"id": "with-adapter", "task": "html", "base": "models/demo/demo-html",
                     "adapter": f"models/adapters/{RUN}", "quantization": "none", "dtype": "float32",
                     "prompt_style": "codellama-inst"},
                    {"id": "base-only", "task": "html", "base": "models/demo/demo-html",
                     "quantization": "none", "dtype": "float32", "prompt_style": "codellama-inst"},
                ]
            }
        )
    )  # fmt: skip
    monkeypatch.setenv("BABL_MODELS", str(catalog))
    spec = Catalog.load().get(entry["id"])
    assert spec.adapter is None and availability(spec).word == "local"
    service = ChatService()
    for question in ("A page for a bakery", "A contact form"):
        merged_text = greedy(service, entry["id"], question)
        assert merged_text == greedy(service, "with-adapter", question)
        assert merged_text != greedy(service, "base-only", question)  # the adapter is in the weights


def test_merge_by_training_config_to_a_chosen_directory(models_dir, tmp_path, capsys):
    make_lora_adapter(
        models_dir / "demo" / "demo-python", models_dir / "adapters" / "demo-python-lora", seed=3,
        task="python", prompt_style="alpaca-code", base_ref="models/demo/demo-python",
    )  # fmt: skip
    out_dir = tmp_path / "export"
    code = main(["merge", "--config", "configs/finetune/demo-python.yaml", "--out", str(out_dir)])
    assert code == EXIT_OK, capsys.readouterr().err
    assert (out_dir / "model.safetensors").is_file()
    meta = json.loads((out_dir / MERGED_META_FILE).read_text())
    assert meta["adapter"] == "models/adapters/demo-python-lora" and meta["prompt_style"] == "alpaca-code"
    # An existing output is not replaced silently.
    assert (
        main(["merge", "--config", "configs/finetune/demo-python.yaml", "--out", str(out_dir)]) == EXIT_USAGE
    )
    assert "already exists; pass --overwrite" in capsys.readouterr().err


def test_merging_into_a_quantized_base_is_refused_with_the_fix(
    adapter, models_dir, tmp_path, capsys, monkeypatch
):
    import babl_core.engine.loading

    def no_loading(*args, **kwargs):
        raise AssertionError("a refused merge must not load weights")

    monkeypatch.setattr(babl_core.engine.loading, "load_base", no_loading)

    # Asked for on the command line.
    assert main(["merge", "--adapter", RUN, "--quantization", "nf4"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "refusing to merge into a nf4 base" in err
    assert (
        "Drop --quantization" in err and "set `quantization: nf4` on the merged model's catalog entry" in err
    )

    # A base checkpoint that was saved already quantized (bitsandbytes writes quantization_config).
    quantized = tmp_path / "codellama-4bit"
    shutil.copytree(models_dir / "demo" / "demo-html", quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    assert main(["merge", "--adapter", RUN, "--base", str(quantized)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "is a checkpoint saved 4-bit quantized (bitsandbytes)" in err
    assert "Point --base at the unquantized original" in err
    assert not (models_dir / "merged").exists()


def test_a_merge_that_does_not_reproduce_the_adapter_fails_and_keeps_nothing(
    adapter, models_dir, capsys, monkeypatch
):
    import torch
    from peft.tuners.lora import LoraModel

    real_merge = LoraModel.merge_and_unload

    def lossy_merge(self, *args, **kwargs):
        # A merge that went wrong: one projection's merged weight off by 10% (logits move by ~0.07).
        model = real_merge(self, *args, **kwargs)
        with torch.no_grad():
            layer = model.model.layers[0].self_attn.q_proj
            layer.weight.mul_(0.9)
        return model

    monkeypatch.setattr(LoraModel, "merge_and_unload", lossy_merge)
    assert main(["merge", "--adapter", RUN]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "merge check failed: merged model's logits differ from base + adapter by up to" in err
    assert "above the tolerance 0.01" in err and "nothing was kept" in err
    assert not (models_dir / "merged" / RUN).exists()
    assert not (models_dir / "merged" / ".partial").exists()


def test_plan_names_the_fix_for_a_missing_or_full_model_directory(models_dir):
    with pytest.raises(
        MergeError,
        match=r"no trained model there \(looked for adapter_config.json in .*nothing-here\); nothing is trained here yet",
    ):
        plan_merge("models/adapters/nothing-here")
    with pytest.raises(MergeError, match="is a full model, not an adapter: there is nothing to merge"):
        plan_merge("models/demo/demo-html")
