"""Training throughput: real (non-pad) tokens/s of four ways to batch the same variable-length data.

    .venv/bin/python bench/finetune.py [--shards 3] [--rounds N] [--samples 400]

One process, one model, one data set, one LoRA config and the same TrainingArguments (built by
`finetune.factories.training_arguments`) for every variant; only the batching and the trainer differ:

  (a) padded       every example padded to max_length, plain `Trainer` (seed 001's way)
  (b) trl-dynamic  TRL `SFTTrainer`, dynamic padding (its collator pads to the longest row of a batch)
  (c) trl-packing  TRL `SFTTrainer` with `packing=True` (best-fit packing, padding-free rows)
  (d) babl         whatever `python -m finetune train` does by default: the causal recipe itself is run,
                   `finetune.recipes.causal_lm.train(config)`, with a config that sets nothing about batching
  (e) babl-other   the same recipe with the other row order (`train_sampling_strategy: group_by_length`
                   when the default is random, else random), to show what the default's choice buys.

Setup (issue 8): a random-weight Llama, 4 layers, 256 wide (intermediate 512, 4 heads, 2 KV heads), the
demo byte-level BPE tokenizer; 400 examples of 10–300 words in the alpaca-code style (written here from a
word list, seeded), batch 8, max length 512, LoRA r 16 on q/k/v/o. To finish in minutes on 2 cores, the
400 examples are dealt into `--shards` (3) shards and round i trains one epoch of shard i with every
variant: each run sees whole epochs (a length-grouped sampler puts its longest batch first, so partial
epochs would be unfair), every variant trains on exactly the same tokens in a round (checked), and the
rounds together cover all 400 examples (`--shards 1 --rounds 3` trains all 400 in every run instead).
Smaller shards understate length grouping a little: transformers groups rows in windows of up to 50
batches that shrink with the data set (padding with grouping, counted: 6% on 400 rows, 12% on 200).

Alternating runs, step by step: in a round every variant trains in its own thread and the threads take
turns one optimizer step each (the order reverses every round), so a change in the load of a shared
machine hits every variant alike instead of whichever ran at that minute. A variant's time is the time it
held the turn: its training loop from on_train_begin to on_train_end, data loading and collation
included, set-up and saving not. Real tokens are counted from the batches each trainer's `training_step`
receives (attention_mask ones, or every token of a padding-free packed row). The table shows medians over
the rounds. JSON to bench/results/finetune.json. Goals on CPU: (d) >= 1.0x the best of (a)-(c) and
>= 1.3x (a). (a)-(c) keep their authors' random row order; (d) and (e) run the recipe as configured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VARIANTS = {
    "padded": "(a) padded to max_length, Trainer",
    "trl-dynamic": "(b) TRL SFTTrainer, dynamic padding",
    "trl-packing": "(c) TRL SFTTrainer, packing",
    "babl": "(d) Babl default (finetune train)",
    "babl-other": "(e) Babl, the other row order",
}
BATCH = 8
MAX_LENGTH = 512

# Words for the synthetic examples (ours): prose and code vocabulary, so the BPE splits them as it would
# real instructions and answers.
WORD_LIST = (
    "the a an of to in for on with by from as at into over under after before between and or but not "
    "function return value list string number file page table row column header footer button form input "
    "label style color width height border margin padding font text image link menu item price order "
    "customer user name email address date time year month day week report budget meeting team project "
    "write read open close save load parse check count sort filter merge split join map reduce print "
    "class method object module package import error exception test case result output data set key "
    "first last next previous small large short long fast slow new old simple clear empty full valid "
    "please make sure that each every all some many few more less most least only also then when while "
    "if else because so such this these those which where what who how why can should must will may "
    "bakery bread coffee garden river mountain city street library school museum hospital station"
)


def write_examples(path: Path, count: int, seed: int) -> list[int]:
    """`count` alpaca rows of 10-300 words each (instruction + output); returns the word counts."""
    rng = random.Random(seed)
    vocabulary = WORD_LIST.split()
    sizes = []
    with path.open("w", encoding="utf-8") as out:
        for _ in range(count):
            words = rng.randint(10, 300)
            instruction_words = min(12, max(4, words // 5))
            text = [rng.choice(vocabulary) for _ in range(words)]
            for i in range(instruction_words + 8, words, rng.randint(9, 16)):
                text[i] += rng.choice((".", ",", ".\n", ":"))
            row = {
                "instruction": " ".join(text[:instruction_words]).capitalize() + ".",
                "input": "",
                "output": " ".join(text[instruction_words:]),
            }
            out.write(json.dumps(row) + "\n")
            sizes.append(words)
    return sizes


def build_model(target: Path) -> int:
    from babl_core.demo import build_causal_tokenizer, build_llama

    tokenizer = build_causal_tokenizer()
    model = build_llama(tokenizer, hidden=256, layers=4, heads=4, kv_heads=2, intermediate=512, seed=0)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return sum(p.numel() for p in model.parameters())


def write_config(path: Path, model_dir: Path, data_path: Path, **extra) -> Path:
    import yaml

    # Nothing about batching order or padding is set: (d) measures the recipe's defaults.
    config = {
        "run_name": "bench-train", "task": "python", "prompt_style": "alpaca-code", "overwrite": True,
        "base": str(model_dir), "kind": "causal", "quantization": "none", "dtype": "float32",
        "dataset": str(data_path), "eval_fraction": 0, "max_length": MAX_LENGTH,
        "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "learning_rate": 2e-4, "num_train_epochs": 1, "per_device_train_batch_size": BATCH, "seed": 42,
        "logging_steps": 10, "save_steps": 1_000_000, **extra,
    }  # fmt: skip
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------------
# Measuring inside the trainers: every variant trains in its own thread, and the threads take turns one
# optimizer step at a time, so a change in the machine's load (a shared 2-core box) hits all of them alike.


class Turns:
    """Round-robin turns between trainers in threads: each runs one training step, then the next one does.

    Setting up (loading, tokenizing, building the trainer) is done one thread at a time before any step;
    turns begin when every variant has reached its training loop, and a finished variant waits for the rest
    so that its saving does not overlap their steps.
    """

    def __init__(self, names: list[str]):
        self.order = list(names)
        self.setup = threading.Lock()
        self.cond = threading.Condition()
        self.arrived: set[str] = set()
        self.done: set[str] = set()
        self.current: str | None = None
        self.failed = False

    def _wait_for(self, predicate) -> None:
        self.cond.wait_for(lambda: self.failed or predicate())
        if self.failed:
            raise RuntimeError("another variant failed; see its traceback")

    def begin(self, name: str) -> None:
        """At the start of `name`'s training loop: let the next variant set up, wait for the first turn."""
        self.setup.release()
        with self.cond:
            self.arrived.add(name)
            if len(self.arrived) == len(self.order):
                self.current = self.order[0]
                self.cond.notify_all()
            self._wait_for(lambda: self.current == name)

    def step_done(self, name: str) -> None:
        with self.cond:
            self._pass_on(name)
            self._wait_for(lambda: self.current == name)

    def end(self, name: str) -> None:
        with self.cond:
            self.done.add(name)
            self._pass_on(name)
            self._wait_for(lambda: len(self.done) == len(self.order))

    def fail(self) -> None:
        with self.cond:
            self.failed = True
            self.cond.notify_all()

    def _pass_on(self, name: str) -> None:
        index = self.order.index(name)
        following = [self.order[(index + k) % len(self.order)] for k in range(1, len(self.order) + 1)]
        self.current = next((n for n in following if n not in self.done), None)
        self.cond.notify_all()


