"""Train a sentencepiece unigram tokenizer with DeBERTaV3 ids on alpha-sampled text.

    python -m data_pipeline.train_tokenizer --input data/cc100-sample --vocab-size 8000 --out DIR

Languages are weighted q_l ~ n_l^alpha (alpha 0.3, as XLM-R / mDeBERTa), with n_l the input's
size in bytes on disk (a directory input's files together; known without reading the file,
which matters for 2.5 TB of CC100: a compressed input weighs what it weighs compressed). Any
input format of data_pipeline/formats.py is read the same way (the first records). Each
language contributes round(budget * q_l) paragraphs, read from the start of its file (fewer if
the file is shorter). Paragraphs are normalized as Hugging Face normalizes them
(`tokenizer.normalize_text`) and the model uses the identity rule, so the vocabulary is
learned on exactly the text the encoder sees.

Writes DIR/spm.model and DIR/tokenizer_meta.json (settings, per-language sample counts,
the model's sha256).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as spm_pb2
from tqdm import tqdm

from data_pipeline.corpus import DEFAULT_MAX_PARAGRAPH_CHARS, CorpusError, ReadStats
from data_pipeline.formats import (
    ReadOptions,
    add_read_arguments,
    discover_inputs,
    read_document_pieces,
    read_options,
)
from data_pipeline.mixing import language_weights, largest_remainder
from data_pipeline.tokenizer import (
    HF_CONFIG_NAME,
    META_NAME,
    MODEL_NAME,
    SPECIAL_PIECES,
    file_sha256,
    load_tokenizer_dir,
    normalize_text,
    quantize_scores,
)

MAX_SENTENCE_CHARS = 1000  # longer paragraphs are cut for training only


def _sample_paragraphs(inp, count: int, stats: ReadStats) -> Iterator[str]:
    """The first `count` non-empty normalized paragraphs of a file, in order. Read in pieces
    (`read_document_pieces`): never more than a piece of one document in memory, however
    long its lines or documents, and reading stops once `count` are taken."""
    taken = 0
    for piece in read_document_pieces(inp, stats, DEFAULT_MAX_PARAGRAPH_CHARS):
        for para in piece.paragraphs:
            text = normalize_text(para)[:MAX_SENTENCE_CHARS]
            if text:
                yield text
                taken += 1
                if taken >= count:
                    return


def trainer_settings(vocab_size: int, character_coverage: float) -> dict:
    """Sentencepiece trainer options (recorded in tokenizer_meta.json)."""
    return dict(
        model_type="unigram",
        vocab_size=vocab_size,
        character_coverage=character_coverage,
        byte_fallback=True,
        normalization_rule_name="identity",  # text is normalized as Hugging Face does
        remove_extra_whitespaces=True,
        add_dummy_prefix=True,
        split_digits=False,
        max_sentence_length=4 * MAX_SENTENCE_CHARS + 16,
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        pad_piece=SPECIAL_PIECES["pad"],
        bos_piece=SPECIAL_PIECES["cls"],
        eos_piece=SPECIAL_PIECES["sep"],
        unk_piece=SPECIAL_PIECES["unk"],
        user_defined_symbols=[SPECIAL_PIECES["mask"]],
    )


def sample_texts(files, budget: np.ndarray, progress: bool) -> tuple[list[str], dict[str, int]]:
    """budget[l] normalized paragraphs from the start of each file; also the counts taken."""
    texts: list[str] = []
    counts: dict[str, int] = {}
    with tqdm(total=int(budget.sum()), unit="sent", desc="sampling", disable=not progress) as bar:
        for inp, n in zip(files, budget, strict=True):
            before = len(texts)
            for text in _sample_paragraphs(inp, int(n), ReadStats()):
                texts.append(text)
                bar.update(1)
            counts[inp.language] = len(texts) - before
    if not texts:
        raise CorpusError(f"no text found in {', '.join(str(f.path) for f in files)}")
    return texts, counts


def _train_model(texts: list[str], settings: dict, out_dir: Path, seed: int, progress: bool):
    spm.set_random_generator_seed(seed)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        with tqdm(total=1, desc="training", unit="model", disable=not progress) as bar:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(texts),
                model_prefix=os.path.join(tmp, "spm"),
                num_threads=1,  # reproducible bytes
                minloglevel=2,
                **settings,
            )
            bar.update(1)
        proto = spm_pb2.ModelProto()
        proto.ParseFromString(Path(tmp, "spm.model").read_bytes())
        proto.trainer_spec.model_prefix = "spm"  # not the temporary path: reproducible bytes
        quantize_scores(proto)  # exact Viterbi sums: ties break as in Hugging Face
        Path(tmp, "spm.model").write_bytes(proto.SerializeToString())
        os.replace(os.path.join(tmp, "spm.model"), out_dir / MODEL_NAME)


def train_tokenizer(
    inputs: list[str],
    out_dir: str | Path,
    vocab_size: int = 8000,
    sentences: int = 30_000,
    alpha: float = 0.3,
    character_coverage: float = 0.9999,
    seed: int = 0,
    progress: bool = True,
    options: ReadOptions | None = None,
) -> dict:
    """Train and write DIR/spm.model, tokenizer_meta.json and tokenizer_config.json.

    Returns the meta dict (settings, per-language sample counts, sha256 of spm.model).
    """
    files = discover_inputs(inputs, options)
    if vocab_size < 300:
        raise ValueError(f"--vocab-size {vocab_size} is too small (byte pieces alone take 256)")
    q = language_weights(np.array([f.size for f in files], dtype=np.float64), alpha)
    texts, counts = sample_texts(files, largest_remainder(q, sentences), progress)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = trainer_settings(vocab_size, character_coverage)
    t0 = time.perf_counter()
    _train_model(texts, settings, out_dir, seed, progress)
    meta = {
        "format_version": 1,
        "sha256": file_sha256(out_dir / MODEL_NAME),
        "settings": settings,
        "score_grid": "multiples of 1/16 (tokenizer.quantize_scores)",
        "alpha": alpha,
        "sentence_budget": sentences,
        "samples_per_language": counts,
        "inputs": {f.language: {"file": f.path.name, "bytes": f.size} for f in files},
        "train_seconds": round(time.perf_counter() - t0, 2),
    }
    write_hf_config(out_dir)
    tmp_meta = out_dir / (META_NAME + ".tmp")
    tmp_meta.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    os.replace(tmp_meta, out_dir / META_NAME)
    return meta


def write_hf_config(out_dir: Path) -> None:
    """tokenizer_config.json so `AutoTokenizer.from_pretrained(DIR)` picks DebertaV2Tokenizer."""
    config = {
        "tokenizer_class": "DebertaV2Tokenizer",
        "do_lower_case": False,
        "split_by_punct": False,
        "add_prefix_space": True,
        **{f"{k}_token": v for k, v in SPECIAL_PIECES.items()},
        "bos_token": SPECIAL_PIECES["cls"],
        "eos_token": SPECIAL_PIECES["sep"],
    }
    (out_dir / HF_CONFIG_NAME).write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m data_pipeline.train_tokenizer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_read_arguments(ap)
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--sentences", type=int, default=30_000, help="paragraph budget")
    ap.add_argument("--alpha", type=float, default=0.3, help="language weighting n^alpha")
    ap.add_argument("--character-coverage", type=float, default=0.9999)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        meta = train_tokenizer(
            args.input,
            args.out,
            vocab_size=args.vocab_size,
            sentences=args.sentences,
            alpha=args.alpha,
            character_coverage=args.character_coverage,
            seed=args.seed,
            options=read_options(args),
        )
    except (CorpusError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = load_tokenizer_dir(args.out)
    counts = meta["samples_per_language"]
    print(
        f"tokenizer: {info.model_path} vocab {info.vocab_size} sha256 {info.sha256[:16]} "
        f"special {info.special_ids}\n"
        f"trained on {sum(counts.values())} paragraphs in {meta['train_seconds']} s: "
        + " ".join(f"{k}={v}" for k, v in counts.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
