"""Training: preflight, the DeepSpeed engine, the loop, checkpoints, metrics, ranks.

Entry: `launcher/pretrain.py` (any launcher) -> `launcher.train.main.main`. Map of the whole
project: docs/architecture.md.
"""
