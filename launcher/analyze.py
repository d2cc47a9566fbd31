"""The paper's embedding analysis: average pairwise cosine similarity of the generator's (E_G)
and the discriminator's (E_D) word embeddings over the most frequent tokens (He, Gao, Chen,
arXiv 2111.09543, section 5: under ES the two tables are one, under NES the generator's
vectors are much more alike than the discriminator's, GDES sits between).

    python -m launcher.analyze --run RUN_DIR [--run RUN2 ...] [--export DIR ...] \
        [--step N] [--top 100,500,1000] [--out DIR]

For a run, the checkpoint is consolidated as for an export (`launcher.runs`; GDES:
E_D = E_G + E_delta);
for an export, OUT/{generator,discriminator}/model.safetensors are read. Token frequencies
are counted over the run's shards (`--shards DIR` for an export); without shards, token ids
in spm.model order are used (sentencepiece sorts pieces by score, a rough frequency order),
and the table says so. Special tokens and never-seen ids are left out.

Writes OUT/embedding_similarity.{md,json,png}: per model and top-k, avg pairwise cosine of
E_G and of E_D, and the mean cosine between E_G and E_D of the same token.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from safetensors.torch import load_file

from data_pipeline.manifest import load_manifest
from launcher.hf.export import EXPORT_META
from launcher.hf.mapping import WORD
from launcher.runs import RunError, load_checkpoint_weights, load_run

DEFAULT_TOP = (100, 500, 1000)


@dataclass
class Embeddings:
    label: str
    sharing: str
    step: int
    e_g: torch.Tensor  # (V, H)
    e_d: torch.Tensor  # (V, H)
    special_ids: list[int]
    shards_dir: Path | None
    vocab_size: int  # tokenizer's (rows beyond it are padding)


@dataclass
class Row:
    label: str
    sharing: str
    step: int
    top_k: int
    cos_g: float  # avg pairwise cosine of E_G over the top-k tokens
    cos_d: float  # same for E_D
    cos_g_d: float  # mean cosine(E_G[t], E_D[t]) over the same tokens
    frequency: str  # "shards" or "spm order"


# -- loading -------------------------------------------------------------------------------
def from_run(run_dir: str | Path, step: int | None = None, label: str | None = None):
    w = load_checkpoint_weights(run_dir, step)
    run = w.run
    return Embeddings(
        label=label or run.run_dir.name,
        sharing=w.model.sharing,
        step=w.step,
        e_g=w.parts["generator"][f"deberta.{WORD}"],
        e_d=w.parts["discriminator"][WORD],
        special_ids=sorted(run.tokenizer.special_ids.values()),
        shards_dir=run.manifest.root if run.manifest is not None else None,
        vocab_size=run.tokenizer.vocab_size,
    )


def from_export(out_dir: str | Path, shards_dir: str | Path | None = None, label=None):
    out_dir = Path(out_dir)
    meta_path = out_dir / EXPORT_META
    if not meta_path.is_file():
        raise RunError(f"{out_dir}: no {EXPORT_META} (not an rtdspeed export)")
    meta = json.loads(meta_path.read_text())
    if shards_dir is None and (Path(meta["run"]) / "config.toml").is_file():
        with contextlib.suppress(RunError):  # the run's shards, if still there
            manifest = load_run(meta["run"]).manifest
            shards_dir = manifest.root if manifest is not None else None
    return Embeddings(
        label=label or out_dir.name,
        sharing=meta["sharing"],
        step=meta["step"],
        e_g=load_file(str(out_dir / "generator" / "model.safetensors"))[f"deberta.{WORD}"],
        e_d=load_file(str(out_dir / "discriminator" / "model.safetensors"))[WORD],
        special_ids=sorted(meta["special_ids"].values()),
        shards_dir=Path(shards_dir) if shards_dir else None,
        vocab_size=meta["tokenizer_vocab_size"],
    )


def token_counts(shards_dir: Path, vocab_size: int) -> np.ndarray:
    """Occurrences of every id over all rows of the shard directory: (V,) int64."""
    m = load_manifest(shards_dir, check_files=False)
    counts = np.zeros(vocab_size, dtype=np.int64)
    for shard in m.shards:
        with pa.memory_map(str(m.shard_path(shard))) as mm:
            reader = pa.ipc.open_file(mm)
            for i in range(reader.num_record_batches):
                ids = reader.get_batch(i).column("input_ids").values.to_numpy()
                counts += np.bincount(ids, minlength=vocab_size)[:vocab_size]
    return counts


# -- the measure ---------------------------------------------------------------------------
def avg_pairwise_cosine(e: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean of cos(e_i, e_j) over pairs i != j of `ids`: (|sum u|^2 - k) / (k (k - 1))."""
    u = torch.nn.functional.normalize(e[ids].double(), dim=-1)  # (k, H)
    k = len(ids)
    return ((u.sum(0).square().sum() - k) / (k * (k - 1))).item()


