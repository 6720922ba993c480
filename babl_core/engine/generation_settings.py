"""The one definition of every generation setting: name, type, bounds, default and help.

Everything that takes a generation setting derives its checks from `SETTINGS`: the catalog's
`generation:` block (`catalog._parse_generation`), `GenerationParams.problems` (the engine, and so the
chat, the CLI and `finetune eval`), the API's request schema (`web.api.protocol.SamplingRequest`: field bounds and
descriptions), the chat's settings widgets (`web.ui.settings_widgets` / `read_settings`) and the CLI's
options (`python -m babl_core generate --help`). A bound changed here changes in all of them, so a
value one entry point accepts is never refused by another (temperature 100 used to pass the API and
the catalog while the chat capped it at 2).

This module imports nothing from Babl: every other module may import it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# Largest seed: what a signed 64-bit integer holds (OpenAI's `seed`). Choice i samples with seed + i,
# which stays within what `torch.Generator.manual_seed` takes.
SEED_LIMIT = 2**63 - 1


@dataclass(frozen=True)
class Setting:
    """One generation setting.

    Attributes:
        name: the engine's name (a `GenerationParams` field, the catalog key, the chat widget id).
        label: the name users read (chat widgets, error messages).
        kind: "int", "float" or "stops" (a list of strings).
        default: the value when neither the catalog entry nor the request sets one.
        help: one sentence for users: what it does (shown by the widget, the API schema, the CLI).
        minimum, maximum: inclusive bounds (None: unbounded on that side).
        above_minimum: True when the minimum itself is not allowed (top_p > 0).
        max_items, max_chars: for "stops": how many strings, how long each.
        api_name: the OpenAI field when it differs (`max_tokens`).
        in_catalog: an entry's `generation:` block may set it.
        widget: the chat's widget kind ("slider", "number"), None when the chat does not show it.
        step: the slider's step.
        bounds_words: the bounds in words when the numbers would not help (the seed's 64 bits).
    """

    name: str
    label: str
    kind: str
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    above_minimum: bool = False
    max_items: int | None = None
    max_chars: int | None = None
    api_name: str | None = None
    in_catalog: bool = True
    widget: str | None = None
    step: float | None = None
    bounds_words: str | None = None

    @property
    def api_field(self) -> str:
        return self.api_name or self.name

    @property
    def cli_option(self) -> str:
        return "--" + self.name.replace("_", "-")

    def bounds_text(self) -> str:
        """What a valid value is, in words: 'a number from 0 to 2', 'a whole number from 1 to 4096'."""
        if self.bounds_words:
            return self.bounds_words
        if self.kind == "stops":
            return (
                f"a list of at most {self.max_items} non-empty strings of at most {self.max_chars} characters"
            )
        noun = "a whole number" if self.kind == "int" else "a number"
        low, high = _shown(self.minimum), _shown(self.maximum)
        if self.minimum is not None and self.maximum is not None:
            if self.above_minimum:
                return f"{noun} above {low} and at most {high}"
            return f"{noun} from {low} to {high}"
        if self.minimum is not None:
            return f"{noun} above {low}" if self.above_minimum else f"{noun} ≥ {low}"
        return noun

    def problem(self, value: Any) -> str | None:
        """Why `value` is not valid for this setting (None when it is). `value` is a Python value as a
        parsed file or request holds it: bools are not numbers, whole floats are not ints."""
        if self.kind == "stops":
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, list | tuple) or not all(isinstance(s, str) and s for s in items):
                return f"must be {self.bounds_text()}"
            if self.max_items is not None and len(items) > self.max_items:
                return f"at most {self.max_items} stop sequences, got {len(items)}"
            if self.max_chars is not None and any(len(s) > self.max_chars for s in items):
                return f"each stop sequence may have at most {self.max_chars} characters"
            if any(not _encodable(s) for s in items):
                return "stop sequences must be valid Unicode text (a lone surrogate such as \\ud800 is not)"
            return None
        ok_type = int if self.kind == "int" else int | float
        if isinstance(value, bool) or not isinstance(value, ok_type) or not math.isfinite(value):
            return f"must be {self.bounds_text()}, got {value!r}"
        if self.minimum is not None and (
            value < self.minimum or (self.above_minimum and value == self.minimum)
        ):
            return f"must be {self.bounds_text()}, got {value!r}"
        if self.maximum is not None and value > self.maximum:
            return f"must be {self.bounds_text()}, got {value!r}"
        return None

    def parse(self, text: Any) -> tuple[Any, str | None]:
        """A value typed by a user (a chat widget's string or number, a CLI argument): (value, None)
        when valid, else (None, the problem). Numbers given as text are converted first."""
        value = text
        if isinstance(text, str) and self.kind != "stops":
            try:
                number = float(text.strip())
            except ValueError:
                return None, f"must be {self.bounds_text()}, got {text!r}"
            value = int(number) if self.kind == "int" and number.is_integer() else number
        elif self.kind == "int" and isinstance(text, float) and text.is_integer():
            value = int(text)
        problem = self.problem(value)
        return (None, problem) if problem else (value, None)

    def help_with_bounds(self) -> str:
        return f"{self.help} ({self.bounds_text()})"


def _shown(number: float | None) -> str:
    if number is None:
        return ""
    return f"{number:,}" if isinstance(number, int) and abs(number) >= 10_000 else f"{number:g}"


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        Setting(
            "max_new_tokens", "Max new tokens", "int", 256,
            "The longest answer, in tokens; on a model whose context is smaller, an answer gets the room "
            "left (a note says so).",
            minimum=1, maximum=4096, api_name="max_tokens", widget="number",
        ),
        Setting(
            "temperature", "Temperature", "float", 0.7,
            "0 = greedy (always the most likely token); higher = more varied.",
            minimum=0.0, maximum=2.0, widget="slider", step=0.05,
        ),
        Setting(
            "top_p", "Top p", "float", 0.95,
            "Sample only from the most likely tokens covering this probability.",
            minimum=0.0, maximum=1.0, above_minimum=True, widget="slider", step=0.05,
        ),
        Setting(
            "top_k", "Top k", "int", 0,
            "Sample only from the k most likely tokens (0 = off).",
            minimum=0, maximum=100_000,
        ),
        Setting(
            "repetition_penalty", "Repetition penalty", "float", 1.0,
            "Above 1 discourages repeating what is already there (1 = off).",
            minimum=0.0, maximum=2.0, above_minimum=True,
        ),
        Setting(
            "seed", "Seed", "int", None,
            "Sampling seed: the same seed gives the same text (choice i of a request uses seed + i).",
            minimum=-SEED_LIMIT - 1, maximum=SEED_LIMIT, in_catalog=False,
            bounds_words="a whole number that fits in 64 bits",
        ),
        Setting(
            "stop", "Stop sequences", "stops", (),
            "Text that ends the answer when the model writes it (not included in the answer).",
            max_items=4, max_chars=200,
        ),
    )
}  # fmt: skip
"""Every generation setting, in the order the API, the CLI and the chat show them."""

NAMES: tuple[str, ...] = tuple(SETTINGS)
CATALOG_NAMES: tuple[str, ...] = tuple(n for n, s in SETTINGS.items() if s.in_catalog)


def problems(values: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, problem) for every value in `values` that is not valid. Unknown names are ignored, and
    so is None where it is the default (no seed)."""
    out = []
    for name, value in values.items():
        setting = SETTINGS.get(name)
        if setting is None or (value is None and setting.default is None):
            continue
        problem = setting.problem(value)
        if problem:
            out.append((name, problem))
    return out


def defaults() -> dict[str, Any]:
    """Every setting's default (the engine's values when no catalog entry sets one)."""
    return {name: s.default for name, s in SETTINGS.items()}
