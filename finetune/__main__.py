"""`python -m finetune`: train | eval | predict | merge | export | experiment | data.

    python -m finetune train --config configs/finetune/demo-python.yaml [--key value ...] [--dry-run]
    python -m finetune merge --adapter models/adapters/<run> [--out DIR] [--tolerance T]   # finetune.merge
    python -m finetune export --gguf --adapter <run>   # a GGUF LoRA for the llama.cpp engine (finetune.export)
    python -m finetune eval --adapter demo-python-lora [--humaneval] [--limit N]
    python -m finetune predict --adapter demo-qa-squad [--num N | --query TEXT ...] [--json]
    python -m finetune experiment --config configs/finetune/demo-qa.yaml
    python -m finetune data stdlib-instruct [--output DIR]                              # finetune.stdlib_instruct

Every config key is also a command-line option (`--lora_r 8` or `--lora-r 8`); the command line wins
over the file. `train` also runs under `accelerate launch -m finetune train ...`.
Exit codes: 0 ok, 1 failed while running, 2 bad config or usage, 3 base model unavailable.

Heavy imports (torch, transformers) happen inside the command functions, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from finetune.config import GROUPS, ConfigError, all_fields

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3


def _err(message: str) -> None:
    # Under `accelerate launch` every process meets the same config, data or base problem: the main one
    # says it, the others only exit with the same code (the reason once, not once per process).
    if os.environ.get("RANK", "0") != "0":
        return
    print(f"finetune: {message}", file=sys.stderr)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is now (tests and tools swap it), not the one seen at set-up."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging() -> None:
    from finetune.outputs import is_main_process

    logger = logging.getLogger("finetune")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("finetune: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO if is_main_process() else logging.WARNING)


# --------------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace, overrides: dict[str, str], unknown: list[str]) -> int:
    """Train an adapter (or a full T5 fine-tune) as the config describes."""
    from finetune.config import load_config

    problems = _unknown_option_problems(unknown)
    try:
        config = load_config(args.config, overrides, for_training=not args.dry_run)
    except ConfigError as exc:
        _err(str(ConfigError(exc.source, problems + exc.problems)))
        return EXIT_USAGE
    if problems:
        _err(str(ConfigError(config.source or args.config, problems)))
        return EXIT_USAGE
    _setup_logging()
    if args.dry_run:
        return _dry_run(config)

    from babl_core.engine.loaded import ModelUnavailable
    from finetune.data import DataError
    from finetune.outputs import RunInProgress
    from finetune.recipes import run_training

    try:
        result = run_training(config)
    except RunInProgress as exc:
        _err(str(exc))
        return EXIT_FAILED
    except DataError as exc:
        _err(str(exc))
        return EXIT_USAGE
    except ModelUnavailable as exc:
        _err(f"base: {exc.reason}")
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        from finetune.outputs import python_command

        _err(
            f"interrupted; continue from the last checkpoint with: {python_command()} -m finetune train "
            f"--config {config.source} --resume true"
        )
        return EXIT_FAILED
    if result.output_dir is not None:
        from finetune.outputs import final_report

        print(final_report(config, result))
    return EXIT_OK


def _dry_run(config) -> int:
    """Print formatted examples with their loss mask and the token-length distribution; train nothing."""
    from babl_core.engine.loaded import ModelUnavailable
    from babl_core.engine.loading import base_source, load_tokenizer, plan_load
    from finetune.data import DataError, describe_preview, prepare_data
    from finetune.factories import base_weights

    try:
        base = config.model.base
        if config.model.gguf_file:  # the tokenizer is in the GGUF: read it from the converted folder
            weights = base_weights(config)
            base = base_source(weights, plan_load(weights))[0]
        tokenizer = load_tokenizer(base, config.model.kind)
        tokenizer.padding_side = "right"
        prepared = prepare_data(tokenizer, config, kind=config.model.kind)
    except DataError as exc:
        _err(str(exc))
        return EXIT_USAGE
    except OSError as exc:
        _err(f"base: could not read the tokenizer of {config.model.base}: {exc}")
        return EXIT_UNAVAILABLE
    except ModelUnavailable as exc:
        _err(f"base: {exc.reason}")
        return EXIT_UNAVAILABLE
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    print(describe_preview(tokenizer, prepared, config, kind=config.model.kind, color=color))
    return EXIT_OK


def _adapter_command(unknown: list[str], work) -> int:
    """Run `work()` for eval/predict/experiment, mapping their errors to exit codes and messages."""
    from babl_core.engine.generation import GenerationError
    from babl_core.engine.loaded import ModelUnavailable
    from babl_core.engine.service import BadMessage
    from finetune.data import DataError
    from finetune.evaluation import EvalError
    from finetune.experiment import ExperimentError

    problems = _unknown_option_problems(unknown)
    if problems:
        _err(str(ConfigError("command line", problems)))
        return EXIT_USAGE
    _setup_logging()
    try:
        return work()
    except (ConfigError, DataError, EvalError, ExperimentError, BadMessage) as exc:
        _err(str(exc))
        return EXIT_USAGE
    except ModelUnavailable as exc:
        _err(f"model: {exc.reason}")
        return EXIT_UNAVAILABLE
    except GenerationError as exc:
        _err(str(exc))
        return EXIT_FAILED
    except KeyboardInterrupt:
        _err("interrupted")
        return EXIT_FAILED


def cmd_eval(args: argparse.Namespace, overrides: dict[str, str], unknown: list[str]) -> int:
    """Loss, perplexity and the task metric of a trained adapter; eval.json, babl.json and a table."""

    def work() -> int:
        from babl_core import settings
        from finetune import evaluation

        target = evaluation.resolve_target(adapter=args.adapter, config_path=args.config, overrides=overrides)
        report = evaluation.run_eval(target)
        path = evaluation.write_results(target, report)
        print(evaluation.format_table(report))
        print(
            f"written: {settings.portable_path(path)}; the summary is in the eval results of the adapter's "
            f"babl.json, and its model card ({settings.portable_path(path.parent / 'README.md')}) shows it"
        )
        return EXIT_OK

    return _adapter_command(unknown, work)


def cmd_predict(args: argparse.Namespace, overrides: dict[str, str], unknown: list[str]) -> int:
    """A trained adapter's answers to random held-out rows (seeded) or to your own queries."""

    def work() -> int:
        import json

        from finetune import evaluation, prediction

        target = evaluation.resolve_target(adapter=args.adapter, config_path=args.config, overrides=overrides)
        predictions = prediction.predict(target, queries=args.query, num=args.num, split=args.split)
        if args.json:
            print(json.dumps([p.to_dict() for p in predictions], indent=2, ensure_ascii=False))
        else:
            print(prediction.format_predictions(predictions, title=f"{target.name} ({target.spec.task})"))
        return EXIT_OK

    return _adapter_command(unknown, work)


