"""A corpus -> sentencepiece tokenizer -> Arrow shards -> a deterministic sample stream.

Commands (each with --help, a progress bar and a summary):

    python -m data_pipeline.train_tokenizer --input data/cc100-sample --vocab-size 8000 --out TOK
    python -m data_pipeline.build_shards --input data/cc100-sample --tokenizer TOK \\
        --out SHARDS --seq-len 512 --workers 8        # or under `mpirun -np K`
    python -m data_pipeline.verify SHARDS

Modules, in data-flow order:
- `corpus`: discover inputs, stream documents out of plain/.xz/.gz files, count repairs.
- `formats`: Parquet, JSON Lines (.gz/.zst/.xz) and saved-dataset inputs into the same
  documents, bad records counted.
- `tokenizer`, `train_tokenizer`: DeBERTaV3 ids, Hugging Face-identical encoding, training.
- `packing`, `build_shards`: rows of exactly seq_len, atomic Arrow shards, parallel/MPI build
  (`build_cli`: its command line).
- `manifest`, `verify`: what a shard directory holds, and the checks that it still does.
- `mixing`, `permutation`, `stream`: the global sample order, `ShardStream` and the
  `MicroBatch` it yields.
- `remote`, `remote_shards`, `cache`: shard directories at s3:// locations (boto3), published
  manifest last, read through a node's verified, bounded, prefetching cache;
  `remote_inputs`: corpus inputs at s3:// locations, read by ranged GETs.
- `torch_dataset`: `RankIterableDataset` for torch DataLoader (the only torch import).

numpy, pyarrow and sentencepiece only (plus zstandard for .zst inputs, `tokenizers` for
models whose scores are not on the parity grid, and boto3 for s3:// locations, imported only
when one is used); never model
code or deepspeed. Rank and world size are arguments.
"""
