"""ShardStream: a deterministic, elastic, resumable, language-mixed global sample order."""

import itertools
import re

import numpy as np
import pytest

from data_pipeline.manifest import load_manifest
from data_pipeline.mixing import language_weights, largest_remainder
from data_pipeline.permutation import derive_key, permute
from data_pipeline.stream import ShardStream


def _take(it, n):
    return list(itertools.islice(it, n))


def _global_sequence(stream, world, steps, G=16, m=2, start=0):
    """Sample indices and ids of `steps` global batches, reassembled from all ranks."""
    per_rank = G // (world * m)
    iters = [stream.rank_batches(start, G, m, r, world) for r in range(world)]
    index, ids = [], []
    for _ in range(steps):
        for it in iters:  # rank order = sample order inside a global batch
            for b in _take(it, per_rank):
                index.append(b.sample_index)
                ids.append(b.input_ids)
    return np.concatenate(index), np.concatenate(ids)


def test_batch_layout_and_types(shards_dir):
    s = ShardStream.open(shards_dir)
    b0, b1, b2 = _take(s.rank_batches(100, global_batch_size=12, micro_batch_size=3,
                                      rank=1, world_size=2), 3)  # fmt: skip
    assert b0.input_ids.dtype == np.int32 and b0.input_ids.shape == (3, 128)
    assert b0.lang.dtype == np.int16 and b0.sample_index.dtype == np.int64
    # rank 1 of 2 takes samples 6..11 of each global batch of 12, as micro batches of 3
    assert b0.sample_index.tolist() == [106, 107, 108]
    assert b1.sample_index.tolist() == [109, 110, 111]
    assert b2.sample_index.tolist() == [118, 119, 120]
    ids, lang = s.sample_ids(b1.sample_index)
    np.testing.assert_array_equal(ids, b1.input_ids)
    np.testing.assert_array_equal(lang, b1.lang)
    assert s.manifest.languages[int(lang[0])] in s.manifest.languages


def test_deterministic_across_instances_and_seeds(shards_dir):
    a = _global_sequence(ShardStream.open(shards_dir, seed=7), 1, 20)[1]
    b = _global_sequence(ShardStream.open(shards_dir, seed=7), 1, 20)[1]
    c = _global_sequence(ShardStream.open(shards_dir, seed=8), 1, 20)[1]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)  # the seed matters (negative control)


def test_same_global_sequence_for_1_2_4_ranks(shards_dir):
    s = ShardStream.open(shards_dir)
    idx1, ids1 = _global_sequence(s, 1, 25)
    for world in (2, 4):
        idx, ids = _global_sequence(s, world, 25)
        np.testing.assert_array_equal(idx, idx1)
        np.testing.assert_array_equal(ids, ids1)
    np.testing.assert_array_equal(idx1, np.arange(len(idx1)))


@pytest.mark.parametrize("start", [0, 1, 37, 1000, 4095, 4096, 123_457])
def test_resume_equals_uninterrupted(shards_dir, start):
    s = ShardStream.open(shards_dir)
    ref_ids, _ = s.sample_ids(np.arange(start, start + 32))
    resumed = _take(ShardStream.open(shards_dir).rank_batches(start, 16, 4, 0, 1), 8)
    np.testing.assert_array_equal(np.concatenate([b.input_ids for b in resumed]), ref_ids)
    if start == 37:  # and the same as replaying from 0
        replay = _take(s.rank_batches(0, 1, 1, 0, 1), start + 32)[start:]
        np.testing.assert_array_equal(np.concatenate([b.input_ids for b in replay]), ref_ids)


def test_micro_batches_carry_their_step_language_tokens_and_seed(shards_dir):
    s = ShardStream.open(shards_dir)
    # global batch 24, micro batch 4, rank 2 of 3: two micro batches per step
    items = _take(s.rank_batches(5, 24, 4, 2, 3, start_step=7), 6)
    assert [b.step for b in items] == [7, 7, 8, 8, 9, 9]
    pad = s.manifest.special_ids["pad"]
    for b in items:
        want = np.zeros(len(s.manifest.languages), dtype=np.int64)
        for row, lang in zip(b.input_ids, b.lang, strict=True):
            want[lang] += (row != pad).sum()
        np.testing.assert_array_equal(b.lang_tokens, want)
        assert b.lang_tokens.sum() > 0
    assert len({b.seed(1234) for b in items}) == 6
    # the seed depends on the samples and the step, not on the rank layout
    one_rank = _take(s.rank_batches(5, 24, 4, 0, 1, start_step=7), 18)
    by_first = {int(b.sample_index[0]): b.seed(1234) for b in one_rank}
    assert all(by_first[int(b.sample_index[0])] == b.seed(1234) for b in items)
    assert items[0].seed(1234) != items[0].seed(1235)


