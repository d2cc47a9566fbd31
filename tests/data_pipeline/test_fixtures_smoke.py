"""The shared fixtures build and are what conftest.py promises."""

import numpy as np

from data_pipeline.manifest import load_manifest
from data_pipeline.stream import ShardStream
from data_pipeline.tokenizer import load_tokenizer_dir
from tests.conftest import SHARDS_SEQ_LEN, TOKENIZER_VOCAB


def test_fixtures(tokenizer_dir, shards_dir):
    info = load_tokenizer_dir(tokenizer_dir)
    assert info.vocab_size == TOKENIZER_VOCAB
    assert info.special_ids == {"pad": 0, "cls": 1, "sep": 2, "unk": 3, "mask": 4}
    m = load_manifest(shards_dir)
    assert m.seq_len == SHARDS_SEQ_LEN and len(m.languages) == 12
    assert m.tokenizer_sha256 == info.sha256
    assert all(n >= 150 for n in m.rows_per_language().values()), m.rows_per_language()
    batch = next(ShardStream.open(shards_dir).rank_batches(0, 8, 4, 0, 1))
    assert batch.input_ids.shape == (4, SHARDS_SEQ_LEN)
    assert np.all(batch.input_ids[:, 0] == 1) and np.all(batch.input_ids[:, -1] == 2)