def metered(trainer_cls, turns: Turns, trainers: dict):
    """`trainer_cls` that counts the real tokens of its training batches and times its turns.

    The variant is the name of the thread that builds the trainer, so one patched class serves both
    recipe runs ((d) and (e)) at once.
    """
    from transformers import PrinterCallback, ProgressCallback, TrainerCallback

    class TurnClock(TrainerCallback):
        """Time while holding the turn: from getting it to the end of the step (data loading included)."""

        def __init__(self, name: str):
            self.name = name
            self.seconds = 0.0
            self.since = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            turns.begin(self.name)
            self.since = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds += time.perf_counter() - self.since
            turns.step_done(self.name)
            self.since = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            self.seconds += time.perf_counter() - self.since
            turns.end(self.name)

    class Metered(trainer_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.variant = threading.current_thread().name
            self.real_tokens = 0
            self.padded_tokens = 0
            self.clock = TurnClock(self.variant)
            self.add_callback(self.clock)
            for quiet in (ProgressCallback, PrinterCallback):  # bars and log lines would only add noise
                self.remove_callback(quiet)
            trainers[self.variant] = self

        def training_step(self, model, inputs, *args, **kwargs):
            ids = inputs["input_ids"]
            mask = inputs.get("attention_mask")
            # Padding-free packed batches carry no attention mask: every token in them is real.
            self.real_tokens += int(mask.sum()) if mask is not None else ids.numel()
            self.padded_tokens += ids.numel()
            return super().training_step(model, inputs, *args, **kwargs)

        def measurement(self) -> dict:
            return {
                "real_tokens": self.real_tokens,
                "padded_tokens": self.padded_tokens,
                "steps": self.state.global_step,
                "seconds": self.clock.seconds,
                "real_tok_s": self.real_tokens / self.clock.seconds,
                "trainer": trainer_cls.__name__,
                "sampling": self.args.train_sampling_strategy,
            }

    return Metered


def prepared(config):
    """The model wrapped in LoRA and the tokenized rows, set up exactly as the causal recipe does."""
    from peft import get_peft_model

    from babl_core.engine.loading import load_base, plan_load
    from finetune import factories
    from finetune.data import prepare_data

    base = factories.base_weights(config)
    loaded = load_base(base, plan_load(base, "cpu"))
    loaded.tokenizer.padding_side = "right"
    data = prepare_data(loaded.tokenizer, config, kind="causal")
    model = loaded.model
    model.config.use_cache = False
    model = get_peft_model(model, factories.lora_config(config, "CAUSAL_LM"))
    return model, loaded, data


def run_padded(config, workdir: Path) -> None:
    import transformers
    from datasets import Dataset

    from finetune import factories
    from finetune.data import IGNORE_INDEX

    model, loaded, data = prepared(config)
    pad = loaded.tokenizer.pad_token_id

    def padded(row: dict) -> dict:
        extra = MAX_LENGTH - len(row["input_ids"])
        return {
            "input_ids": row["input_ids"] + [pad] * extra,
            "attention_mask": row["attention_mask"] + [0] * extra,
            "labels": row["labels"] + [IGNORE_INDEX] * extra,
        }

    rows = Dataset.from_list([padded(row) for row in data.train.rows])
    args = factories.training_arguments(config, plan=loaded.plan, output_dir=workdir / "a", has_eval=False)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=rows, data_collator=transformers.default_data_collator
    )
    trainer.train()