def cmd_experiment(args: argparse.Namespace, overrides: dict[str, str], unknown: list[str]) -> int:
    """The context experiment: train and evaluate a question-answering recipe with and without context; write the table."""

    def work() -> int:
        from pathlib import Path

        from finetune import evaluation, experiment

        def show(report) -> None:
            print(evaluation.format_table(report), flush=True)

        try:
            result = experiment.run_experiment(
                args.config,
                overrides,
                output_dir=Path(args.output) if args.output else None,
                on_evaluated=show,
            )
        except ConfigError as exc:
            if args.config == experiment.DEFAULT_CONFIG:
                exc.problems.append(
                    "offline? run the experiment on the twin: python -m finetune experiment "
                    "--config configs/finetune/demo-qa.yaml"
                )
            raise ConfigError(exc.source, exc.problems) from None
        print(experiment.print_summary(result))
        return EXIT_OK

    return _adapter_command(unknown, work)


def cmd_data(args: argparse.Namespace, overrides: dict[str, str], unknown: list[str]) -> int:
    """Build a data set on this machine (no hub): `stdlib-instruct`, from the Python standard library."""
    from pathlib import Path

    from babl_core import settings
    from finetune import stdlib_instruct

    if unknown or overrides:
        extra = unknown or [f"--{key}" for key in overrides]
        _err(f"data {args.builder}: unknown option {extra[0]}; see `python -m finetune data --help`")
        return EXIT_USAGE
    if not 0 < args.eval_percent < 100:
        _err(f"--eval-percent {args.eval_percent}: must be above 0 and below 100, e.g. 10")
        return EXIT_USAGE
    if args.max_lines < 2:
        _err(f"--max-lines {args.max_lines}: must be 2 or more (a def line and a body), e.g. 25")
        return EXIT_USAGE
    _setup_logging()
    output = Path(args.output) if args.output else settings.resolve_path(stdlib_instruct.DEFAULT_OUTPUT)
    result = stdlib_instruct.build(output, eval_percent=args.eval_percent, max_lines=args.max_lines)
    print(stdlib_instruct.describe(result))
    return EXIT_OK


