"""`babl` (or `python -m babl_core`): serve, models, generate, demo, download, verify-gguf, status, engines,
adduser, finetune.

Each command is a plain function; heavy imports happen inside them so `--help` is instant.
`babl finetune ...` hands its arguments to the finetune CLI unchanged (`python -m finetune ...`).
Exit codes: 0 ok, 1 failed while running, 2 bad usage (unknown model, bad setting), 3 model unavailable.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3


def _err(message: str) -> None:
    print(f"babl: {message}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------
def cmd_models(args: argparse.Namespace) -> int:
    """Print the catalog with each entry's availability."""
    from babl_core.engine.availability import availability
    from babl_core.engine.catalog import Catalog, CatalogError

    try:
        catalog = Catalog.load()
    except CatalogError as exc:
        _err(str(exc))
        return EXIT_USAGE
    rows = []
    for spec in catalog.list():
        avail = availability(spec)
        rows.append({"id": spec.id, "task": spec.task, "availability": avail.word, "reason": avail.reason,
                     "label": spec.display_label, "source": spec.source})  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    # Cut long reasons to the width only on a terminal; piped or redirected output keeps them whole.
    cut = not args.wide and sys.stdout.isatty()
    width = shutil.get_terminal_size((160, 20)).columns
    was_cut = False
    id_w = max(len("id"), *(len(r["id"]) for r in rows))
    task_w = max(len("task"), *(len(r["task"]) for r in rows))
    av_w = max(len("availability"), *(len(r["availability"]) for r in rows))
    print(f"{'id':<{id_w}}  {'task':<{task_w}}  {'availability':<{av_w}}  reason")
    for r in rows:
        line = f"{r['id']:<{id_w}}  {r['task']:<{task_w}}  {r['availability']:<{av_w}}  {r['reason']}"
        if cut and len(line) > width:
            line, was_cut = line[: width - 1] + "…", True
        print(line)
    for warning in catalog.warnings:
        _err(f"warning: {warning}")
    if was_cut:
        _err("reasons cut at the terminal's width (…); see them whole with --wide, or --json")
    return EXIT_OK


# --------------------------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    """Stream one answer to stdout through the same path as the chat app."""
    import asyncio

    from babl_core.engine.cache import ModelBusy
    from babl_core.engine.catalog import CatalogError, UnknownModel
    from babl_core.engine.generation import GenerationError
    from babl_core.engine.generation_settings import SETTINGS
    from babl_core.engine.loaded import ModelUnavailable
    from babl_core.engine.service import BadMessage, ChatService, ChatSession
    from babl_core.engine.words import count

    prompt = args.prompt if args.prompt != "-" else sys.stdin.read()
    settings = {name: getattr(args, name) for name in SETTINGS}
    settings["stop"] = settings["stop"] or None

    async def run() -> int:
        service = ChatService()
        session = ChatSession(model_id=args.model, system_prompt=args.system or "",
                              settings={k: v for k, v in settings.items() if v is not None})  # fmt: skip
        reply = service.respond(session, prompt, on_status=lambda msg: _err(msg))
        async for chunk in reply:
            sys.stdout.write(chunk)
            sys.stdout.flush()
        sys.stdout.write("\n")
        for note in reply.notes:
            _err(f"note: {note}")
        if not args.quiet:
            s = reply.stats
            _err(f"{reply.spec.id}: {reply.description}; {count(s.completion_tokens, 'token')} in {s.elapsed:.2f} s "
                 f"({s.tokens_per_second:.1f} tok/s), finished: {s.finish_reason}")  # fmt: skip
        return EXIT_OK

    try:
        return asyncio.run(run())
    except (UnknownModel, CatalogError) as exc:
        _err(str(exc))
        return EXIT_USAGE
    except (BadMessage, ValueError) as exc:
        _err(str(exc))
        return EXIT_USAGE
    except (ModelUnavailable, ModelBusy) as exc:
        _err(str(exc))
        return EXIT_UNAVAILABLE
    except GenerationError as exc:
        _err(str(exc))
        return EXIT_FAILED
    except KeyboardInterrupt:
        _err("stopped")
        return EXIT_FAILED
    finally:
        _let_workers_finish()


