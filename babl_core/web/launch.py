"""`babl serve`: start the Chainlit app (the one `make run` starts) from any folder.

Chainlit serves the app file it is given and reads `chainlit.md`, `.chainlit/` and `public/` from its
app root (`CHAINLIT_APP_ROOT`, else the current folder), where it also writes (`.files/`,
translations, a default config when one is missing). In a checkout the app root is the repo root, as
with `make run`. Installed, the app files ship read-only inside site-packages, so they are copied to
`<BABL_HOME>/app/` and Chainlit runs there: nothing is written next to the code or in the folder the
command was started from.
"""

from __future__ import annotations

import filecmp
import os
import shutil
from pathlib import Path

from babl_core import settings

# What Chainlit needs beside the app file, as laid out in the checkout (DESIGN.md "Folder layout").
APP_FILES = ("app.py", "chainlit.md", ".chainlit/config.toml", ".chainlit/translations", "public")


def app_root() -> Path:
    """The folder Chainlit runs in: the repo root in a checkout, `<home>/app` when installed."""
    return settings.home() / "app" if settings.installed() else settings.REPO_ROOT


def prepare_app_root() -> Path:
    """The app root with the shipped app files in it (copied when installed; refreshed when a new
    version ships different ones, so an upgrade takes effect). Returns the app root."""
    root = app_root()
    source = settings.shipped_root()
    if root == source:
        return root
    for name in APP_FILES:
        src = source / name
        if src.is_dir():
            for file in sorted(p for p in src.rglob("*") if p.is_file()):
                _copy_if_changed(file, root / name / file.relative_to(src))
        elif src.is_file():
            _copy_if_changed(src, root / name)
    return root


def _copy_if_changed(src: Path, dst: Path) -> None:
    if dst.is_file() and filecmp.cmp(src, dst, shallow=False):
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def serve(*, host: str, port: int, tunnel: bool = False, headless: bool = False) -> int:
    """Run `chainlit run app.py --host H --port P` in this process, in the app root.

    Returns Chainlit's exit status (Chainlit usually ends the process itself on shutdown).
    """
    root = prepare_app_root()
    # Chainlit reads its app root when it is first imported, so set it before the import below.
    os.environ["CHAINLIT_APP_ROOT"] = str(root)
    if tunnel:
        os.environ["BABL_TUNNEL"] = "1"
    from chainlit.cli import cli

    args = ["run", str(root / "app.py"), "--host", host, "--port", str(port)]
    if headless:
        args.append("--headless")
    try:
        cli.main(args=args, prog_name="babl serve", standalone_mode=False)
    except KeyboardInterrupt:
        pass
    return 0
