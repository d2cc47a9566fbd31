"""Export a DeepSpeed checkpoint of an RTD run to Hugging Face directories.

    python -m launcher.hf.export --run RUN_DIR [--step N] --out OUT

Reads `RUN_DIR/config.toml` (preset, vocabulary, sharing mode, data paths) and the newest
complete checkpoint `RUN_DIR/checkpoints/step_XXXXXXXX/` (or step N), consolidated
(`launcher.runs`; names mapped by `launcher.hf.mapping`). Writes, safetensors only:

    OUT/discriminator/  DebertaV2Model: config.json, model.safetensors (word embedding
                        E_D = E_G + E_delta under GDES), rtd_head.safetensors (the RTD head,
                        so pretraining can continue from the export), tokenizer, README.md
    OUT/generator/      DebertaV2ForMaskedLM (legacy `cls.predictions.*` head, "legacy": true):
                        config.json, model.safetensors, tokenizer, README.md
    OUT/rtdspeed_export.json   run, step, sharing mode, special ids, tokenizer hash

Tokenizer files in both: spm.model, tokenizer.json (the pipeline's exact encoding, see
`launcher.hf.tokenizer`), tokenizer_config.json, special_tokens_map.json. `OUT` is written
to a temporary sibling and renamed when complete; an existing `OUT` needs `--force`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from launcher.hf.model_card import model_card
from launcher.hf.tokenizer import write_tokenizer_files
from launcher.runs import CheckpointWeights, RunError, load_checkpoint_weights

EXPORT_META = "rtdspeed_export.json"
RTD_HEAD_FILE = "rtd_head.safetensors"
WEIGHTS_FILE = "model.safetensors"


def hf_configs(model) -> dict[str, dict]:
    """config.json of both directories: every DeBERTaV3 field, model_type deberta-v2."""
    disc = {"architectures": ["DebertaV2Model"], **model.config.to_hf_dict()}
    gen = {
        "architectures": ["DebertaV2ForMaskedLM"],
        **model.config.generator_config().to_hf_dict(),
    }
    gen["legacy"] = True  # cls.predictions.* head: loads the same in transformers 4.46 .. 5.x
    return {"discriminator": disc, "generator": gen}


class ExportError(RunError):
    """A problem with the export's output directory."""


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict) -> None:
    # clone: tied entries (generator decoder = word embedding) must not share storage
    owned = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in tensors.items()}
    save_file(owned, str(path), metadata={"format": "pt", **metadata})


# -- export --------------------------------------------------------------------------------
def _write_dirs(tmp: Path, w: CheckpointWeights, meta: dict) -> None:
    run, model, client = w.run, w.model, w.client_state()
    configs = hf_configs(model)
    st_meta = {"rtdspeed_step": str(w.step), "rtdspeed_sharing": model.sharing}
    for name in ("discriminator", "generator"):
        d = tmp / name
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(configs[name], indent=2, sort_keys=True) + "\n")
        save_safetensors(w.parts[name], d / WEIGHTS_FILE, st_meta)
        write_tokenizer_files(run.tokenizer, d, model.config.max_position_embeddings)
        (d / "README.md").write_text(model_card(name, run, w.step, configs[name], client, meta))
    save_safetensors(w.parts["rtd_head"], tmp / "discriminator" / RTD_HEAD_FILE, st_meta)
    (tmp / EXPORT_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def export(
    run_dir: str | Path,
    out: str | Path,
    step: int | None = None,
    tokenizer_dir: str | None = None,
    force: bool = False,
) -> Path:
    """Export one checkpoint of `run_dir` into `out`; returns `out`."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise ExportError(f"--out {out} exists and is not empty; use --force to replace it")
    w = load_checkpoint_weights(run_dir, step, tokenizer_dir)
    tok, model = w.run.tokenizer, w.model
    meta = {
        "run": str(w.run.run_dir.resolve()),
        "step": w.step,
        "sharing": model.sharing,
        "special_ids": dict(tok.special_ids),
        "tokenizer_vocab_size": tok.vocab_size,
        "tokenizer_sha256": tok.sha256,
        "mask_prob": model.mask_prob,
        "rtd_weight": model.rtd_weight,
        "rtd_head": f"discriminator/{RTD_HEAD_FILE}",
    }
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_dirs(tmp, w, meta)
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m launcher.hf.export",
        description="Export a DeepSpeed checkpoint of an RTD run to Hugging Face directories.",
    )
    ap.add_argument("--run", required=True, help="run directory (has config.toml, checkpoints/)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--tokenizer", default=None, help="tokenizer dir, if not the run's")
    ap.add_argument("--force", action="store_true", help="replace an existing --out")
    args = ap.parse_args(argv)
    try:
        out = export(args.run, args.out, args.step, args.tokenizer, args.force)
    except RunError as e:
        print(f"rtdspeed export: error: {e}", file=sys.stderr)
        return 2
    print(f"rtdspeed export: wrote {out}/discriminator and {out}/generator")
    return 0


if __name__ == "__main__":
    sys.exit(main())
