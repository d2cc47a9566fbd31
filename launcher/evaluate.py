"""Held-out evaluation: ELECTRA's pretraining metrics on a shard directory's validation split,
overall and per language, during training and on any checkpoint or export.

    python -m launcher.evaluate --run RUN_DIR [--step N] [--shards SHARDS] [--json OUT.json]
    python -m launcher.evaluate --export EXPORT_DIR --shards SHARDS [--json OUT.json]

The validation split is `SHARDS/valid/`, a shard directory of its own (manifest and Arrow
shards) that `data_pipeline.build_shards` writes beside the training shards from documents it
sets aside. The eval set is the first `eval.max_samples_per_language` rows of each language
(manifest order), cut into batches of `eval.batch_size` rows: a sequence fixed by the
manifest alone. Batch b is evaluated by rank b % world_size with masking and sampling seeded
by (eval.mask_seed, b), dropout off; the per-token results are gathered in batch order, so a
checkpoint gives the same figures on any number of ranks, in the loop and here.

Metrics (ELECTRA's `run_pretraining.py` names in brackets): mlm_loss [masked_lm_loss] and
mlm_acc [masked_lm_accuracy] over masked tokens; sampled_acc [sampled_masked_lm_accuracy]:
the generator's sample equals the original; disc_loss, disc_acc, disc_precision, disc_recall,
disc_auc (exact: Mann-Whitney over all real tokens, ties counted half) over every real
token; replaced_frac; and the baselines that know only the replaced fraction p: prior_loss
(binary entropy of p) and prior_acc (1 - p).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
import torch.nn.functional as F

from data_pipeline.manifest import Manifest, tokenizer_mismatch
from data_pipeline.remote import RemoteError, join
from launcher.config import DataSection, EvalSection
from launcher.data import open_cache, open_manifest
from launcher.factory import build_model
from launcher.hf.import_weights import InitError, init_from_hf
from launcher.runs import RunError, consolidated_state_dict, load_run, select_checkpoint
from model import DebertaV3Config, RTDModel, SpecialTokens

VALID_DIR = "valid"
METRICS = (
    "mlm_loss",
    "mlm_acc",
    "sampled_acc",
    "disc_loss",
    "disc_acc",
    "disc_precision",
    "disc_recall",
    "disc_auc",
    "replaced_frac",
    "prior_loss",
    "prior_acc",
)


class EvalError(RuntimeError):
    """No usable validation split; the message says how to get one."""


def valid_dir(shards_dir: str | Path) -> str | Path:
    return join(shards_dir, VALID_DIR)


def load_validation(
    shards_dir: str | Path, tokenizer_sha256: str, data: DataSection | None = None
) -> Manifest:
    """The validation split of a shard directory (or s3:// location; `data`: its cache
    settings), built with this tokenizer."""
    path = valid_dir(shards_dir)
    try:
        manifest = open_manifest(data or DataSection(), str(path))
    except FileNotFoundError:
        raise EvalError(
            f"{shards_dir} has no validation split ({path}/manifest.json); rebuild the shards "
            "with data_pipeline.build_shards (it sets documents aside by default, "
            "--valid-fraction), or turn evaluation off with --eval.every_steps=0"
        ) from None
    if hashes := tokenizer_mismatch(manifest, tokenizer_sha256):
        raise EvalError(f"{path} was built with a different tokenizer {hashes}")
    if not sum(manifest.rows_per_language().values()):
        raise EvalError(f"{path}: the validation split has no rows")
    return manifest


@dataclass(frozen=True)
class EvalSet:
    """The fixed evaluation sequence: rows and their language indices, in batches."""

    languages: list[str]
    input_ids: np.ndarray  # (n, seq_len) int32
    lang: np.ndarray  # (n,) int64
    batch_size: int

    @property
    def num_batches(self) -> int:
        return -(-len(self.lang) // self.batch_size)

    def batch(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        rows = slice(b * self.batch_size, (b + 1) * self.batch_size)
        return self.input_ids[rows], self.lang[rows]


def eval_set(manifest: Manifest, settings: EvalSection, data: DataSection | None = None) -> EvalSet:
    """The first `max_samples_per_language` rows of each language, in manifest order (a
    remote split's shards downloaded through the node's cache, `data`'s settings)."""
    cache = open_cache(manifest, data or DataSection(), prefetch=False)
    try:
        return _eval_rows(manifest, settings, cache)
    finally:
        if cache is not None:
            cache.close()


def _eval_rows(manifest: Manifest, settings: EvalSection, cache) -> EvalSet:
    ids, langs = [], []
    for li, lang in enumerate(manifest.languages):
        need = settings.max_samples_per_language
        for i, shard in enumerate(manifest.shards):
            if shard.language != lang:
                continue
            if need <= 0:
                break
            path = cache.path(i) if cache is not None else manifest.shard_path(shard)
            with pa.memory_map(str(path)) as mm:
                batch = pa.ipc.open_file(mm).get_batch(0)
                rows = batch.column(0).values.to_numpy().reshape(-1, manifest.seq_len)[:need]
                ids.append(rows.copy())
            langs.append(np.full(len(rows), li, dtype=np.int64))
            need -= len(rows)
    return EvalSet(
        list(manifest.languages),
        np.concatenate(ids).astype(np.int32),
        np.concatenate(langs),
        settings.batch_size,
    )


def _batch_tokens(model: RTDModel, ids: np.ndarray, lang: np.ndarray, seed: int) -> dict:
    """Per-token results of one batch as numpy arrays (languages attached)."""
    device = next(model.parameters()).device
    input_ids = torch.from_numpy(ids).to(device=device, dtype=torch.long)
    mask = input_ids != model.special.pad_id
    generator = torch.Generator(device=device).manual_seed(seed)
    t = model.replaced_token_detection(input_ids, mask, generator)
    row_lang = torch.from_numpy(lang).to(device)[:, None].expand_as(mask)
    return {
        "mlm_loss": t.mlm.row_loss.float().cpu().numpy(),
        "mlm_hit": t.mlm.row_hit.cpu().numpy(),
        "sample_hit": (t.mlm.samples == t.targets).cpu().numpy(),
        "mlm_lang": row_lang[t.masked].cpu().numpy(),
        "rtd_logit": t.rtd_logits[mask].float().cpu().numpy(),
        "replaced": t.replaced[mask].cpu().numpy(),
        "rtd_lang": row_lang[mask].cpu().numpy(),
    }


@torch.no_grad()
def evaluate(model: RTDModel, data: EvalSet, mask_seed: int) -> dict[str, dict[str, float]]:
    """{"all": metrics, "<lang>": metrics, ...}. Call on every rank (a collective when a
    process group exists); the model is put in eval mode and back, the global RNG states
    are restored, so training continues exactly as without evaluation."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            mine = []
            # every rank runs the same number of forwards (ZeRO-3 gathers parameters in them
            # collectively); a rank past the end repeats batch 0 and drops the result
            for b in range(rank, -(-data.num_batches // world) * world, world):
                tokens = _batch_tokens(
                    model, *data.batch(b % data.num_batches), _seed(mask_seed, b)
                )
                if b < data.num_batches:
                    mine.append((b, tokens))
    finally:
        model.train(was_training)
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, mine)
        mine = [item for part in gathered for item in part]
    batches = [tokens for _, tokens in sorted(mine, key=lambda item: item[0])]
    tokens = {k: np.concatenate([t[k] for t in batches]) for k in batches[0]}
    return summarize(tokens, data.languages)


def _seed(mask_seed: int, batch: int) -> int:
    return int(np.random.SeedSequence([mask_seed, batch]).generate_state(1)[0])


def summarize(tokens: dict[str, np.ndarray], languages: list[str]) -> dict[str, dict]:
    """Metrics over all tokens and per language (masked-token arrays are selected by
    `mlm_lang`, real-token arrays by `rtd_lang`)."""
    out = {"all": metrics(tokens)}
    for li, lang in enumerate(languages):
        of_lang = {}
        for k, v in tokens.items():
            by = (
                "mlm_lang" if k in ("mlm_loss", "mlm_hit", "sample_hit", "mlm_lang") else "rtd_lang"
            )
            of_lang[k] = v[tokens[by] == li]
        out[lang] = metrics(of_lang)
    return out


def metrics(t: dict[str, np.ndarray]) -> dict[str, float]:
    logit, label = t["rtd_logit"].astype(np.float64), t["replaced"].astype(bool)
    pred = logit > 0
    tp = float((pred & label).sum())
    p = float(label.mean()) if len(label) else math.nan
    bce = F.binary_cross_entropy_with_logits(
        torch.from_numpy(logit), torch.from_numpy(label.astype(np.float64))
    )
    return {
        "mlm_loss": _mean(t["mlm_loss"]),
        "mlm_acc": _mean(t["mlm_hit"]),
        "sampled_acc": _mean(t["sample_hit"]),
        "disc_loss": float(bce) if len(label) else math.nan,
        "disc_acc": _mean(pred == label),
        "disc_precision": tp / pred.sum() if pred.sum() else math.nan,
        "disc_recall": tp / label.sum() if label.sum() else math.nan,
        "disc_auc": auc(logit, label),
        "replaced_frac": p,
        "prior_loss": _binary_entropy(p),
        "prior_acc": 1.0 - p,
        "tokens": float(len(label)),
        "masked": float(len(t["mlm_loss"])),
    }


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x)) if len(x) else math.nan


def _binary_entropy(p: float) -> float:
    if not 0.0 < p < 1.0:
        return 0.0 if p in (0.0, 1.0) else math.nan
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC, exact: P(score of a positive > score of a negative) + P(tie) / 2, from the
    average ranks of all scores (Mann-Whitney U). NaN when a class is absent."""
    labels = labels.astype(bool)
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        return math.nan
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores), dtype=np.float64)
    ranks[order] = np.arange(1, len(scores) + 1)
    uniq, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    if len(uniq) < len(scores):  # ties share their average rank
        sums = np.bincount(inverse, weights=ranks, minlength=len(uniq))
        ranks = (sums / counts)[inverse]
    u = ranks[labels].sum() - pos * (pos + 1) / 2
    return float(u / (pos * neg))


