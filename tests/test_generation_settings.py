"""One definition of every generation setting: the catalog check, the engine, the API schema, the chat
widgets and the CLI options all take the same values and refuse the same ones."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from babl_core.__main__ import build_parser
from babl_core.engine.catalog import ModelSpec, _parse_generation
from babl_core.engine.generation import GenerationParams
from babl_core.engine.generation_settings import SETTINGS
from babl_core.engine.service import ChatSession
from babl_core.web import ui
from babl_core.web.api import protocol


def probes(name: str) -> list[tuple[object, bool]]:
    """(value, valid) around the setting's bounds, plus the non-finite numbers."""
    s = SETTINGS[name]
    one = 1 if s.kind == "int" else 0.01
    out = [(s.maximum, True), (s.maximum + one, False), (math.inf, False), (-math.inf, False)]
    out += [(s.minimum, not s.above_minimum), (s.minimum - one, False)]
    if s.kind == "float":
        out.append((math.nan, False))
    return out


NUMERIC = [n for n, s in SETTINGS.items() if s.kind in ("int", "float") and n != "seed"]
CASES = [(name, value, valid) for name in NUMERIC for value, valid in probes(name)]


def catalog_accepts(name: str, value) -> bool:
    problems: list[str] = []
    _parse_generation(problems, "entry 'x'", {name: value})
    return not problems


def engine_accepts(name: str, value) -> bool:
    try:
        GenerationParams.from_defaults(None, **{name: value}).validate()
    except ValueError:
        return False
    return True


def api_accepts(name: str, value) -> bool:
    field = SETTINGS[name].api_field
    try:
        protocol.ChatCompletionRequest(
            model="m", messages=[{"role": "user", "content": "x"}], **{field: value}
        )
    except ValidationError:
        return False
    return True


def chat_accepts(name: str, value) -> bool:
    state = ui.UiState(chat=ChatSession(model_id="m", settings={}))
    change = ui.read_settings({name: value}, state, [])
    return not change.problems


def cli_accepts(name: str, value) -> bool:
    option = SETTINGS[name].cli_option
    try:
        build_parser().parse_args(["generate", "--model", "m", "x", option, str(value)])
    except SystemExit:
        return False
    return True


@pytest.mark.parametrize(("name", "value", "valid"), CASES)
def test_every_entry_point_gives_the_same_verdict(name, value, valid, capsys):
    verdicts = {
        "catalog": catalog_accepts(name, value),
        "engine": engine_accepts(name, value),
        "api": api_accepts(name, value),
        "cli": cli_accepts(name, value),
    }
    if SETTINGS[name].widget:
        verdicts["chat"] = chat_accepts(name, value)
    assert verdicts == dict.fromkeys(verdicts, valid), (name, value)


@pytest.mark.parametrize("value", [100, math.inf, 2.01])
def test_temperature_above_two_is_refused_everywhere(value, capsys):
    assert not catalog_accepts("temperature", value)
    assert not engine_accepts("temperature", value)
    assert not api_accepts("temperature", value)
    assert not chat_accepts("temperature", value)
    assert not cli_accepts("temperature", value)


def test_api_schema_widgets_and_cli_help_show_the_definition():
    schema = protocol.ChatCompletionRequest.model_json_schema()["properties"]
    temperature = next(t for t in schema["temperature"]["anyOf"] if t.get("type") == "number")
    assert temperature["maximum"] == SETTINGS["temperature"].maximum == 2
    assert SETTINGS["temperature"].help in schema["temperature"]["description"]
    max_tokens = next(t for t in schema["max_tokens"]["anyOf"] if t.get("type") == "integer")
    assert max_tokens["maximum"] == SETTINGS["max_new_tokens"].maximum

    spec = ModelSpec(id="m", label="M", task="chat", base="x")
    state = ui.UiState.for_model(spec)
    widgets = {w["id"]: w for w in ui.settings_widgets([], state)}
    assert widgets["temperature"]["max"] == SETTINGS["temperature"].maximum
    assert widgets["temperature"]["description"] == SETTINGS["temperature"].help
    assert widgets["top_p"]["min"] > 0 and widgets["top_p"]["max"] == 1

    generate = build_parser()._subparsers._group_actions[0].choices["generate"]
    helps = {a.dest: a.help for a in generate._actions}
    for name, setting in SETTINGS.items():
        assert setting.help in helps[name]


def test_stop_sequences_are_bounded_in_count_and_length():
    stop = SETTINGS["stop"]
    assert stop.problem(["a"] * stop.max_items) is None
    assert "at most" in stop.problem(["a"] * 1000)
    assert stop.problem(["x" * (stop.max_chars + 1)])
    assert stop.problem([""])
    assert stop.problem(["\ud800"])
    assert not api_accepts("stop", ["a"] * 1000)
    assert not catalog_accepts("stop", ["a"] * 1000)
