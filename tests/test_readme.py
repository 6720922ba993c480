"""README commands work as typed in a checkout: each names the virtualenv's program it needs."""

from __future__ import annotations

import re

from tests.conftest import REPO_ROOT

# Programs that live in .venv/bin after `make run` / `make test`, not on a fresh machine's PATH.
VENV_PROGRAMS = ("python", "python3", "pip", "accelerate", "chainlit", "pytest", "ruff", "transformers")


def shell_commands(markdown: str) -> list[str]:
    """The first line of every command in the ```bash blocks (continuations and comments left out)."""
    commands, continued = [], False
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.S):
        for line in block.splitlines():
            stripped = line.strip()
            if stripped and not stripped.startswith("#") and not continued:
                commands.append(stripped)
            continued = (
                stripped.endswith("\\") or stripped.count("'") % 2 == 1 or stripped.count('"') % 2 == 1
            )
    return commands


def test_every_readme_command_has_the_prefix_it_needs():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    commands = shell_commands(readme)
    assert len(commands) >= 20
    bare = [
        command for command in commands
        if re.sub(r"^(?:\w+=\S+\s+)*", "", command).split()[0] in VENV_PROGRAMS
    ]  # fmt: skip
    assert not bare, bare
    # Inline `...` spans that show a command too.
    inline = re.findall(r"`((?:python3?|pip|accelerate|chainlit|pytest) [^`]*)`", readme)
    assert not inline, inline
    assert any(command.startswith(".venv/bin/python -m finetune.launch") for command in commands)