# --------------------------------------------------------------------------------------------------
def _unknown_option_problems(unknown: list[str]) -> list[str]:
    import difflib

    names = [f"--{name}" for name in all_fields()]
    problems = []
    for index, item in enumerate(unknown):
        if not item.startswith("--"):
            follows_option = (
                index > 0 and unknown[index - 1].startswith("--") and "=" not in unknown[index - 1]
            )
            if not follows_option:  # else it is the value of the unknown option reported just before
                problems.append(
                    f"{item!r} (command line): not an option; write --key value, e.g. --max_steps 20"
                )
            continue
        option = item.split("=", 1)[0].replace("-", "_").replace("__", "--", 1)
        close = difflib.get_close_matches(option, names, n=1)
        hint = f"did you mean {close[0]}?" if close else "see `python -m finetune train --help`"
        problems.append(f"{item} (command line): unknown option; {hint}")
    return problems


def _add_config_options(parser: argparse.ArgumentParser, groups: tuple[str, ...] | None = None) -> None:
    """One option per config key (of `groups`, default all), grouped as in the dataclasses; absent
    options leave the YAML's value."""
    fields = all_fields()
    for group_name, cls in GROUPS.items():
        if groups is not None and group_name not in groups:
            continue
        group = parser.add_argument_group(f"{group_name} settings", (cls.__doc__ or "").strip())
        for name, (owner, f, hint) in fields.items():
            if owner != group_name:
                continue
            help_text = f.metadata.get("help", "")
            choices = f.metadata.get("choices")
            if choices:
                help_text += f" [{' | '.join(choices)}]"
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if default not in (None, {}) and "default:" not in help_text:
                help_text += f" (default: {default})"
            flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
            is_bool = "bool" in str(hint)
            group.add_argument(
                *flags,
                dest=name,
                default=argparse.SUPPRESS,
                metavar="true|false" if is_bool else name.upper(),
                nargs="?" if is_bool else None,
                const="true" if is_bool else None,
                help=help_text.replace("%", "%%"),
            )


def _add_adapter_commands(sub) -> None:
    """The eval, predict and experiment subcommands."""

    def which(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--adapter", metavar="DIR_OR_RUN", help="a run directory, or a run name in "
                            "models/adapters/ (its finetune.yaml says which rows were held out)")  # fmt: skip
        parser.add_argument("--config", metavar="FILE", help="or: the recipe YAML that trained it (with "
                            "--adapter: names the data set of an adapter trained elsewhere)")  # fmt: skip

    evaluate = sub.add_parser(
        "eval",
        help="loss, perplexity and the task metric of a trained adapter",
        usage="python -m finetune eval (--adapter DIR_OR_RUN | --config FILE) [--humaneval] [--limit N] "
        "[--eval_key value ...]",
        description="Loss and perplexity on the held-out rows, and the task's metric on answers generated "
        "as the app generates them: qa SQuAD exact match/F1, email ROUGE-1/2/L, python/code pass@k "
        "(tests run in a sandbox), html the valid-HTML5 fraction. Writes eval.json next to the adapter "
        "(eval-humaneval.json for HumanEval), adds the summary to babl.json's metrics and prints a table.",
        allow_abbrev=False,
    )
    which(evaluate)
    evaluate.add_argument("--humaneval", dest="eval_set", action="store_const", const="humaneval",
                          default=argparse.SUPPRESS, help="pass@k on HumanEval's problems instead of "
                          "the held-out rows (python and code tasks; same as --eval_set humaneval)")  # fmt: skip
    evaluate.add_argument("--limit", dest="eval_limit", metavar="N", default=argparse.SUPPRESS,
                          help="at most N rows or problems (same as --eval_limit N)")  # fmt: skip
    _add_config_options(evaluate, ("eval",))
    evaluate.set_defaults(func=cmd_eval)

    predict = sub.add_parser(
        "predict",
        help="a trained adapter's answers to random held-out rows or to your own queries",
        usage="python -m finetune predict (--adapter DIR_OR_RUN | --config FILE) [--num N | --query TEXT ...] "
        "[--json]",
        description="Input, reference and prediction for N random rows (seeded by --eval_seed) of the "
        "held-out split, or for your own queries, rendered by the model's prompt style as in the chat.",
        allow_abbrev=False,
    )
    which(predict)
    predict.add_argument("--num", type=int, default=3, metavar="N", help="random rows to answer (default: 3)")
    predict.add_argument("--query", action="append", metavar="TEXT",
                         help="your own message (repeat for several); replaces the random rows")  # fmt: skip
    predict.add_argument("--split", choices=("eval", "train"), default="eval",
                         help="draw rows from the held-out (default) or the training rows")  # fmt: skip
    predict.add_argument("--json", action="store_true", help="print JSON instead of text")
    _add_config_options(predict, ("eval",))
    predict.set_defaults(func=cmd_predict)

    experiment = sub.add_parser(
        "experiment",
        help="does the context passage help? a Q&A recipe trained and evaluated with and without it",
        usage="python -m finetune experiment [--config FILE] [--output DIR] [--key value ...]",
        description="Train the recipe twice, with the context passage and with the question alone (adapters "
        "<run_name>-with-context and <run_name>-without-context, replaced on each run), evaluate both on "
        "the same held-out questions beside the base model asked zero-shot the same way, and write a four-row "
        "table (both adapters, the base with and without context: exact match, F1, eval loss, train time) "
        "with the verdict as experiment.md and experiment.json. Offline: --config "
        "configs/finetune/smollm2-qa.yaml (the real SmolLM2) or configs/finetune/demo-qa.yaml (random "
        "weights, seconds). Config keys given here apply to both arms.",
        allow_abbrev=False,
    )
    experiment.add_argument("--config", metavar="FILE", default="configs/finetune/qa-t5-squad.yaml",
                            help="a Q&A recipe (default: %(default)s)")  # fmt: skip
    experiment.add_argument("--output", metavar="DIR",
                            help="where the tables go (default: models/experiments/<run_name>-context/)")  # fmt: skip
    _add_config_options(experiment)
    experiment.set_defaults(func=cmd_experiment)


