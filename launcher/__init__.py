"""Wiring: run config -> preflight -> engine -> loop -> logging -> checkpoints -> export.

`config` (the typed run config), `factory` (the run's RTDModel), `runs` (reading a run
directory), `pretrain.py` (the entry script), `demo`, `analyze`; packages `train` and `hf`.
docs/architecture.md has the data flow and the package map.
"""
