"""`python -m finetune export --gguf --adapter RUN`: a trained LoRA as a GGUF LoRA for the llama.cpp engine.

llama.cpp's own converter (`convert_lora_to_gguf.py`, from the same sources `llama-server` was built
from, so the file format matches the server) writes `adapter.gguf` next to the PEFT files. The base's
config comes from the folder the adapter was trained on: for a GGUF base, its converted safetensors
folder (`babl_core.engine.gguf.converted_dir`). The app's llama.cpp engine loads the export when a session
first uses the adapter (restarting that base's server while no answer runs on it).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from babl_core import settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3


class ExportError(RuntimeError):
    """The export cannot be made; the message names the fix."""


def base_config_dir(run_dir: Path) -> Path:
    """A folder with the base's config.json (the converter reads the architecture from it)."""
    from babl_core.engine import gguf
    from babl_core.engine.catalog import hub_cached_dir, looks_like_path, read_adapter_info

    info = read_adapter_info(run_dir)
    if info.gguf_file:
        try:
            return gguf.converted_dir(info, "float32")
        except gguf.GGUFUnavailable as exc:
            raise ExportError(f"the base of {info.id} is unavailable: {exc}") from exc
    folder = settings.resolve_path(info.base) if looks_like_path(info.base) else hub_cached_dir(info.base)
    if folder is None or not (folder / "config.json").is_file():
        raise ExportError(f"the base {info.base} of {info.id} is not on this machine; download it first")
    return folder


def export_gguf_lora(adapter: str, *, outtype: str = "f32") -> Path:
    """Convert the PEFT LoRA `adapter` (a run name or folder) to `<folder>/adapter.gguf`.

    Raises:
        ExportError: no adapter there, no llama.cpp sources (build the engine first), or the converter
            failed (its last lines are in the message).
    """
    from babl_core.engine import llama_cpp
    from finetune.files import RunNotFound, find_adapter_dir, replacing

    try:
        run_dir = find_adapter_dir(adapter)
    except RunNotFound as exc:
        raise ExportError(str(exc)) from exc
    script = llama_cpp.source_dir() / "convert_lora_to_gguf.py"
    if not script.is_file():
        raise ExportError(
            f"llama.cpp's converter is not here ({script}); run: {llama_cpp.BUILD_COMMAND} (it fetches the "
            "sources the converter comes with)"
        )
    out, base = llama_cpp.lora_export(run_dir), base_config_dir(run_dir)
    with replacing(out) as partial:  # never a half-written adapter.gguf
        argv = [sys.executable, str(script), "--outfile", str(partial), "--outtype", outtype,
                "--base", str(base), str(run_dir)]  # fmt: skip
        env = dict(os.environ, HF_HUB_OFFLINE="1")  # the base's config is local: never look it up
        result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        if result.returncode != 0 or partial.stat().st_size == 0:  # the file exists (empty) from the start
            tail = "\n".join(result.stdout.splitlines()[-15:])
            raise ExportError(f"convert_lora_to_gguf.py failed (exit code {result.returncode}):\n{tail}")
    return out


def cmd_export(args: argparse.Namespace, overrides: dict, unknown: list[str]) -> int:
    """Write a trained adapter in another format (today: `--gguf`, for the llama.cpp engine)."""
    if unknown:
        print(f"finetune export: unknown arguments: {' '.join(unknown)}", file=sys.stderr)
        return EXIT_USAGE
    if not args.gguf:
        print("finetune export: say which format: --gguf", file=sys.stderr)
        return EXIT_USAGE
    try:
        path = export_gguf_lora(args.adapter, outtype=args.outtype)
    except ExportError as exc:
        print(f"finetune export: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"Wrote {settings.portable_path(path)} ({path.stat().st_size / 1e6:.1f} MB); the llama.cpp engine "
          "loads it the next time a chat uses this adapter")  # fmt: skip
    return EXIT_OK


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `export` on `python -m finetune`'s subcommands."""
    parser = subparsers.add_parser(
        "export",
        help="write a trained LoRA as a GGUF LoRA for the llama.cpp engine",
        usage="python -m finetune export --gguf --adapter RUN [--outtype f32|f16|bf16|q8_0]",
        description=(__doc__ or "").split("\n\n")[0],
        allow_abbrev=False,
    )
    parser.add_argument(
        "--gguf", action="store_true", help="write <adapter>/adapter.gguf (llama.cpp's format)"
    )
    parser.add_argument("--adapter", required=True, metavar="RUN", help="run name or adapter folder")
    parser.add_argument("--outtype", default="f32", choices=["f32", "f16", "bf16", "q8_0"],
                        help="tensor type of the export (default %(default)s)")  # fmt: skip
    parser.set_defaults(func=cmd_export)
    return parser