def _add_merge_command(sub) -> None:
    from finetune.merge import DTYPES

    parser = sub.add_parser(
        "merge",
        help="merge an adapter into its unquantized base for export (checked against base + adapter)",
        usage="python -m finetune merge (--adapter DIR | --config FILE) [--out DIR] [--base REF] "
        "[--dtype D] [--tolerance T] [--overwrite]",
        description="Merge a LoRA adapter into its base, loaded unquantized (never 4-/8-bit), save the "
        "result (safetensors + tokenizer), reload it and compare its logits with base + adapter; fail "
        "above the tolerance. Exit codes: 0 ok, 1 check failed, 2 bad arguments or refused, 3 base "
        "unavailable.",
        allow_abbrev=False,
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--adapter", metavar="DIR", help="adapter directory or run name, e.g. models/adapters/demo-html-lora"
    )
    which.add_argument(
        "--config", metavar="FILE", help="the run's training config: merges the adapter it trained"
    )
    parser.add_argument("--out", metavar="DIR", help="output directory (default: models/merged/<run>)")
    parser.add_argument(
        "--base", metavar="REF", help="base to merge into (default: the one in the adapter's babl.json)"
    )
    parser.add_argument(
        "--dtype", default="auto", choices=DTYPES,
        help="weight dtype of the merge and the export (auto: float32 on CPU, the entry's dtype on CUDA)",
    )  # fmt: skip
    parser.add_argument(
        "--quantization", default="none", metavar="none",
        help="always none: merging into nf4/int8 weights is refused (quantize when serving instead)",
    )  # fmt: skip
    parser.add_argument(
        "--tolerance", type=float, metavar="T",
        help="largest allowed absolute logit difference (default: 0.01 float32, 0.05 float16, 0.25 bfloat16)",
    )  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.set_defaults(func=cmd_merge)


def cmd_merge(args: argparse.Namespace, overrides: dict[str, str], unknown: list[str]) -> int:
    """`python -m finetune merge`: plan (refusals), merge, check, print the result and a catalog entry."""
    if unknown:
        _err(f"merge: unknown arguments {' '.join(unknown)}; see `python -m finetune merge --help`")
        return EXIT_USAGE
    from babl_core import settings
    from babl_core.engine import words
    from finetune import merge

    _setup_logging()
    adapter, entry_dtype = args.adapter, None
    if args.config:
        from finetune.config import ConfigError, load_config

        try:
            config = load_config(args.config, check_environment=False)
        except ConfigError as exc:
            _err(str(exc))
            return EXIT_USAGE
        adapter = str(config.adapter_path())
        entry_dtype = config.model.dtype
        if config.model.quantization in merge.QUANTIZED:
            merge.log.info(
                "%s trains on a %s base (QLoRA); the merge loads that base unquantized",
                config.source, config.model.quantization,
            )  # fmt: skip
    try:
        plan = merge.plan_merge(
            adapter, base=args.base, out=args.out, dtype=args.dtype, quantization=args.quantization,
            tolerance=args.tolerance, overwrite=args.overwrite, entry_dtype=entry_dtype,
        )  # fmt: skip
    except merge.MergeError as exc:
        _err(str(exc))
        return EXIT_USAGE
    for note in plan.notes:
        merge.log.info("%s", note)
    merge.log.info(
        "merging %s into %s (%s on %s, unquantized)",
        settings.portable_path(plan.adapter_dir), plan.base, plan.dtype, plan.device,
    )  # fmt: skip
    from babl_core.engine.loaded import ModelUnavailable

    try:
        result = merge.merge_adapter(plan)
    except ModelUnavailable as exc:
        _err(f"base: {exc.reason}")
        return EXIT_UNAVAILABLE
    except merge.MergeCheckFailed as exc:
        _err(f"merge check failed: {exc}")
        return EXIT_FAILED
    except merge.MergeError as exc:
        _err(str(exc))
        return EXIT_USAGE
    check = result.check
    print(
        f"merged {plan.run_name} into {plan.base} ({plan.dtype}): max |logit difference| "
        f"{check.max_abs_diff:.3g} over {words.count(check.positions, 'position')} of {words.count(check.examples, 'example')} "
        f"(tolerance {check.tolerance:.3g}, top-1 agreement {100 * check.top1_agreement:.1f}%), "
        f"{result.seconds:.1f} s -> {settings.portable_path(result.out_dir)}"
    )
    print(merge.catalog_snippet(result.catalog_entry), end="")
    sys.stdout.flush()
    return EXIT_OK


