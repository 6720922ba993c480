"""The wheel ships the checkout's top-level app files inside the package.

Everything else is in pyproject.toml. The Chainlit app (`app.py`, `chainlit.md`, `.chainlit/`,
`public/`) and the configs (`configs/`) stay at the top of the checkout, where `chainlit run app.py`,
`make run` and the documented commands use them; the build copies them into `babl_core/_bundle/`, so
an installed Babl finds them (`babl_core.settings.shipped_root`). Copying at build time, rather than
moving the app into the package behind a shim, keeps one real `app.py` where DESIGN.md puts it.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# Top-level files and folders the installed app and recipes read (sdist: MANIFEST.in lists the same).
BUNDLED = ("app.py", "chainlit.md", ".chainlit", "public", "configs")


class build_py_with_bundle(build_py):
    """build_py, plus a copy of BUNDLED under babl_core/_bundle/ in the build."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install runs from the checkout, which has these files in place
        bundle = Path(self.build_lib) / "babl_core" / "_bundle"
        for name in BUNDLED:
            source = ROOT / name
            files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
            for file in files:
                if "__pycache__" in file.parts:
                    continue
                target = bundle / file.relative_to(ROOT)
                self.mkpath(str(target.parent))
                self.copy_file(str(file), str(target), preserve_mode=False)


setup(cmdclass={"build_py": build_py_with_bundle})