# -- standalone ----------------------------------------------------------------------------
def model_from_run(run_dir: str, step: int | None):
    """(RTDModel with the checkpoint's fp32 weights, its step, the run's data section (shards
    and cache), the tokenizer hash, the run's eval settings)."""
    run = load_run(run_dir)
    found, tag_dir = select_checkpoint(run.run_dir, step)
    model = build_model(run.cfg.model, run.cfg.run.seed, run.tokenizer)
    model.load_state_dict(consolidated_state_dict(tag_dir), strict=True)
    return model, found, run.cfg.data, run.tokenizer.sha256, run.cfg.eval


def model_from_export(export_dir: str):
    """(RTDModel initialised from an rtdspeed export, its step, tokenizer hash)."""
    root = Path(export_dir)
    meta_path = root / "rtdspeed_export.json"
    if not meta_path.is_file():
        raise RunError(f"{root}: no rtdspeed_export.json (not an rtdspeed export)")
    meta = json.loads(meta_path.read_text())
    cfg = DebertaV3Config.from_hf_dict(
        json.loads((root / "discriminator" / "config.json").read_text())
    )
    ids = meta["special_ids"]
    special = SpecialTokens(
        ids["pad"], ids["cls"], ids["sep"], ids["unk"], ids["mask"], meta["tokenizer_vocab_size"]
    )
    model = RTDModel(cfg, special, meta["sharing"], meta["mask_prob"], meta["rtd_weight"])
    init_from_hf(model, root, tokenizer_sha256=meta["tokenizer_sha256"])
    return model, meta["step"], meta["tokenizer_sha256"]


