"""Runnable recipes, one per model kind, each read top to bottom: setup → train → save.

`causal_lm` trains LoRA/QLoRA adapters on decoder-only models (seeds 001 and 002); `seq2seq_lm` trains
T5 (seeds 000, 003, 004). They share the library parts (`finetune.config`, `data`, `factories`,
`outputs`) and are otherwise kept separate and linear on purpose: adapting one never breaks the other.
"""

from __future__ import annotations

from finetune.outputs import TrainResult


def run_training(config) -> TrainResult:
    """Train with the recipe for the config's model kind (causal or seq2seq).

    Before anything loads, the run name is taken (`outputs.run_lock`; another process training the
    same name raises `outputs.RunInProgress`) and the data set is read, so an empty or unreadable file
    is one `DataError`, not a traceback after the base model loaded.
    """
    from finetune import outputs
    from finetune.data import load_split

    with outputs.run_lock(config):
        load_split(config)
        if config.model.kind == "seq2seq":
            from finetune.recipes import seq2seq_lm as recipe
        else:
            from finetune.recipes import causal_lm as recipe
        return recipe.train(config)
