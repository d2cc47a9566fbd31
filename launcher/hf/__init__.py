"""Hugging Face interop: export a run's checkpoint to DebertaV2 directories
(`python -m launcher.hf.export`), initialise a run from such directories or a released
DeBERTaV3 (`import_weights`, `--init.from_dir`), the parameter-name mapping both ways
(`mapping`), and an export's tokenizer files and model card.
"""
