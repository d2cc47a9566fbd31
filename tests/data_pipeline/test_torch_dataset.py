"""RankIterableDataset under DataLoader workers: same order, no duplicates, no drops."""

import itertools

import numpy as np
import pytest

from data_pipeline.stream import ShardStream

torch = pytest.importorskip("torch")
from torch.utils.data import DataLoader  # noqa: E402

from data_pipeline.torch_dataset import RankIterableDataset  # noqa: E402


@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_dataloader_workers_preserve_the_rank_stream(shards_dir, num_workers):
    args = dict(start_sample=33, global_batch_size=24, micro_batch_size=2, rank=1, world_size=3)
    ref = list(itertools.islice(ShardStream.open(shards_dir).rank_batches(**args), 20))
    ds = RankIterableDataset(shards_dir, **args)
    loader = DataLoader(ds, batch_size=None, num_workers=num_workers)
    got = list(itertools.islice(iter(loader), 20))
    for r, g in zip(ref, got, strict=True):
        assert g.input_ids.dtype == torch.int32
        np.testing.assert_array_equal(g.sample_index.numpy(), r.sample_index)
        np.testing.assert_array_equal(g.input_ids.numpy(), r.input_ids)
        np.testing.assert_array_equal(g.lang.numpy(), r.lang)
    seen = np.concatenate([g.sample_index.numpy() for g in got])
    assert len(np.unique(seen)) == len(seen)


def test_bad_geometry_fails_at_construction(shards_dir):
    with pytest.raises(ValueError, match="not divisible"):
        RankIterableDataset(shards_dir, 0, 10, 3, 0, 1)


def test_dataset_iterated_in_main_process_still_pickles_to_workers(shards_dir):
    ds = RankIterableDataset(shards_dir, 0, 8, 2, 0, 1)
    first = next(iter(ds))  # opens memory maps in this process
    got = next(iter(DataLoader(ds, batch_size=None, num_workers=2)))
    assert torch.equal(first.input_ids, got.input_ids)