def run_trl(config, workdir: Path, *, packing: bool) -> None:
    import trl

    from finetune import factories

    model, loaded, data = prepared(config)
    args = factories.training_arguments(
        config, cls=trl.SFTConfig, plan=loaded.plan, output_dir=workdir / ("c" if packing else "b"),
        has_eval=False, packing=packing, max_length=MAX_LENGTH,
    )  # fmt: skip
    rows = data.train.to_dataset().remove_columns("attention_mask")  # TRL's collator builds its own
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=loaded.tokenizer)
    trainer.train()


def run_babl(config) -> None:
    """The real recipe: `python -m finetune train` minus the command line."""
    from finetune.recipes import causal_lm

    causal_lm.train(config)


def run_round(runners: dict, order: list[str]) -> dict[str, dict]:
    """Run every variant in its own thread, taking turns step by step; returns their measurements."""
    import transformers
    import trl

    turns = Turns(order)
    trainers: dict = {}
    errors: list[BaseException] = []
    originals = transformers.Trainer, trl.SFTTrainer
    # The recipe imports these names when it runs: metered classes stand in for the whole round.
    transformers.Trainer = metered(originals[0], turns, trainers)
    trl.SFTTrainer = metered(originals[1], turns, trainers)

    def body(name: str) -> None:
        turns.setup.acquire()
        try:
            runners[name]()
        except BaseException as exc:  # reported by the main thread below
            errors.append(exc)
            if turns.setup.locked() and name not in turns.arrived:
                turns.setup.release()
            turns.fail()

    threads = [threading.Thread(target=body, args=(name,), name=name) for name in order]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        transformers.Trainer, trl.SFTTrainer = originals
    if errors:
        raise errors[0]
    return {name: trainers[name].measurement() for name in order}