def _let_workers_finish(timeout: float = 10.0) -> None:
    """Wait for Babl's worker threads (batch scheduler, loads) to end before the interpreter does:
    finalizing Python while a daemon thread is still inside torch sometimes aborts the process
    ("terminate called without an active exception", exit 134) after the answer was printed."""
    import threading
    import time

    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and thread.name.startswith("babl-"):
            thread.join(max(0.0, deadline - time.monotonic()))


# --------------------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    """Build the demo models (random weights) under models/demo/."""
    from babl_core.demo import build_demo_models

    build_demo_models(args.out, if_missing=args.if_missing)
    return EXIT_OK


# --------------------------------------------------------------------------------------------------
def cmd_download(args: argparse.Namespace) -> int:
    """Download an entry's base and adapter from the hub into the HF cache; for an entry with a GGUF
    file, fetch it if it is a hub file and convert it to safetensors once."""
    from babl_core.engine.catalog import Catalog, UnknownModel, is_offline, looks_like_path

    try:
        spec = Catalog.load().get(args.model)
    except UnknownModel as exc:
        _err(str(exc))
        return EXIT_USAGE
    if spec.backend == "local" and spec.gguf_file:
        return _prepare_gguf(spec)
    refs = [r for r in (spec.base, spec.adapter) if r and not looks_like_path(r)]
    if spec.backend != "local" or not refs:
        print(f"{spec.id} needs no download: it is {'remote' if spec.backend != 'local' else 'local'}")
        return EXIT_OK
    if is_offline():
        _err(f"cannot download {spec.id}: offline (HF_HUB_OFFLINE=1 or the hub did not answer within 2 s). "
             "Connect to the internet, unset HF_HUB_OFFLINE, and run this again.")  # fmt: skip
        return EXIT_UNAVAILABLE
    from huggingface_hub import HfApi, constants, snapshot_download

    api = HfApi()
    try:
        total = 0
        for ref in refs:
            info = api.model_info(ref, files_metadata=True)
            total += sum((f.size or 0) for f in info.siblings or [] if _wanted(f.rfilename))
        cache_dir = constants.HF_HUB_CACHE
        os.makedirs(cache_dir, exist_ok=True)
        free = shutil.disk_usage(cache_dir).free
        print(f"{spec.id}: {total / 1e9:.2f} GB to download into {cache_dir} ({free / 1e9:.1f} GB free)")
        if total * 1.05 > free:
            _err(f"not enough disk space: need {total / 1e9:.2f} GB, {free / 1e9:.2f} GB free in {cache_dir}. "
                 "Free some space or set HF_HOME to a larger disk.")  # fmt: skip
            return EXIT_FAILED
        for ref in refs:
            snapshot_download(ref, allow_patterns=ALLOW_PATTERNS)  # shows a progress bar per file
    except Exception as exc:  # network and hub errors: one line, not a traceback
        _err(f"download of {spec.id} failed: {exc.__class__.__name__}: {exc}")
        return EXIT_FAILED
    print(f"{spec.id} is ready (cached)")
    return EXIT_OK


def _prepare_gguf(spec) -> int:
    """A GGUF entry: fetch the file when it is a hub file, and convert it once (progress on stderr)."""
    from babl_core.engine.gguf import GGUFUnavailable, converted_dir
    from babl_core.engine.loading import plan_load

    try:
        folder = converted_dir(spec, plan_load(spec).dtype)
    except GGUFUnavailable as exc:
        _err(f"{spec.id}: {exc}")
        return EXIT_UNAVAILABLE
    from babl_core.settings import portable_path

    print(f"{spec.id} is ready (local: {portable_path(folder)})")
    return EXIT_OK