def ranked_tokens(emb: Embeddings) -> tuple[torch.Tensor, str]:
    """Token ids, most frequent first, without specials, and how the order was obtained."""
    if emb.shards_dir is not None and (Path(emb.shards_dir) / "manifest.json").is_file():
        counts = token_counts(Path(emb.shards_dir), emb.vocab_size)
        counts[emb.special_ids] = 0
        order = np.argsort(-counts, kind="stable")
        return torch.from_numpy(order[counts[order] > 0].copy()), "shards"
    keep = [i for i in range(emb.vocab_size) if i not in set(emb.special_ids)]
    return torch.tensor(keep), "spm order"


def analyze(emb: Embeddings, top: tuple[int, ...] = DEFAULT_TOP) -> list[Row]:
    ranked, source = ranked_tokens(emb)
    rows = []
    for k in top:
        ids = ranked[: min(k, len(ranked))]
        same = torch.nn.functional.cosine_similarity(emb.e_g[ids].double(), emb.e_d[ids].double())
        rows.append(
            Row(
                label=emb.label,
                sharing=emb.sharing,
                step=emb.step,
                top_k=len(ids),
                cos_g=avg_pairwise_cosine(emb.e_g, ids),
                cos_d=avg_pairwise_cosine(emb.e_d, ids),
                cos_g_d=same.mean().item(),
                frequency=source,
            )
        )
    return rows


# -- output --------------------------------------------------------------------------------
def table(rows: list[Row]) -> str:
    lines = [
        "| model | sharing | step | top-k | avg cos E_G | avg cos E_D | cos(E_G, E_D) | freq |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    lines += [
        f"| {r.label} | {r.sharing} | {r.step} | {r.top_k} | {r.cos_g:.4f} | {r.cos_d:.4f} | "
        f"{r.cos_g_d:.4f} | {r.frequency} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: Path) -> None:
    # lazy: matplotlib costs about a second to import and only the plot needs it; its
    # backend must be chosen before pyplot is imported
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r.label for r in rows))
    fig, (ax_k, ax_bar) = plt.subplots(1, 2, figsize=(11, 4))
    for i, label in enumerate(labels):
        mine = [r for r in rows if r.label == label]
        color = f"C{i}"
        ks = [r.top_k for r in mine]
        ax_k.plot(ks, [r.cos_g for r in mine], "-o", color=color, label=f"{label} E_G")
        ax_k.plot(ks, [r.cos_d for r in mine], "--s", color=color, label=f"{label} E_D")
    ax_k.set(xscale="log", xlabel="top-k most frequent tokens", ylabel="avg pairwise cosine")
    ax_k.legend(fontsize=7)
    last = {label: [r for r in rows if r.label == label][-1] for label in labels}
    x = np.arange(len(labels))
    ax_bar.bar(x - 0.2, [last[lb].cos_g for lb in labels], 0.4, label="E_G (generator)")
    ax_bar.bar(x + 0.2, [last[lb].cos_d for lb in labels], 0.4, label="E_D (discriminator)")
    ax_bar.set_xticks(x, [f"{lb}\n(top {last[lb].top_k})" for lb in labels])
    ax_bar.set(ylabel="avg pairwise cosine")
    ax_bar.legend(fontsize=8)
    fig.suptitle("Word embedding similarity (DeBERTaV3 section 5)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(rows: list[Row], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"embedding_similarity.{ext}" for ext in ("md", "json", "png")}
    paths["md"].write_text(table(rows))
    paths["json"].write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    plot(rows, paths["png"])
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m launcher.analyze", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--run", action="append", default=[], help="run directory (repeatable)")
    ap.add_argument("--export", action="append", default=[], help="export directory (repeatable)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step of --run (newest)")
    ap.add_argument("--shards", default=None, help="shard dir for token frequencies of --export")
    ap.add_argument("--top", default=",".join(map(str, DEFAULT_TOP)), help="top-k list")
    ap.add_argument("--out", default=None, help="output dir (default: the first run/export)")
    args = ap.parse_args(argv)
    if not args.run and not args.export:
        ap.error("give at least one --run or --export")
    top = tuple(int(k) for k in args.top.split(","))
    try:
        embs = [from_run(r, args.step) for r in args.run]
        embs += [from_export(e, args.shards) for e in args.export]
    except RunError as e:
        print(f"rtdspeed analyze: error: {e}", file=sys.stderr)
        return 2
    rows = [row for emb in embs for row in analyze(emb, top)]
    out = Path(args.out) if args.out else Path((args.run or args.export)[0]) / "analysis"
    paths = write_outputs(rows, out)
    print(table(rows), end="")
    print(f"wrote {paths['md']}, {paths['json']} and {paths['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
