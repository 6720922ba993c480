"""Fine-tuning for Babl: data formatting, LoRA/QLoRA and T5 recipes, evaluation, merging, and a CLI.

Trained adapters land in `models/adapters/<run-name>/` where the app's catalog discovers them.
`finetune/samples/` holds small data sets written by us in the public sets' columns, so every
recipe runs offline.
"""