def table(results: dict[str, dict[str, float]]) -> str:
    cols = ("mlm_loss", "mlm_acc", "sampled_acc", "disc_loss", "disc_acc", "disc_auc")
    cols += ("prior_loss", "prior_acc", "tokens")
    lines = ["| language | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for lang, m in results.items():
        cells = [f"{int(m[c])}" if c == "tokens" else f"{m[c]:.4f}" for c in cols]
        lines.append(f"| {lang} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m launcher.evaluate", description=__doc__.split("\n")[0]
    )
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory: evaluate a checkpoint")
    src.add_argument("--export", help="rtdspeed export directory (discriminator/ generator/)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    ap.add_argument("--shards", default=None, help="shard dir (default: the run's)")
    ap.add_argument(
        "--max-samples-per-language",
        type=int,
        default=None,
        help="rows per language (default: the run's eval.max_samples_per_language)",
    )
    ap.add_argument("--mask-seed", type=int, default=None, help="default: the run's eval.mask_seed")
    ap.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = ap.parse_args(argv)
    try:
        if args.run:
            model, step, data, tok_sha, settings = model_from_run(args.run, args.step)
        else:
            model, step, tok_sha = model_from_export(args.export)
            data, settings = DataSection(), EvalSection()
        shards = args.shards or data.shards_dir
        if not shards:
            raise EvalError("--shards is needed with --export")
        shards = str(shards)
        if args.max_samples_per_language is not None:
            settings.max_samples_per_language = args.max_samples_per_language
        seed = settings.mask_seed if args.mask_seed is None else args.mask_seed
        rows = eval_set(load_validation(shards, tok_sha, data), settings, data)
    except (RunError, EvalError, InitError, ValueError, OSError, RemoteError) as e:
        print(f"rtdspeed evaluate: error: {e}", file=sys.stderr)
        return 2
    results = evaluate(model, rows, seed)
    print(f"step {step}, {len(rows.lang)} rows of {valid_dir(shards)}, mask seed {seed}\n")
    print(table(results), end="")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        payload = {"step": step, "shards": str(shards), "mask_seed": seed, "metrics": results}
        Path(args.json).write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
