"""The article's training recipe on the ecosystem's tools (`datasets`, `Trainer`, TRL, PEFT, accelerate, `evaluate`).

Stages (each a module with `main(argv)`, run as `llama-hybrid train STAGE`): `clean`, `pretrain`, `self_train`,
`augment`, `sft`, and `pipeline` (all of them end to end). `evaluation` holds perplexity (sliding window, Trainer
`compute_metrics` wiring), `perplexity_metric.py` is the offline `evaluate` module, `plot` draws loss curves. See
docs/training.md.
"""