# --------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--shards", type=int, default=3, help="round i trains one epoch of shard i")
    parser.add_argument("--rounds", type=int, help="alternating rounds, medians reported (default: --shards)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "finetune.json"))
    opts = parser.parse_args()
    rounds = opts.rounds or opts.shards

    import logging

    import torch
    from transformers.utils import logging as hf_logging

    logging.getLogger("finetune").setLevel(logging.WARNING)
    hf_logging.set_verbosity_error()
    from finetune.config import TrainArgs, load_config
    from finetune.factories import sampling_strategy

    default_setting = TrainArgs().train_sampling_strategy
    default_sampling = sampling_strategy(default_setting, "cpu")
    other_sampling = "random" if default_sampling == "group_by_length" else "group_by_length"
    variants = {**VARIANTS, "babl-other": f"(e) Babl, {other_sampling}"}

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="babl-bench-finetune-") as tmp:
        tmp_path = Path(tmp)
        os.environ["BABL_MODELS_DIR"] = str(tmp_path / "models")
        model_dir = tmp_path / "llama-4x256"
        params = build_model(model_dir)
        all_rows = tmp_path / "examples.jsonl"
        words = write_examples(all_rows, opts.samples, seed=7)
        lines = all_rows.read_text(encoding="utf-8").splitlines(keepends=True)
        shards = []
        for index in range(opts.shards):
            shard = tmp_path / f"shard-{index}.jsonl"
            shard.write_text("".join(lines[index :: opts.shards]), encoding="utf-8")
            shards.append(shard)
        print(
            f"model: Llama 4 layers x 256, {params / 1e6:.1f}M parameters, LoRA r 16 on q/k/v/o; "
            f"{opts.samples} examples of {min(words)}-{max(words)} words in {opts.shards} shard(s); batch {BATCH}, "
            f"max length {MAX_LENGTH}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{platform.machine()}; default train_sampling_strategy: {default_setting} -> {default_sampling}",
            file=sys.stderr,
        )
        names = list(variants)
        runs: dict[str, list[dict]] = {name: [] for name in names}
        mismatched = []
        for round_index in range(rounds):
            data = shards[round_index % opts.shards]
            config = load_config(write_config(tmp_path / "bench.yaml", model_dir, data))
            other = load_config(
                write_config(
                    tmp_path / "other.yaml",
                    model_dir,
                    data,
                    run_name="bench-other",
                    train_sampling_strategy=other_sampling,
                )
            )
            baseline = load_config(
                write_config(tmp_path / "baseline.yaml", model_dir, data, train_sampling_strategy="random")
            )
            # (a)-(c) as their authors run them: rows in random order (TRL's and Trainer's default).
            runners = {
                "padded": lambda baseline=baseline: run_padded(baseline, tmp_path),
                "trl-dynamic": lambda baseline=baseline: run_trl(baseline, tmp_path, packing=False),
                "trl-packing": lambda baseline=baseline: run_trl(baseline, tmp_path, packing=True),
                "babl": lambda config=config: run_babl(config),
                "babl-other": lambda other=other: run_babl(other),
            }
            order = names if round_index % 2 == 0 else list(reversed(names))
            measured = run_round(runners, order)
            for name in names:
                result = measured[name]
                result["shard"] = round_index % opts.shards
                runs[name].append(result)
                print(
                    f"  round {round_index + 1} {name:<12} {result['real_tok_s']:8.0f} real tok/s "
                    f"({result['real_tokens']} real of {result['padded_tokens']} tokens, {result['steps']} steps, "
                    f"{result['seconds']:.1f} s)",
                    file=sys.stderr,
                )
            tokens = {runs[name][-1]["real_tokens"] for name in names}
            if len(tokens) != 1:
                mismatched.append(round_index + 1)

    if mismatched:
        print(
            f"warning: variants trained on different real-token counts in rounds {mismatched}",
            file=sys.stderr,
        )
    median = {name: statistics.median(r["real_tok_s"] for r in results) for name, results in runs.items()}
    pad_share = {
        name: 1 - sum(r["real_tokens"] for r in results) / sum(r["padded_tokens"] for r in results)
        for name, results in runs.items()
    }
    best_other = max(median[n] for n in ("padded", "trl-dynamic", "trl-packing"))
    ratios = {
        "babl_vs_best_of_a_c": median["babl"] / best_other,
        "babl_vs_padded": median["babl"] / median["padded"],
        "babl_vs_other_order": median["babl"] / median["babl-other"],
    }
    table = [
        f"{'variant':<40} {'real tok/s':>11} {'vs (a)':>7} {'padding':>8}",
        *(
            f"{variants[n]:<40} {median[n]:>11.0f} {median[n] / median['padded']:>6.2f}x {100 * pad_share[n]:>7.0f}%"
            for n in names
        ),
        "",
        f"(d) / best of (a)-(c): {ratios['babl_vs_best_of_a_c']:.2f}x (goal >= 1.0)   "
        f"(d) / (a): {ratios['babl_vs_padded']:.2f}x (goal >= 1.3)   (d) / (e): {ratios['babl_vs_other_order']:.2f}x",
        f"(d) is the causal recipe's {runs['babl'][0]['trainer']} with train_sampling_strategy="
        f"{runs['babl'][0]['sampling']} (setting: {default_setting}) on cpu; medians of {rounds} alternating "
        f"rounds; {time.perf_counter() - started:.0f} s in all",
    ]
    print("\n".join(table))
    report = {
        "setup": {
            "model": "Llama 4 layers x 256 (intermediate 512, 4 heads, 2 KV heads), random weights",
            "parameters": params,
            "lora": "r 16, alpha 32, dropout 0.05, q/k/v/o",
            "samples": opts.samples,
            "words": [min(words), max(words)],
            "shards": opts.shards,
            "rounds": rounds,
            "batch": BATCH,
            "max_length": MAX_LENGTH,
            "device": "cpu",
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "default_train_sampling_strategy": f"{default_setting} -> {default_sampling}",
            "command": " ".join(["python", "bench/finetune.py", *sys.argv[1:]]),
        },
        "variants": variants,
        "runs": runs,
        "median_real_tok_s": median,
        "padding_share": pad_share,
        "ratios": ratios,
        "goals_met": ratios["babl_vs_best_of_a_c"] >= 1.0 and ratios["babl_vs_padded"] >= 1.3,
    }
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {settings_free_path(out)}", file=sys.stderr)
    return 0


def settings_free_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    sys.exit(main())
