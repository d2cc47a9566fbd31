"""torch `IterableDataset` over one rank's micro batches (the only file importing torch).

Use with ``DataLoader(ds, batch_size=None, num_workers=k)``: items are already micro
batches. With k workers, worker w produces micro batches w, w+k, w+2k, ... of the rank's
sequence, and DataLoader's in-order round-robin over workers (the default `in_order=True`)
returns them in the original order, so no sample is duplicated or dropped for any k. Every
micro batch is located in O(1) (`ShardStream.rank_batches` with a stride), so workers
skip nothing by replay. Each worker opens its own `ShardStream` (memory maps are per process).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import IterableDataset, get_worker_info

from data_pipeline.stream import MicroBatch, ShardStream, check_batch_geometry


class RankIterableDataset(IterableDataset):
    """Infinite stream of this rank's micro batches: the `MicroBatch`es that
    `ShardStream.rank_batches` yields, in the same order, with torch tensors for the arrays.
    """

    def __init__(
        self,
        shards_dir: str | Path,
        start_sample: int,
        global_batch_size: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        seed: int = 1234,
        alpha: float = 0.3,
        **stream_kwargs,
    ):
        super().__init__()
        check_batch_geometry(global_batch_size, micro_batch_size, rank, world_size)
        self.shards_dir = str(shards_dir)
        self.start_sample = int(start_sample)
        self.geometry = (global_batch_size, micro_batch_size, rank, world_size)
        self.stream_kwargs = dict(seed=seed, alpha=alpha, **stream_kwargs)
        self._stream: ShardStream | None = None

    def __getstate__(self):  # worker processes open their own memory maps
        return {**self.__dict__, "_stream": None}

    def __iter__(self):
        if self._stream is None:  # opened lazily, in the worker process
            self._stream = ShardStream.open(self.shards_dir, **self.stream_kwargs)
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        batches = self._stream.rank_batches(
            self.start_sample, *self.geometry, first=worker, stride=workers
        )
        for mb in batches:
            yield MicroBatch(
                input_ids=torch.from_numpy(mb.input_ids),
                lang=torch.from_numpy(mb.lang),
                sample_index=torch.from_numpy(mb.sample_index),
                step=mb.step,
                lang_tokens=torch.from_numpy(mb.lang_tokens),
            )