def test_language_proportions_within_2_percent(shards_dir):
    """Over 50k samples every language's share is within 2% (relative) of q_l ~ n_l^0.3."""
    s = ShardStream.open(shards_dir, alpha=0.3)
    lang, _ = s.locate(np.arange(50_000))
    share = np.bincount(lang, minlength=len(s.rows)) / 50_000
    q = s.rows**0.3 / (s.rows**0.3).sum()
    np.testing.assert_allclose(share, q, rtol=0.02)
    flat = ShardStream.open(shards_dir, alpha=1.0)  # alpha = 1: proportional to rows
    share1 = np.bincount(flat.locate(np.arange(50_000))[0], minlength=len(s.rows)) / 50_000
    np.testing.assert_allclose(share1, s.rows / s.rows.sum(), rtol=0.02)
    assert not np.allclose(share, share1, rtol=0.02)  # the two settings are distinguishable


def test_every_row_once_per_pass(shards_dir):
    s = ShardStream.open(shards_dir)
    n = s.rows
    total = int(3 * (n / s.block_counts).max() * s.block_size)  # three passes of every language
    lang, row = s.locate(np.arange(total))
    for l, n_l in enumerate(n):
        rows = row[lang == l]
        passes = [rows[p * n_l : (p + 1) * n_l] for p in range(3)]
        for p in passes:
            assert sorted(p.tolist()) == list(range(n_l))
        assert not np.array_equal(passes[0], passes[1])  # a fresh order each pass


def test_permutation_is_a_bijection_in_constant_memory():
    for n in [1, 2, 3, 5, 64, 65, 1000, 4099]:
        y = permute(np.arange(n), n, derive_key(3, n))
        assert sorted(y.tolist()) == list(range(n))
    n = 100_000_000  # no table of n entries: a sample of indices maps without collisions
    i = np.random.default_rng(0).choice(n, 200_000, replace=False)
    y = permute(i, n, derive_key(9))
    assert y.min() >= 0 and y.max() < n and len(np.unique(y)) == len(i)


def test_bad_batch_geometry_is_a_clear_error(shards_dir):
    s = ShardStream.open(shards_dir)
    with pytest.raises(ValueError, match=r"global_batch_size=10 is not divisible by world_size \* "
                       r"micro_batch_size = 2 \* 4 = 8"):  # fmt: skip
        next(s.rank_batches(0, 10, 4, 0, 2))
    with pytest.raises(ValueError, match=r"rank 2 is not in \[0, world_size=2\)"):
        next(s.rank_batches(0, 8, 4, 2, 2))


def test_flipped_byte_in_a_shard_is_reported_by_name(copy_shards):
    s0 = ShardStream.open(copy_shards)
    victim = s0.manifest.shard_path(s0.manifest.shards[3])
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the hash can tell
    victim.write_bytes(bytes(data))
    s = ShardStream.open(copy_shards)  # opening checks sizes and schemas only: still fine
    with pytest.raises(ValueError, match=rf"{re.escape(str(victim))}: shard content changed since"):
        _take(s.rank_batches(0, 64, 64, 0, 1), 50)


def test_chunked_iteration_crosses_chunks_and_strides(shards_dir):
    """Samples are located 8192 at a time: items across chunk edges, with strides, agree."""
    s = ShardStream.open(shards_dir)
    args = (3, 256, 64, 1, 2)  # 2 micro batches per step, 128 per located chunk
    items = _take(s.rank_batches(*args), 300)
    for i in (0, 127, 128, 129, 299):
        ids, lang = s.sample_ids(items[i].sample_index)
        np.testing.assert_array_equal(items[i].input_ids, ids)
        np.testing.assert_array_equal(items[i].lang, lang)
        assert items[i].sample_index[0] == 3 + (i // 2) * 256 + 128 + (i % 2) * 64
    strided = _take(s.rank_batches(*args, first=1, stride=3), 100)
    for k, b in enumerate(strided):
        np.testing.assert_array_equal(b.input_ids, items[1 + 3 * k].input_ids)


def test_largest_remainder_and_weights():
    q = language_weights(np.array([1000, 10, 0, 1]), alpha=0.3)
    assert q[2] == 0 and np.isclose(q.sum(), 1)
    counts = largest_remainder(q, 4096)
    assert counts.sum() == 4096 and counts[2] == 0
    assert np.all(np.abs(counts - 4096 * q) < 1)
    assert largest_remainder(np.array([0.5, 0.5]), 3).tolist() == [2, 1]  # ties: lower index


def test_order_identity_names_each_part_of_the_sequence(shards_dir):
    a = ShardStream.open(shards_dir, seed=1).order_identity(8)
    assert a == ShardStream.open(shards_dir, seed=1).order_identity(8)
    b = ShardStream.open(shards_dir, seed=2, alpha=0.5).order_identity(16)
    assert {k for k in a if a[k] != b[k]} == {"seed", "alpha", "global_batch_size"}
    m = load_manifest(shards_dir)
    assert a["manifest"] == m.fingerprint() and a["seq_len"] == m.seq_len
    assert a["languages"] == m.languages and a["tokenizer_sha256"] == m.tokenizer_sha256
