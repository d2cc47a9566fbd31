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
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_pipeline.manifest import Manifest, load_manifest
from data_pipeline.mixing import language_weights, largest_remainder
from data_pipeline.permutation import derive_key, permute
from data_pipeline.tokenizer import file_sha256

DEFAULT_BLOCK_SIZE = 4096
_BLOCK_STREAM, _ROW_STREAM = 1, 2  # key domains for derive_key


class ShardStream:
    """Random access to the global sample sequence, and per-rank micro batches over it."""

    def __init__(
        self,
        shards_dir: str | Path,
        seed: int = 1234,
        alpha: float = 0.3,
        block_size: int = DEFAULT_BLOCK_SIZE,
        verify_hashes: bool = True,
    ):
        self.manifest: Manifest = load_manifest(shards_dir)
        self.seed, self.alpha, self.block_size = int(seed), float(alpha), int(block_size)
        self.verify_hashes = verify_hashes
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
        # language l's rows are its shards in manifest order: row r -> (shard, offset)
        self._shard_ids = [[] for _ in m.languages]
        for s_id, s in enumerate(m.shards):
            self._shard_ids[lang_index[s.language]].append(s_id)
        self._shard_starts = [
            np.cumsum([0] + [m.shards[s].rows for s in ids]) for ids in self._shard_ids
        ]
        self._layouts: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._mapped: dict[int, tuple[object, np.ndarray]] = {}

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
        pairs, inverse = np.unique(np.stack([lang, passes]), axis=1, return_inverse=True)
        table = np.array(
            [derive_key(self.seed, _ROW_STREAM, int(a), int(b)) for a, b in pairs.T],
            dtype=np.uint64,
        )
        return table[inverse.reshape(-1)]

    # ---- the data --------------------------------------------------------------------------

    def _shard_array(self, shard_id: int) -> np.ndarray:
        """(rows, seq_len) int32 view of a memory-mapped shard; hashed on first use."""
        hit = self._mapped.get(shard_id)
        if hit is not None:
            return hit[1]
        m = self.manifest
        shard = m.shards[shard_id]
        path = m.shard_path(shard)
        if self.verify_hashes:
            digest = file_sha256(path)
            if digest != shard.sha256:
                raise ValueError(
                    f"{path}: shard content changed since the build (sha256 {digest[:16]}..., "
                    f"manifest says {shard.sha256[:16]}...); rebuild it or run "
                    f"`python -m data_pipeline.verify {m.root}`"
                )
        source = pa.memory_map(str(path))
        batch = pa.ipc.open_file(source).get_batch(0)
        ids = batch.column(0).values.to_numpy(zero_copy_only=True).reshape(-1, m.seq_len)
        self._mapped[shard_id] = (source, ids)
        return ids

    def sample_ids(self, global_indices) -> tuple[np.ndarray, np.ndarray]:
        """-> (input_ids int32 (n, seq_len), lang int16 (n,)) for global sample indices."""
        lang, row = self.locate(global_indices)
        out = np.empty((len(row), self.manifest.seq_len), dtype=np.int32)
        for l in np.unique(lang):
            sel = np.flatnonzero(lang == l)
            starts = self._shard_starts[l]
            which = np.searchsorted(starts, row[sel], side="right") - 1
            for w in np.unique(which):
                part = sel[which == w]
                shard = self._shard_array(self._shard_ids[l][w])
                out[part] = shard[row[part] - starts[w]]
        return out, lang

    # ---- per-rank batches ------------------------------------------------------------------

    def rank_batches(
        self,
        start_sample: int,
        global_batch_size: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Infinite iterator over this rank's micro batches.

        Global step s covers samples [start + s*G, start + (s+1)*G); rank r takes the
        contiguous slice of G/W of them and yields it as G/(W*m) micro batches of m, in order.
        Items: input_ids int32 (m, seq_len), lang int16 (m,), sample_index int64 (m,).
        """
        per_rank = check_batch_geometry(global_batch_size, micro_batch_size, rank, world_size)
        if start_sample < 0:
            raise ValueError(f"start_sample must be >= 0, got {start_sample}")
        base = int(start_sample) + rank * per_rank
        while True:
            index = np.arange(base, base + per_rank, dtype=np.int64)
            ids, lang = self.sample_ids(index)
            for a in range(0, per_rank, micro_batch_size):
                b = a + micro_batch_size
                yield {"input_ids": ids[a:b], "lang": lang[a:b], "sample_index": index[a:b]}
            base += global_batch_size

    def micro_batch(
        self,
        start_sample: int,
        global_batch_size: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        index: int,
    ) -> dict[str, np.ndarray]:
        """The index-th item `rank_batches` would yield with these arguments, in O(1)."""
        per_rank = check_batch_geometry(global_batch_size, micro_batch_size, rank, world_size)
        step, j = divmod(int(index), per_rank // micro_batch_size)
        first = int(start_sample) + step * global_batch_size + rank * per_rank
        first += j * micro_batch_size
        sample_index = np.arange(first, first + micro_batch_size, dtype=np.int64)
        ids, lang = self.sample_ids(sample_index)
        return {"input_ids": ids, "lang": lang, "sample_index": sample_index}

    def language_weights(self) -> dict[str, float]:
        return dict(zip(self.manifest.languages, self.q.tolist(), strict=True))


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
