"""`finetune.files`: the `--adapter` lookup every command shares, and writes no reader sees half of."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune import files
from finetune.files import (
    RunNotFound,
    find_adapter_dir,
    find_run_dir,
    replacing,
    staged_dir,
    write_json_atomic,
    write_text_atomic,
)
from tests.conftest import REPO_ROOT


@pytest.fixture
def models(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "models"
    (root / "adapters").mkdir(parents=True)
    monkeypatch.setenv("BABL_MODELS_DIR", str(root))
    return root


def run(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True)
    for name in names:
        (folder / name).write_text("{}")
    return folder


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------------------------------
# The lookup


def test_a_run_name_finds_its_adapter_or_full_fine_tune_and_a_folder_finds_itself(models, tmp_path):
    adapter = run(models / "adapters" / "qa-run", "babl.json", "adapter_config.json")
    full = run(models / "finetuned" / "t5-full", "babl.json", "config.json")
    elsewhere = run(tmp_path / "copied" / "qa-run", "babl.json")
    assert find_run_dir("qa-run") == adapter
    assert find_run_dir("t5-full") == full
    assert find_run_dir("models/adapters/qa-run") == adapter
    assert find_run_dir(str(elsewhere)) == elsewhere
    assert find_adapter_dir("qa-run") == adapter


def test_not_found_names_where_it_looked_and_the_runs_that_exist(models):
    run(models / "adapters" / "html-run", "babl.json", "adapter_config.json")
    run(models / "adapters" / "qa-run", "babl.json", "adapter_config.json")
    run(models / "adapters" / "half-copied")  # no babl.json: not a run
    run(models / "adapters" / ".partial" / "being-trained", "babl.json")  # not finished: not listed
    run(models / "finetuned" / "t5-full", "babl.json", "config.json")
    with pytest.raises(RunNotFound) as caught:
        find_run_dir("qa-rnu")
    message = str(caught.value)
    assert message.startswith("--adapter qa-rnu: no trained model there (looked for babl.json in ")
    assert "models/adapters/qa-rnu, models/finetuned/qa-rnu)" in message
    assert "trained runs here: html-run, qa-run, t5-full; name one of them" in message
    assert "half-copied" not in message and "being-trained" not in message
    # For a merge only adapters count: a full fine-tune has no LoRA in it.
    with pytest.raises(
        RunNotFound, match=r"adapter_config.json in .*; trained runs here: html-run, qa-run; "
    ):
        find_adapter_dir("qa-rnu")


def test_not_found_with_nothing_trained_says_how_to_train(models):
    with pytest.raises(RunNotFound) as caught:
        find_run_dir("anything")
    assert "nothing is trained here yet (models/adapters/ holds no run); train it first: " in str(
        caught.value
    )
    assert "python -m finetune train --config <recipe>.yaml" in str(caught.value)


def test_a_long_list_of_runs_is_cut_short(models, monkeypatch):
    monkeypatch.setattr(files, "LISTED_RUNS", 2)
    for name in ("a-run", "b-run", "c-run", "d-run"):
        run(models / "adapters" / name, "babl.json")
    with pytest.raises(RunNotFound, match="trained runs here: a-run, b-run and 2 more;"):
        find_run_dir("x")


def test_a_full_model_is_not_an_adapter(models):
    run(models / "finetuned" / "t5-full", "babl.json", "config.json")
    with pytest.raises(RunNotFound, match="models/finetuned/t5-full is a full model, not an adapter"):
        find_adapter_dir("t5-full")


def test_the_commands_say_the_same_when_nothing_is_there(models, capsys):
    from finetune.__main__ import main
    from finetune.export import ExportError, export_gguf_lora
    from finetune.merge import MergeError, plan_merge

    run(models / "adapters" / "qa-run", "babl.json", "adapter_config.json")
    expected = "--adapter nope: no trained model there (looked for adapter_config.json in "
    with pytest.raises(MergeError, match="trained runs here: qa-run") as merge_error:
        plan_merge("nope")
    with pytest.raises(ExportError) as export_error:
        export_gguf_lora("nope")
    assert str(merge_error.value).startswith(expected) and str(export_error.value) == str(merge_error.value)
    assert main(["eval", "--adapter", "nope"]) == 2
    assert "--adapter nope: no trained model there (looked for babl.json in " in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Files


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text("old\n")
    with pytest.raises(RuntimeError, match="disk full"), replacing(path) as partial:
        partial.write_text("half of the ne")
        raise RuntimeError("disk full")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]


def test_a_killed_writer_leaves_the_old_file_whole(tmp_path):
    """A process killed mid-write (no exception handler runs) still never leaves half a file in place."""
    path = tmp_path / "babl.json"
    path.write_text('{"metrics": {}}\n')
    child = (
        "import os, sys\nfrom pathlib import Path\nfrom finetune.files import replacing\n"
        "with replacing(Path(sys.argv[1])) as partial:\n"
        '    partial.write_text(\'{"metrics": {"loss"\')\n'
        "    os._exit(9)\n"
    )
    done = subprocess.run([sys.executable, "-c", child, str(path)], cwd=REPO_ROOT, timeout=60)
    assert done.returncode == 9
    assert json.loads(path.read_text()) == {"metrics": {}}


def test_a_replaced_file_keeps_its_mode_and_a_new_one_is_readable_by_others(tmp_path):
    kept = tmp_path / "kept.txt"
    kept.write_text("old")
    kept.chmod(0o640)
    write_text_atomic(kept, "new")
    assert kept.read_text() == "new" and kept.stat().st_mode & 0o777 == 0o640
    new = tmp_path / "new.txt"
    write_text_atomic(new, "hello ✓")
    assert new.read_text(encoding="utf-8") == "hello ✓" and new.stat().st_mode & 0o777 == 0o644


def test_json_is_written_whole_with_nan_and_non_ascii(tmp_path):
    path = tmp_path / "eval.json"
    write_json_atomic(path, {"label": "Q&A — café", "loss": float("nan")})
    text = path.read_text(encoding="utf-8")
    assert "café" in text and text.endswith("}\n")
    assert math.isnan(json.loads(text)["loss"])


# --------------------------------------------------------------------------------------------------
# Folders


def test_a_staged_folder_appears_whole_and_the_partial_folder_goes(tmp_path):
    target = tmp_path / "adapters" / "run"
    with staged_dir(target, overwrite=False) as staging:
        assert staging == tmp_path / "adapters" / ".partial" / "run"
        (staging / "babl.json").write_text("{}")
        assert not target.exists()  # nothing there until the folder is complete
    assert (target / "babl.json").is_file()
    assert leftovers(tmp_path / "adapters") == []


def test_a_failure_while_staging_keeps_nothing(tmp_path):
    target = tmp_path / "adapters" / "run"
    with pytest.raises(RuntimeError, match="out of memory"), staged_dir(target, overwrite=False) as staging:
        (staging / "adapter_model.safetensors").write_text("half")
        raise RuntimeError("out of memory")
    assert sorted(os.listdir(tmp_path / "adapters")) == []


def test_overwrite_swaps_in_the_new_folder_and_deletes_the_old(tmp_path):
    target = run(tmp_path / "merged" / "run", "old-weights")
    with staged_dir(target, overwrite=True) as staging:
        (staging / "new-weights").write_text("{}")
        assert (target / "old-weights").is_file()  # the old one serves until the new one is complete
    assert sorted(os.listdir(target)) == ["new-weights"]
    assert sorted(os.listdir(tmp_path / "merged")) == ["run"]  # no .partial, no .old- folder


def test_a_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    target = run(tmp_path / "merged" / "run", "old-weights")
    real_rename = Path.rename

    def rename(self, to):
        if self.parent.name == ".partial" and self.name == "run":  # the new folder's move into place
            raise OSError("device busy")
        return real_rename(self, to)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="device busy"), staged_dir(target, overwrite=True) as staging:
        (staging / "new-weights").write_text("{}")
    assert sorted(os.listdir(target)) == ["old-weights"]
    assert sorted(os.listdir(tmp_path / "merged")) == ["run"]


def test_a_folder_that_appeared_meanwhile_is_refused_and_kept(tmp_path):
    target = tmp_path / "adapters" / "run"
    other = tmp_path / "adapters" / ".partial" / "other-run"
    other.mkdir(parents=True)  # another run assembling beside this one
    refusal = FileExistsError("models/adapters/run appeared while training; pass --overwrite true")
    appeared = pytest.raises(FileExistsError, match="appeared while training")
    with appeared, staged_dir(target, overwrite=False, refusal=refusal) as staging:
        (staging / "babl.json").write_text('{"id": "mine"}')
        run(target, "babl.json")  # someone else's
    assert (target / "babl.json").read_text() == "{}"
    assert sorted(os.listdir(tmp_path / "adapters" / ".partial")) == ["other-run"]  # theirs stays


def test_a_killed_attempts_leftovers_are_cleared_before_staging(tmp_path):
    target = tmp_path / "adapters" / "run"
    run(files.staging_path(target), "stale-weights")
    run(tmp_path / "adapters" / ".partial" / "run.old-1764655000000000000", "swapped-out-weights")
    run(tmp_path / "adapters" / ".partial" / "run-2.old-1764655000000000000", "another-runs")
    with staged_dir(target, overwrite=False) as staging:
        assert os.listdir(staging) == []
        (staging / "babl.json").write_text("{}")
    assert sorted(os.listdir(target)) == ["babl.json"]
    assert os.listdir(tmp_path / "adapters" / ".partial") == ["run-2.old-1764655000000000000"]
