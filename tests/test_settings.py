"""Where Babl reads and writes: the checkout's paths unchanged, and an installed Babl (simulated by a
bundle folder, as the wheel build writes one) keeping its state under BABL_HOME."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from babl_core import settings
from babl_core.engine.availability import availability
from babl_core.engine.catalog import Catalog
from babl_core.web import launch
from tests.conftest import REPO_ROOT


@pytest.fixture
def checkout(monkeypatch):
    """The defaults of a checkout: no BABL_HOME, BABL_DATA_DIR or BABL_MODELS_DIR."""
    for name in ("BABL_HOME", "BABL_DATA_DIR", "BABL_MODELS_DIR", "BABL_MODELS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def installed(checkout, tmp_path, monkeypatch) -> Path:
    """Babl as installed from the wheel: a bundle with the app files and configs (copied from the
    checkout, as setup.py does), and REPO_ROOT standing for site-packages. Returns the bundle."""
    bundle = tmp_path / "site-packages" / "babl_core" / "_bundle"
    for name in (*launch.APP_FILES, "configs"):
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, bundle / name)
        else:
            (bundle / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, bundle / name)
    monkeypatch.setattr(settings, "BUNDLE_DIR", bundle)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    return bundle


def test_a_checkout_keeps_its_paths(checkout):
    assert not settings.installed()
    assert settings.home() == REPO_ROOT
    assert settings.models_dir() == REPO_ROOT / "models"
    assert settings.data_dir() == REPO_ROOT / "data"
    assert settings.catalog_path() == REPO_ROOT / "configs" / "models.yaml"
    assert (
        settings.resolve_path("finetune/samples/html.jsonl")
        == REPO_ROOT / "finetune" / "samples" / "html.jsonl"
    )
    assert settings.portable_path(REPO_ROOT / "models" / "demo" / "demo-html") == "models/demo/demo-html"
    assert launch.app_root() == launch.prepare_app_root() == REPO_ROOT


def test_installed_state_goes_to_the_user_data_dir_and_never_next_to_the_code(installed):
    from platformdirs import user_data_path

    assert settings.installed()
    home = settings.home()
    assert home == user_data_path("babl", appauthor=False)
    if sys.platform.startswith("linux"):
        assert home == Path(installed.parents[2] / "xdg" / "babl")
    assert settings.models_dir() == home / "models" and settings.data_dir() == home / "data"
    assert not home.is_relative_to(settings.REPO_ROOT)
    assert settings.catalog_path() == installed / "configs" / "models.yaml"


def test_babl_home_holds_data_models_and_relative_settings(installed, tmp_path, monkeypatch):
    monkeypatch.setenv("BABL_HOME", str(tmp_path / "home"))
    home = tmp_path / "home"
    assert settings.home() == home
    assert settings.models_dir() == home / "models" and settings.data_dir() == home / "data"
    monkeypatch.setenv("BABL_MODELS_DIR", "weights")
    assert settings.models_dir() == home / "weights"
    # Paths named in shipped configs: the models dir, the packaged recipes, the sample sets (which
    # ship inside the finetune package, i.e. in site-packages); a new file goes to the home.
    assert settings.resolve_path("models/demo/demo-html") == home / "weights" / "demo" / "demo-html"
    assert (
        settings.resolve_path("configs/finetune/demo-html.yaml")
        == installed / "configs/finetune/demo-html.yaml"
    )
    assert (
        settings.resolve_path("finetune/samples/html.jsonl")
        == settings.REPO_ROOT / "finetune/samples/html.jsonl"
    )
    assert settings.resolve_path("data/users.toml") == home / "data" / "users.toml"
    for shown in ("models/demo/demo-html", "configs/finetune/demo-html.yaml", "finetune/samples/html.jsonl"):
        assert settings.portable_path(settings.resolve_path(shown)) == shown


def test_a_babl_home_in_a_checkout_moves_only_the_state(checkout, tmp_path, monkeypatch):
    monkeypatch.setenv("BABL_HOME", str(tmp_path))
    assert settings.data_dir() == tmp_path / "data" and settings.models_dir() == tmp_path / "models"
    assert settings.catalog_path() == REPO_ROOT / "configs" / "models.yaml"
    assert (
        settings.resolve_path("finetune/samples/html.jsonl")
        == REPO_ROOT / "finetune" / "samples" / "html.jsonl"
    )


def test_a_documented_recipe_name_works_from_any_folder(checkout, tmp_path, monkeypatch):
    from finetune.config import load_config

    monkeypatch.chdir(tmp_path)
    name = "configs/finetune/demo-python.yaml"
    assert settings.shipped_file(name) == REPO_ROOT / name
    assert load_config(name, check_environment=False).run.run_name
    mine = tmp_path / name
    mine.parent.mkdir(parents=True)
    mine.write_text((REPO_ROOT / name).read_text().replace("run_name: ", "run_name: mine-", 1))
    assert settings.shipped_file(name) == Path(name)  # a file of that name here wins
    assert load_config(name, check_environment=False).run.run_name.startswith("mine-")


def test_relative_paths_in_a_users_catalog_resolve_against_its_folder(tmp_path, monkeypatch, models_dir):
    folder = tmp_path / "my-catalog"
    for name in ("local-model", "nested/other-model"):
        (folder / name).mkdir(parents=True)
        (folder / name / "config.json").write_text("{}")
    entries = [
        {"id": "dotted", "task": "chat", "base": "./local-model"},
        {"id": "bare", "task": "chat", "base": "local-model"},
        {"id": "nested", "task": "chat", "base": "nested/other-model"},
        {"id": "hub", "task": "chat", "base": "org/name"},
        {"id": "demo", "task": "python", "base": "models/demo/demo-python"},
    ]
    (folder / "models.yaml").write_text(yaml.safe_dump({"models": entries}))
    monkeypatch.setenv("BABL_MODELS", str(folder / "models.yaml"))
    monkeypatch.chdir(tmp_path)  # neither the current folder nor the repo root has these models
    catalog = Catalog.load()
    for entry_id, expected in (
        ("dotted", "local-model"),
        ("bare", "local-model"),
        ("nested", "nested/other-model"),
    ):
        spec = catalog.get(entry_id)
        assert spec.base == str(folder / expected)
        assert availability(spec).word == "local"
    assert catalog.get("hub").base == "org/name"  # a hub id stays a hub id
    demo = catalog.get("demo")
    assert (
        demo.base == "models/demo/demo-python"
    )  # models/ is Babl's models directory, wherever the catalog is
    assert availability(demo).word == "local" and settings.resolve_path(demo.base).parent.parent == models_dir


def test_serve_copies_the_app_files_to_the_home_and_refreshes_them(installed, tmp_path, monkeypatch):
    monkeypatch.setenv("BABL_HOME", str(tmp_path / "home"))
    before = {p: p.read_bytes() for p in installed.rglob("*") if p.is_file()}
    root = launch.prepare_app_root()
    assert root == tmp_path / "home" / "app"
    for name in ("app.py", "chainlit.md", ".chainlit/config.toml", "public/elements/HtmlPreview.jsx"):
        assert (root / name).read_bytes() == (installed / name).read_bytes()
    assert {
        p: p.read_bytes() for p in installed.rglob("*") if p.is_file()
    } == before  # the bundle is read only

    (installed / "chainlit.md").write_text("# a new version's welcome page\n")
    launch.prepare_app_root()
    assert (root / "chainlit.md").read_text() == "# a new version's welcome page\n"


@pytest.mark.slow  # importing chainlit: ~8 s
def test_babl_serve_runs_chainlit_in_the_app_root(checkout, monkeypatch):
    import chainlit.cli

    seen = {}

    def fake_main(args, prog_name, standalone_mode):
        seen.update(args=args, root=os.environ["CHAINLIT_APP_ROOT"])
        seen["tunnel"] = os.environ.get("BABL_TUNNEL")

    monkeypatch.setattr(chainlit.cli.cli, "main", fake_main)
    monkeypatch.delenv("CHAINLIT_APP_ROOT", raising=False)
    monkeypatch.delenv("BABL_TUNNEL", raising=False)
    from babl_core.__main__ import main

    assert main(["serve", "--host", "0.0.0.0", "--port", "8123", "--tunnel", "--headless"]) == 0
    assert seen == {
        "args": ["run", str(REPO_ROOT / "app.py"), "--host", "0.0.0.0", "--port", "8123", "--headless"],
        "root": str(REPO_ROOT),
        "tunnel": "1",
    }


def test_babl_finetune_hands_its_arguments_to_the_finetune_cli(monkeypatch):
    import finetune.__main__

    calls = []
    monkeypatch.setattr(finetune.__main__, "main", lambda argv: calls.append(argv) or 7)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    from babl_core.__main__ import main

    assert main(["finetune", "train", "--config", "x.yaml", "--max_steps", "5", "--help"]) == 7
    assert calls == [["train", "--config", "x.yaml", "--max_steps", "5", "--help"]]
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"


def test_babl_version(capsys):
    from babl_core import __version__
    from babl_core.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"babl {__version__}"


def test_messages_name_the_way_this_babl_starts(installed, capsys):
    from babl_core.__main__ import main

    assert main(["status", "--url", "http://127.0.0.1:9"]) == 1
    assert "start one with `babl serve`" in capsys.readouterr().err


def test_installed_adduser_writes_under_the_home_and_babl_auth_finds_it_from_any_folder(
    installed, tmp_path, monkeypatch
):
    from babl_core.web import auth

    monkeypatch.setenv("BABL_HOME", str(tmp_path / "home"))
    assert auth.default_users_path() == tmp_path / "home" / "data" / "users.toml"
    auth.add_user("alice", "a long enough secret", auth.default_users_path())
    assert settings.portable_path(auth.default_users_path()) == "data/users.toml"  # what adduser prints
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("BABL_AUTH", "@data/users.toml")
    assert auth.load_users().verify("alice", "a long enough secret")