def cmd_verify_gguf(args: argparse.Namespace) -> int:
    """Check the sha256 of each GGUF file in the catalog whose released checksum Babl knows."""
    from babl_core.engine.catalog import Catalog
    from babl_core.engine.gguf import KNOWN_SHA256, GGUFUnavailable, verify

    seen: set[str] = set()
    status = EXIT_OK
    for spec in Catalog.load().entries:
        if not spec.gguf_file or spec.gguf_file in seen or spec.gguf_file not in KNOWN_SHA256:
            continue
        seen.add(spec.gguf_file)
        try:
            print(verify(spec.gguf_file, spec.base))
        except GGUFUnavailable as exc:
            _err(str(exc))
            status = EXIT_FAILED
    if not seen:
        print("the catalog names no GGUF file with a known checksum")
    return status


ALLOW_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.model",
    "*.txt",
    "*.jinja",
    "*.py",
    "tokenizer*",
    "*.tiktoken",
]


def _wanted(name: str) -> bool:
    import fnmatch

    return any(fnmatch.fnmatch(name, p) for p in ALLOW_PATTERNS)


# --------------------------------------------------------------------------------------------------
def cmd_status(args: argparse.Namespace) -> int:
    """Show a running server's status: loaded bases, adapters, memory, batches, active generations, queue."""
    import urllib.error
    import urllib.request

    url = args.url.rstrip("/") + "/v1/status"
    request = urllib.request.Request(url)
    key = os.environ.get("BABL_API_KEY")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            data = json.loads(response.read())
    except (urllib.error.URLError, OSError) as exc:
        from babl_core.settings import serve_command

        _err(f"no Babl server answered at {url} ({exc}); start one with `{serve_command()}`, or pass --url")
        return EXIT_FAILED
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        from babl_core.engine.service import format_status

        print(format_status(data))
    return EXIT_OK


def cmd_adduser(args: argparse.Namespace) -> int:
    """Add or update a login in a users file (scrypt hashes)."""
    try:
        from babl_core.web.auth import adduser_interactive
    except ImportError:
        _err("adduser is not built yet")
        return EXIT_FAILED
    try:
        adduser_interactive(args.name, args.file)
    except (ValueError, KeyboardInterrupt, EOFError) as exc:
        _err(str(exc) or "cancelled")
        return EXIT_USAGE
    return EXIT_OK


def cmd_engines(args: argparse.Namespace) -> int:
    """Local engines besides transformers: `engines` says where llama-server is (or how to get it);
    `engines build llama.cpp` builds it once from the llama-cpp-python sdist's sources (cmake, ninja,
    g++; about 7 minutes on 2 idle cores), cached by version and CPU under BABL_CACHE_DIR or ~/.cache/babl."""
    from babl_core.engine import llama_cpp

    if args.action == "build":
        if args.engine != "llama.cpp":
            _err(f"unknown engine {args.engine!r}; the one that can be built is llama.cpp")
            return EXIT_USAGE
        found = llama_cpp.find_server()
        if args.if_missing and found:
            print(f"llama-server found: {found}")
            return EXIT_OK
        try:
            path = llama_cpp.build(jobs=args.jobs)
        except RuntimeError as exc:
            _err(str(exc))
            return EXIT_FAILED
        print(path)
        return EXIT_OK
    found = llama_cpp.find_server()
    print(f"llama.cpp: {found}" if found else f"llama.cpp: not found; {llama_cpp.missing_reason()}")
    return EXIT_OK


# --------------------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    """Start the chat app and its API (what `make run` starts), from any folder."""
    from babl_core.web.launch import serve

    return serve(host=args.host, port=args.port, tunnel=args.tunnel, headless=args.headless)


def run_finetune(argv: list[str]) -> int:
    """`babl finetune ...`: the finetune CLI with the same arguments."""
    # As `python -m finetune` does, before torch loads OpenMP: idle OpenMP threads that spin steal
    # the cores of a shared machine (see finetune/__main__.py). A value in the environment still wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from finetune.__main__ import main as finetune_main

    return finetune_main(argv)


def _prog() -> str:
    return "babl" if os.path.basename(sys.argv[0] or "").startswith("babl") else "python -m babl_core"


