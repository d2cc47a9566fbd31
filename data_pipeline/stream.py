"""Deterministic, elastic, resumable, language-mixing stream of samples over a shard directory.

The global sample order is a pure function of (seed, alpha, block_size, manifest, index):

- Blocks of B global samples. Language l gets c_l samples in every block, c = the largest-
  remainder apportionment of B * q_l with q_l ~ n_l^alpha (n_l = rows of l). So the number of
  language-l samples before block k is k * c_l: O(1), and proportions hold within 1/B.
- Inside block k the B slots (c_0 of language 0, then c_1 of language 1, ...) are shuffled by
  a permutation seeded by (seed, k); a language's samples keep their order j inside a block.
- The j-th sample of language l is row P_{l,p}(j mod n_l) of pass p = j // n_l, with P a
  seeded Feistel bijection of [0, n_l) (`permutation.py`): every row once per pass, a fresh
  order each pass, O(1) memory for any n_l.

Global sample i therefore costs O(1) to locate, so resuming at any consumed-sample count is
free, and ranks just take their slice of each global batch: the same global batch size with
any number of ranks yields the same sequence. Shards are memory-mapped on first use, and a
shard is hashed against the manifest then (once per process; `verify_hashes=False` skips it).
A remote (s3://) manifest reads through a `data_pipeline.cache.ShardCache`, which verifies
each shard as it downloads it; the stream tells the cache the shard of every sample it will
read next (`plan`, `advance`), so it prefetches and evicts by the known order, and keeps at
most `_MAX_MAPPED_REMOTE` shards mapped (an evicted file's space is freed once unmapped).

What leaves this module is a `MicroBatch`: the token ids, their languages and global sample
indices, the optimizer step they belong to, the non-pad tokens per language, and the seed
for their masking, sampling and dropout (a function of the samples, not of the rank).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_pipeline.cache import CacheSettings, ShardCache
from data_pipeline.manifest import Manifest, load_manifest
from data_pipeline.mixing import language_weights, largest_remainder
from data_pipeline.permutation import derive_key, mix64, permute
from data_pipeline.tokenizer import file_sha256

DEFAULT_BLOCK_SIZE = 4096
_BLOCK_STREAM, _ROW_STREAM = 1, 2  # key domains for derive_key
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_LOCATE_CHUNK = 8192  # samples located per numpy pass in rank_batches
_MAX_MAPPED_REMOTE = 64


@dataclass(frozen=True)
class MicroBatch:
    """One forward pass worth of samples on one rank."""

    input_ids: np.ndarray  # (m, seq_len) int32
    lang: np.ndarray  # (m,) int16, indices into the manifest's languages
    sample_index: np.ndarray  # (m,) int64, positions in the global sample sequence
    step: int  # the optimizer step these samples are trained in
    lang_tokens: np.ndarray  # (languages,) int64, non-pad tokens per language

    def seed(self, run_seed: int) -> int:
        """Seed for the masking, sampling and dropout of this micro batch: a function of its
        samples and step, not of the rank, so 1 and N ranks (and a resumed run) draw the same
        random numbers."""
        first = int(self.sample_index[0])
        return int(np.random.SeedSequence([run_seed, self.step, first]).generate_state(1)[0])


class ShardStream:
    """Random access to the global sample sequence, and per-rank micro batches over it."""

    def __init__(
        self,
        manifest: Manifest,
        seed: int = 1234,
        alpha: float = 0.3,
        block_size: int = DEFAULT_BLOCK_SIZE,
        verify_hashes: bool = True,
        cache: ShardCache | None = None,
    ):
        self.manifest = manifest
        self.seed, self.alpha, self.block_size = int(seed), float(alpha), int(block_size)
        if manifest.url and cache is None:
            cache = ShardCache(manifest)
        self.cache = cache
        self.verify_hashes = verify_hashes and cache is None  # the cache verifies downloads
        m = self.manifest
        lang_index = {lang: i for i, lang in enumerate(m.languages)}
        rows = m.rows_per_language()
        self.rows = np.array([rows[lang] for lang in m.languages], dtype=np.int64)  # n_l
        if self.rows.sum() == 0:
            raise ValueError(f"{m.root}: the manifest lists no rows")
        self.q = language_weights(self.rows, alpha)
        self.block_counts = largest_remainder(self.q, self.block_size)  # c_l
        starts = np.concatenate([[0], np.cumsum(self.block_counts)[:-1]])
        self._slot_lang = np.repeat(np.arange(len(self.rows)), self.block_counts)
        self._slot_start = starts
        # language l's rows are its shards in manifest order; all languages concatenated:
        # flat row = _lang_base[l] + row, and _flat_starts / _flat_shard map it to a shard
        order = sorted(range(len(m.shards)), key=lambda i: lang_index[m.shards[i].language])
        self._flat_shard = np.array(order, dtype=np.int64)
        self._flat_starts = np.cumsum([0] + [m.shards[i].rows for i in order])[:-1]
        self._lang_base = np.concatenate([[0], np.cumsum(self.rows)[:-1]]).astype(np.int64)
        self._row_key = np.uint64(derive_key(self.seed, _ROW_STREAM))
        self._layouts: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._mapped: list[np.ndarray | None] = [None] * len(m.shards)
        self._mapped_order: OrderedDict[int, None] = OrderedDict()
        self._pad_id = m.special_ids["pad"]

    @classmethod
    def open(
        cls, shards_dir: str | Path, cache_settings: CacheSettings | None = None, **kwargs
    ) -> ShardStream:
        """The stream of a shard directory or s3:// location (its manifest loaded and
        checked; a remote one read through a cache with `cache_settings`)."""
        manifest = load_manifest(shards_dir)
        if manifest.url:
            kwargs["cache"] = ShardCache(manifest, cache_settings or CacheSettings())
        return cls(manifest, **kwargs)

    def close(self) -> None:
        """Stop the cache's prefetch threads (a local stream holds none)."""
        if self.cache is not None:
            self.cache.close()

    # ---- the order -------------------------------------------------------------------------

    def _block_layout(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Block k: (language, rank among that language's samples in the block) per position.

        Positions take languages from a seeded shuffle of the block's slots; ranks count in
        position order, so a language's samples appear in global order j = 0, 1, 2, ...
        and a pass ends before the next one starts.
        """
        hit = self._layouts.get(k)
        if hit is None:
            rng = np.random.default_rng([self.seed, _BLOCK_STREAM, k])
            lang = self._slot_lang[rng.permutation(self.block_size)]
            order = np.argsort(lang, kind="stable")
            rank = np.empty(self.block_size, dtype=np.int64)
            rank[order] = np.arange(self.block_size) - self._slot_start[lang[order]]
            hit = self._layouts[k] = (lang, rank)
            if len(self._layouts) > 8:
                self._layouts.popitem(last=False)
        return hit

    def locate(self, global_indices) -> tuple[np.ndarray, np.ndarray]:
        """Global sample indices -> (language index int16, row within the language int64)."""
        idx = np.asarray(global_indices, dtype=np.int64).reshape(-1)
        if idx.size and idx.min() < 0:
            raise ValueError("sample indices must be >= 0")
        k, p = np.divmod(idx, self.block_size)
        lang = np.empty_like(p)
        rank = np.empty_like(p)
        for kk in np.unique(k):
            sel = k == kk
            block_lang, block_rank = self._block_layout(int(kk))
            lang[sel] = block_lang[p[sel]]
            rank[sel] = block_rank[p[sel]]
        j = k * self.block_counts[lang] + rank  # j-th sample of its language
        n = self.rows[lang]
        passes, i = np.divmod(j, n)
        keys = self._keys(lang, passes)
        return lang.astype(np.int16), permute(i, n, keys)

    def _keys(self, lang: np.ndarray, passes: np.ndarray) -> np.ndarray:
        """Feistel key of (language, pass), vectorized: a hash of (seed, language, pass)."""
        k = mix64(self._row_key ^ (lang.astype(np.uint64) * _GOLDEN))
        return mix64(k ^ passes.astype(np.uint64))

    # ---- the data --------------------------------------------------------------------------

    def _shard_array(self, shard_id: int) -> np.ndarray:
        """(rows, seq_len) int32 view of a memory-mapped shard; hashed on first use."""
        ids = self._mapped[shard_id]
        if ids is not None:
            return ids
        m = self.manifest
        shard = m.shards[shard_id]
        if self.cache is not None:
            return self._map_remote(shard_id)
        path = m.shard_path(shard)
        if self.verify_hashes:
            digest = file_sha256(path)
            if digest != shard.sha256:
                raise ValueError(
                    f"{path}: shard content changed since the build (sha256 {digest[:16]}..., "
                    f"manifest says {shard.sha256[:16]}...); rebuild it or run "
                    f"`python -m data_pipeline.verify {m.root}`"
                )
        ids = self._mapped[shard_id] = _map(path, m.seq_len)
        return ids

    def _map_remote(self, shard_id: int) -> np.ndarray:
        for attempt in range(3):
            path = self.cache.path(shard_id)
            try:
                ids = _map(path, self.manifest.seq_len)
                break
            except FileNotFoundError:  # evicted by another rank between download and map
                if attempt == 2:
                    raise
        self._mapped[shard_id] = ids
        self._mapped_order[shard_id] = None
        if len(self._mapped_order) > _MAX_MAPPED_REMOTE:
            old, _ = self._mapped_order.popitem(last=False)
            self._mapped[old] = None
        return ids

    def _shard_rows(self, lang: np.ndarray, row: np.ndarray) -> tuple[list[int], list[int]]:
        """(shard id, row inside the shard) for rows of languages, via one searchsorted."""
        flat = self._lang_base[lang] + row  # row in the concatenation of all languages
        pos = np.searchsorted(self._flat_starts, flat, side="right") - 1
        return self._flat_shard[pos].tolist(), (flat - self._flat_starts[pos]).tolist()

    def _gather(self, shards: list[int], offsets: list[int]) -> np.ndarray:
        out = np.empty((len(shards), self.manifest.seq_len), dtype=np.int32)
        for k, (s, o) in enumerate(zip(shards, offsets, strict=True)):
            out[k] = self._shard_array(s)[o]
        return out

    def sample_ids(self, global_indices) -> tuple[np.ndarray, np.ndarray]:
        """-> (input_ids int32 (n, seq_len), lang int16 (n,)) for global sample indices."""
        lang, row = self.locate(global_indices)
        return self._gather(*self._shard_rows(lang, row)), lang

    # ---- per-rank batches ------------------------------------------------------------------

    def rank_batches(
        self,
        start_sample: int,
        global_batch_size: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        start_step: int = 0,
        first: int = 0,
        stride: int = 1,
    ) -> Iterator[MicroBatch]:
        """Infinite iterator over this rank's micro batches (ValueError on bad geometry now,
        not at the first `next`).

        Step start_step + s covers samples [start + s*G, start + (s+1)*G); rank r takes the
        contiguous slice of G/W of them and yields it as G/(W*m) micro batches of m, in order.
        `first`, `stride`: only items first, first + stride, ... (DataLoader workers).
        """
        per_rank = check_batch_geometry(global_batch_size, micro_batch_size, rank, world_size)
        if start_sample < 0:
            raise ValueError(f"start_sample must be >= 0, got {start_sample}")
        geometry = (global_batch_size, micro_batch_size, rank * per_rank, per_rank)
        return self._micro_batches(start_sample, *geometry, start_step, first, stride)

    def _micro_batches(
        self, start_sample, global_batch_size, m, rank_offset, per_rank, start_step, first, stride
    ) -> Iterator[MicroBatch]:
        """Samples are located for many micro batches at once (numpy work amortized), then
        gathered one micro batch at a time."""
        per_step = per_rank // m
        chunk = max(1, _LOCATE_CHUNK // m)
        offsets = np.arange(m, dtype=np.int64)
        for i in itertools.count(first, stride * chunk):
            mb = i + stride * np.arange(chunk, dtype=np.int64)
            step, j = np.divmod(mb, per_step)
            begin = start_sample + step * global_batch_size + rank_offset + j * m
            index = (begin[:, None] + offsets).reshape(-1)
            lang, row = self.locate(index)
            shards, rows = self._shard_rows(lang, row)
            if self.cache is not None:
                self.cache.plan(shards)
            for c in range(chunk):
                sl = slice(c * m, (c + 1) * m)
                if self.cache is not None:
                    self.cache.advance(c * m)
                ids = self._gather(shards[sl], rows[sl])
                yield MicroBatch(
                    input_ids=ids,
                    lang=lang[sl],
                    sample_index=index[sl],
                    step=start_step + int(step[c]),
                    lang_tokens=self._lang_tokens(ids, lang[sl]),
                )

    def _lang_tokens(self, ids: np.ndarray, lang: np.ndarray) -> np.ndarray:
        per_row = (ids != self._pad_id).sum(axis=1)
        return np.bincount(lang, per_row, len(self.rows)).astype(np.int64)

    def order_identity(self, global_batch_size: int) -> dict:
        """What fixes the global sample sequence, part by part: a resume compares it with the
        checkpoint's and names what changed."""
        m = self.manifest
        return {
            "seed": self.seed,
            "alpha": self.alpha,
            "block_size": self.block_size,
            "global_batch_size": global_batch_size,
            "seq_len": m.seq_len,
            "tokenizer_sha256": m.tokenizer_sha256,
            "languages": list(m.languages),
            "manifest": m.fingerprint(),
        }


def _map(path: Path, seq_len: int) -> np.ndarray:
    """(rows, seq_len) int32 view of a memory-mapped Arrow shard (the view keeps the map)."""
    batch = pa.ipc.open_file(pa.memory_map(str(path))).get_batch(0)
    return batch.column(0).values.to_numpy(zero_copy_only=True).reshape(-1, seq_len)


def check_batch_geometry(global_batch: int, micro_batch: int, rank: int, world: int) -> int:
    """Samples per rank per step; ValueError naming the bad value otherwise."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, world_size={world})")
    if global_batch < 1 or micro_batch < 1:
        raise ValueError(
            f"batch sizes must be >= 1 (global_batch_size={global_batch}, "
            f"micro_batch_size={micro_batch})"
        )
    if global_batch % (world * micro_batch):
        raise ValueError(
            f"global_batch_size={global_batch} is not divisible by world_size * "
            f"micro_batch_size = {world} * {micro_batch} = {world * micro_batch}"
        )
    return global_batch // world