def _add_data_command(sub) -> None:
    from finetune import stdlib_instruct

    data = sub.add_parser(
        "data",
        help="build a data set on this machine: stdlib-instruct (code instructions from Python's standard library)",
        usage="python -m finetune data stdlib-instruct [--output DIR] [--eval-percent P] [--max-lines N]",
        description="stdlib-instruct: the documented functions of this Python's standard library as rows in "
        "python_code_instructions_18k_alpaca's columns (instruction from the docstring, input the signature, "
        "output the function without its docstring), split by top-level package so held-out functions come "
        "from packages never trained on. Writes train.jsonl, eval.jsonl and manifest.json (row counts, the "
        "split, the licence: PSF). The same Python version gives the same files.",
        allow_abbrev=False,
    )
    data.add_argument("builder", choices=(stdlib_instruct.NAME,), help="the data set to build")
    data.add_argument(
        "--output", metavar="DIR", help=f"where the files go (default: {stdlib_instruct.DEFAULT_OUTPUT})"
    )
    data.add_argument("--eval-percent", "--eval_percent", dest="eval_percent", type=float,
                      default=stdlib_instruct.DEFAULT_EVAL_PERCENT, metavar="P",
                      help="share of top-level packages held out (default: %(default)s)")  # fmt: skip
    data.add_argument("--max-lines", "--max_lines", dest="max_lines", type=int,
                      default=stdlib_instruct.DEFAULT_MAX_LINES, metavar="N",
                      help="longest function kept, without its docstring (default: %(default)s)")  # fmt: skip
    data.set_defaults(func=cmd_data)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m finetune",
        description="Fine-tune adapters for Babl. Exit codes: 0 ok, 1 failed, 2 bad config or usage, "
        "3 base model unavailable.",
        allow_abbrev=False,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = sub.add_parser(
        "train",
        help="train an adapter from a recipe config",
        usage="python -m finetune train --config FILE [--key value ...] [--dry-run]",
        description="Train an adapter. Every config key below can be given on the command line, where it "
        "wins over the file.",
        allow_abbrev=False,
    )
    train.add_argument(
        "--config",
        required=True,
        metavar="FILE",
        help="the run's YAML, e.g. configs/finetune/demo-python.yaml",
    )
    train.add_argument(
        "--dry-run", action="store_true", help="print a few formatted examples (loss mask shown) and the "
        "token-length distribution, then exit without training",
    )  # fmt: skip
    _add_config_options(train)
    train.set_defaults(func=cmd_train)
    _add_merge_command(sub)
    from finetune.export import add_parser as add_export_parser

    add_export_parser(sub)
    _add_adapter_commands(sub)
    _add_data_command(sub)
    return parser


def parse_command(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict[str, str], list[str]]:
    """(parsed arguments, config overrides given on the command line, unrecognised arguments)."""
    args, unknown = build_parser().parse_known_args(argv)
    names = set(all_fields())
    overrides = {key: value for key, value in vars(args).items() if key in names}
    return args, overrides, unknown


def main(argv: list[str] | None = None) -> int:
    args, overrides, unknown = parse_command(argv)
    try:
        return args.func(args, overrides, unknown)
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    # Set before torch loads OpenMP (the commands import it later). Waiting OpenMP threads spin by
    # default and, on a machine shared with other processes, steal the cores the working threads need:
    # the demo-html twin took 79-143 s on a busy 2-core box by default and 21 s with PASSIVE (same
    # losses). setdefault: an OMP_WAIT_POLICY in the environment still wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