def add_setting_options(parser: argparse.ArgumentParser) -> None:
    """One option per generation setting (`generation_settings.SETTINGS`): its help, its bounds, and a
    value out of bounds refused by argparse (exit code 2) before anything loads."""
    from babl_core.engine.generation_settings import SETTINGS, Setting

    def checked(setting: Setting):
        def convert(text: str):
            value, problem = setting.parse(text)
            if problem:
                raise argparse.ArgumentTypeError(f"{setting.name}: {problem}")
            return value

        convert.__name__ = setting.kind  # argparse names the type in its own messages
        return convert

    for setting in SETTINGS.values():
        if setting.kind == "stops":
            parser.add_argument(setting.cli_option, action="append",
                                help=f"{setting.help} Repeatable, at most {setting.max_items}.")  # fmt: skip
            continue
        default = "" if setting.default is None else ", default: the entry's"
        parser.add_argument(setting.cli_option, type=checked(setting),
                            help=f"{setting.help} ({setting.bounds_text()}{default})")  # fmt: skip


# --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from babl_core import __version__

    parser = argparse.ArgumentParser(
        prog=_prog(),
        description="Babl: chat with local code and text models. Exit codes: 0 ok, 1 failed, "
        "2 bad usage, 3 model unavailable.",
    )
    parser.add_argument("--version", action="version", version=f"babl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="start the chat app and its API", description=cmd_serve.__doc__)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    p.add_argument(
        "--tunnel", action="store_true", help="also open an ngrok tunnel (needs NGROK_AUTHTOKEN; see README)"
    )
    p.add_argument("--headless", action="store_true", help="do not open a browser tab")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("models", help="list the catalog with availability", description=cmd_models.__doc__)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--wide", action="store_true", help="on a terminal too, never cut long reasons to its width"
    )
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("generate", help="stream an answer to stdout", description=cmd_generate.__doc__)
    p.add_argument("prompt", help="your message ('-' reads standard input)")
    p.add_argument("--model", "-m", required=True, help="catalog id (see `models`), e.g. demo-python")
    add_setting_options(p)
    p.add_argument("--system", help="system prompt (for prompt styles that support one)")
    p.add_argument("--quiet", "-q", action="store_true", help="no statistics line on stderr")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="build the offline demo models", description=cmd_demo.__doc__)
    p.add_argument("--if-missing", action="store_true", help="only build what is missing or outdated")
    p.add_argument("--out", help="directory (default: models/demo, or $BABL_MODELS_DIR/demo)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "download",
        help="download an entry's weights (online); convert a GGUF entry once",
        description=cmd_download.__doc__,
    )
    p.add_argument("model", help="catalog id, e.g. python-codegen")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser(
        "verify-gguf",
        help="check the sha256 of the catalog's GGUF files",
        description=cmd_verify_gguf.__doc__,
    )
    p.set_defaults(func=cmd_verify_gguf)

    p = sub.add_parser("status", help="show a running server's status", description=cmd_status.__doc__)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server address (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the server's JSON instead of a summary")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("engines", help="find or build the llama.cpp engine", description=cmd_engines.__doc__)
    p.add_argument(
        "action", nargs="?", choices=["list", "build"], default="list", help="list (default) or build"
    )
    p.add_argument("engine", nargs="?", default="llama.cpp", help="the engine to build: llama.cpp")
    p.add_argument("--jobs", "-j", type=int, help="parallel compile jobs (default: the CPU count)")
    p.add_argument("--if-missing", action="store_true", help="build only when no llama-server is found")
    p.set_defaults(func=cmd_engines)

    p = sub.add_parser("adduser", help="add a login to a users file", description=cmd_adduser.__doc__)
    p.add_argument("name", help="user name")
    p.add_argument("--file", help="users file (default data/users.toml); use it with BABL_AUTH=@<file>")
    p.set_defaults(func=cmd_adduser)

    # Listed for --help only: main() hands everything after `finetune` to the finetune CLI.
    sub.add_parser("finetune", help="train, eval, predict, merge, experiment (`finetune --help` for more)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["finetune"]:
        return run_finetune(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
