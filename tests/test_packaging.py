"""`pip install .` gives a working Babl: the wheel carries what the app and the recipes load, and an
installed `babl` serves, chats and trains from an empty folder with nothing written next to the code.

The wheel is built offline from a copy of the checkout (`pip wheel --no-build-isolation --no-index`),
so the build's `build/` and `*.egg-info` never land in the checkout. The end-to-end test installs it
into a fresh virtualenv that reuses this venv's packages (a `.pth` line: a venv made from a venv gets
the base Python's site-packages, not this one's) with `--no-deps`, so nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
import yaml

from babl_core import __version__
from babl_core.engine.catalog import Catalog
from babl_core.web.launch import APP_FILES
from tests.conftest import REPO_ROOT
from tests.servers import free_port

BUNDLE = "babl_core/_bundle"
# Generated or local state that a checkout may hold at its top and a build must never see.
NOT_SOURCES = {".venv", ".git", "models", "data", ".files", "build", "dist", ".pytest_cache", ".ruff_cache",
               "test-output"}  # fmt: skip

# Nothing downloaded: this venv's setuptools builds, the test venv's packages are reused.
OFFLINE_PIP = ("--no-deps", "--no-index", "--disable-pip-version-check")


def _not_sources(folder: str, names: list[str]) -> set[str]:
    skipped = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
    return skipped | (NOT_SOURCES & set(names) if Path(folder) == REPO_ROOT else set())


def copy_checkout(target: Path) -> Path:
    shutil.copytree(REPO_ROOT, target, ignore=_not_sources, symlinks=True)
    return target


def build_wheel(source: Path, out: Path) -> Path:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "-w", str(out), "-q", *OFFLINE_PIP,
         "--no-build-isolation"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = out.glob("babl-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    return build_wheel(copy_checkout(root / "src"), root / "dist")


def wheel_names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return {name for name in archive.namelist() if not name.endswith("/")}


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def expected_files() -> set[str]:
    """What an installed Babl reads, named from the checkout: its modules, the files `babl serve`
    gives Chainlit, the catalog and every recipe with the local data set it trains on."""
    expected = set()
    for package in ("babl_core", "finetune"):
        expected |= {p.relative_to(REPO_ROOT).as_posix() for p in files_under(REPO_ROOT / package)}
    for name in APP_FILES:
        source = REPO_ROOT / name
        assert source.exists(), f"{name} is missing from the checkout"
        for file in [source] if source.is_file() else files_under(source):
            expected.add(f"{BUNDLE}/{file.relative_to(REPO_ROOT).as_posix()}")
    for config in files_under(REPO_ROOT / "configs"):
        expected.add(f"{BUNDLE}/{config.relative_to(REPO_ROOT).as_posix()}")
    return expected


@pytest.mark.slow
def test_the_wheel_ships_what_the_app_and_the_recipes_load(wheel):
    names = wheel_names(wheel)
    shipped = {n for n in names if ".dist-info/" not in n}
    missing = expected_files() - shipped
    assert not missing, f"the wheel lacks {sorted(missing)}"
    assert not shipped - expected_files(), "the wheel ships files the checkout does not have there"
    assert not any(n.startswith(("tests/", "bench/")) for n in names)

    # The custom elements app.py sends, and the recipes' local data sets, by what they name.
    elements = re.findall(r'CustomElement\(name="(\w+)"', (REPO_ROOT / "app.py").read_text())
    assert elements, "app.py sends no custom element any more: update this test"
    for element in elements:
        assert f"{BUNDLE}/public/elements/{element}.jsx" in shipped
    local_sets = 0
    for recipe in sorted((REPO_ROOT / "configs" / "finetune").glob("*.yaml")):
        assert f"{BUNDLE}/configs/finetune/{recipe.name}" in shipped
        dataset = yaml.safe_load(recipe.read_text())["dataset"]
        if (REPO_ROOT / dataset).is_file():
            local_sets += 1
            assert dataset in shipped, f"{recipe.name} trains on {dataset}, which the wheel lacks"
    assert local_sets >= 5  # the offline twins
    # The catalog's "train one" commands name recipes that ship.
    commands = [s.train_command for s in Catalog.load(REPO_ROOT / "configs" / "models.yaml").entries]
    recipes = re.findall(r"--config (\S+)", " ".join(c for c in commands if c))
    assert recipes, "the catalog names no recipe to train: update this test"
    for recipe in recipes:
        assert f"{BUNDLE}/{recipe}" in shipped

    with zipfile.ZipFile(wheel) as archive:
        info = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "babl = babl_core.__main__:main" in archive.read(info).decode()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert f"Version: {__version__}" in metadata
    assert "Requires-Dist: torch==2.13.0" in metadata  # the runtime requirements, torch pinned


@pytest.mark.slow
def test_a_wheel_built_from_the_sdist_has_the_same_files(wheel, tmp_path):
    source = copy_checkout(tmp_path / "src")
    result = subprocess.run(
        [sys.executable, "-c", "from setuptools import build_meta; print(build_meta.build_sdist('sdist'))"],
        cwd=source, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    sdist = source / "sdist" / result.stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp_path / "unpacked", filter="data")
    (unpacked,) = (tmp_path / "unpacked").iterdir()
    assert wheel_names(build_wheel(unpacked, tmp_path / "dist")) == wheel_names(wheel)


# --------------------------------------------------------------------------------------------------
# End to end: install the wheel, then use `babl` from an empty folder


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}  # fmt: skip


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> dict:
    """A fresh venv with the wheel installed; returns its paths and an environment for `babl`."""
    root = tmp_path_factory.mktemp("installed")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                   check=True, timeout=120)  # fmt: skip
    python = venv / "bin" / "python"
    purelib = Path(subprocess.check_output(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())  # fmt: skip
    (purelib / "_babl_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BABL_", "CHAINLIT_", "NGROK_", "PIP_")) and k != "PYTHONPATH"}  # fmt: skip
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", BABL_HOME=str(root / "home"))
    result = subprocess.run([python, "-m", "pip", "install", "-q", *OFFLINE_PIP, str(wheel)],
                            env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    empty = root / "empty"
    empty.mkdir()
    return {"venv": venv, "purelib": purelib, "env": env, "home": root / "home", "cwd": empty}


def babl(installed: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [str(installed["venv"] / "bin" / "babl"), *args]
    return subprocess.run(command, cwd=installed["cwd"], env=installed["env"], capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


@pytest.mark.slow
@pytest.mark.e2e
def test_installed_babl_demo_generate_train_and_serve_from_an_empty_folder(installed, tmp_path):
    home, purelib, cwd = installed["home"], installed["purelib"], installed["cwd"]
    before = snapshot(purelib)
    where = subprocess.run([installed["venv"] / "bin" / "python", "-c", "import babl_core; print(babl_core.__file__)"],
                           cwd=cwd, env=installed["env"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert Path(where.stdout.strip()).is_relative_to(purelib), "the test must run the installed copy"

    version = babl(installed, "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"babl {__version__}"

    demo = babl(installed, "demo")
    assert demo.returncode == 0, demo.stderr
    assert (home / "models" / "demo" / "demo-python" / "config.json").is_file()

    generate = babl(installed, "generate", "--model", "demo-python", "--max-new-tokens", "8", "--temperature", "0",
                    "hi")  # fmt: skip
    assert generate.returncode == 0, generate.stderr
    assert generate.stdout.strip() and "demo-python" in generate.stderr

    # The documented recipe name, from a folder that has no configs/: the packaged copy is used.
    train = babl(
        installed, "finetune", "train", "--config", "configs/finetune/demo-html.yaml", "--max_steps", "5"
    )
    assert train.returncode == 0, train.stderr[-3000:]
    adapter = home / "models" / "adapters" / "demo-html-qlora"
    assert (adapter / "adapter_config.json").is_file()
    assert json.loads((adapter / "babl.json").read_text())["metrics"]["steps"] == 5

    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [installed["venv"] / "bin" / "babl", "serve", "--headless", "--host", "127.0.0.1", "--port", str(port)],
            cwd=cwd, env=installed["env"], stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, f"babl serve exited:\n{log_path.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"no /health answer:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.5)
        with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as response:
            ids = [m["id"] for m in json.loads(response.read())["data"]]
        assert "demo-python" in ids and "demo-html-qlora" in ids  # the adapter trained above is served
        request = urllib.request.Request(
            f"{url}/v1/chat/completions", headers={"Content-Type": "application/json"},
            data=json.dumps({"model": "demo-python", "messages": [{"role": "user", "content": "hi"}],
                             "max_tokens": 8, "temperature": 0}).encode(),
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
        assert answer["choices"][0]["message"]["content"]
        assert answer["usage"]["completion_tokens"] > 0
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()

    # Everything Babl wrote is under BABL_HOME; the folder it ran in and the installed code are untouched.
    assert list(cwd.iterdir()) == []
    assert snapshot(purelib) == before
    assert (home / "app" / "app.py").is_file() and (home / "app" / ".chainlit" / "config.toml").is_file()
    assert (home / "data" / "babl.db").is_file()
