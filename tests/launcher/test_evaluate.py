"""Held-out evaluation: exact AUC, reproducible per-language figures, training untouched, and
the messages for a missing or foreign validation split."""

from __future__ import annotations

import itertools
import json
import math
import shutil

import numpy as np
import pytest
import torch

from data_pipeline.tokenizer import load_tokenizer_dir
from launcher.config import EvalSection, ModelSection
from launcher.evaluate import EvalError, auc, eval_set, evaluate, load_validation, valid_dir
from launcher.factory import build_model


def brute_force_auc(scores, labels):
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auc_is_the_pairwise_probability_with_ties_counted_half(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, 300).astype(float)  # many ties
    labels = rng.random(300) < 0.3
    assert auc(scores, labels) == pytest.approx(brute_force_auc(scores, labels), abs=1e-12)
    scores = rng.normal(size=200) + labels[:200]  # informative, no ties
    assert auc(scores, labels[:200]) == pytest.approx(brute_force_auc(scores, labels[:200]))
    assert auc(scores, labels[:200]) > 0.6
    assert math.isnan(auc(scores, np.zeros(200, dtype=bool)))


@pytest.fixture
def with_valid(tmp_path, shards_dir):
    """A shard directory whose validation split is a copy of the test shards."""
    root = tmp_path / "shards"
    shutil.copytree(shards_dir, root)
    if not valid_dir(root).is_dir():
        shutil.copytree(shards_dir, valid_dir(root))
    return root


def test_evaluation_is_reproducible_per_language_and_leaves_training_untouched(
    with_valid, tokenizer_dir
):
    tok = load_tokenizer_dir(tokenizer_dir)
    model = build_model(ModelSection(preset="tiny", dropout=0.1), 0, tok)
    settings = EvalSection(max_samples_per_language=6, batch_size=4)
    data = eval_set(load_validation(with_valid, tok.sha256), settings)
    assert len(set(data.lang.tolist())) == len(data.languages) and len(data.lang) <= 6 * 12
    rng_before = torch.get_rng_state()
    first = evaluate(model, data, mask_seed=0)
    assert model.training and torch.equal(torch.get_rng_state(), rng_before)
    assert first == evaluate(model, data, mask_seed=0)  # same figures, bit for bit
    other = evaluate(model, data, mask_seed=1)
    assert other["all"]["mlm_loss"] != first["all"]["mlm_loss"]  # the seed does decide
    assert set(first) == {"all", *data.languages}
    per_lang = sum(first[lang]["tokens"] for lang in data.languages)
    assert per_lang == first["all"]["tokens"] == float((data.input_ids != 0).sum())
    a = first["all"]
    assert 0 < a["replaced_frac"] < 1 and a["prior_acc"] == pytest.approx(1 - a["replaced_frac"])
    assert 0 <= a["disc_auc"] <= 1 and a["mlm_loss"] > 0 and a["masked"] > 0
    json.dumps(first)  # loggable as is


def test_missing_or_foreign_validation_split_is_explained(tmp_path, shards_dir, tokenizer_dir):
    tok = load_tokenizer_dir(tokenizer_dir)
    bare = tmp_path / "bare"
    shutil.copytree(shards_dir, bare, ignore=shutil.ignore_patterns("valid"))
    with pytest.raises(EvalError, match=r"has no validation split .*--eval.every_steps=0"):
        load_validation(bare, tok.sha256)
    shutil.copytree(shards_dir, valid_dir(bare))
    with pytest.raises(
        EvalError, match=r"different tokenizer \(shards: sha256 \w+, tokenizer: 0{12}"
    ):
        load_validation(bare, "0" * 64)
