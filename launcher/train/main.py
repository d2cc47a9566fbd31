"""DeBERTaV3 RTD pretraining on DeepSpeed: one entry for every launcher.

He, Gao, Chen, "DeBERTaV3: Improving DeBERTa using ELECTRA-Style Pre-Training with
Gradient-Disentangled Embedding Sharing", arXiv 2111.09543.

One process (CPU or one GPU):
    python launcher/pretrain.py --config launcher/recipes/demo.toml \\
        --data.shards_dir=SHARDS --data.tokenizer_dir=TOK
One node, N ranks (GPUs, or CPU processes without CUDA):
    deepspeed --num_gpus N launcher/pretrain.py --config launcher/recipes/base.toml ...
Multi-node (hostfile lists `host slots=N`; ssh/pdsh from the first node):
    deepspeed --hostfile H launcher/pretrain.py --config launcher/recipes/base.toml ...
Multi-node without ssh (run on every node i = 0..K-1):
    deepspeed --hostfile H --no_ssh --node_rank i --master_addr HOST0 --master_port 29500 \\
        launcher/pretrain.py --config launcher/recipes/base.toml ...
MPI (ranks from mpi4py):
    mpirun -np N [-H host1:n,host2:n] python launcher/pretrain.py --config ...
SLURM:
    sbatch --nodes=K --ntasks-per-node=N launcher/slurm/pretrain.sbatch --config ...

Options are `--config FILE` and `--section.key=value` overrides (launcher/config.py; all of
them with their defaults: `--help`). Environment: RTDSPEED_TCMALLOC=0 keeps glibc malloc
(otherwise the process re-executes itself with tcmalloc when installed); OMP_NUM_THREADS
overrides the CPU threads per rank (default: the node's cores / its ranks). The run
directory (`run.output_dir/run.name`) receives config.toml, ds_config.json, metrics.jsonl,
tensorboard/ and checkpoints/. Running the same command again resumes from the newest
complete checkpoint.

`--dry-run` (under any of the launchers above) checks a launch without starting it: every
rank finds its rank and runs the preflight as the real launch would, then rank 0 prints the
world size, micro batch x ranks x gradient accumulation = global batch, the run directory
(and the checkpoint it would resume from), the resolved run config and the DeepSpeed config
(launcher/train/dry_run.py). No process group, nothing written; exit 0, or 2 for a config
error. `--local_rank=N` (added by the deepspeed launcher) is accepted and ignored: ranks
come from the environment. `-h`/`--help`: this text.

Exit codes: 0 done, or stopped by SIGTERM/SIGINT after saving a checkpoint (under the
`deepspeed` launcher its own launch.py then reports 1 for the signal); 2 invalid config or
refused resume (nothing started); 3 stopped after `train.max_nonfinite_in_a_row` non-finite
steps in a row (no checkpoint written for them); 4 a shard's content does not match its
manifest (found at start, before training, the message naming every bad file; for s3://
shards, when a download does not match twice); 5 another rank died or hung (this rank lost
contact with it; the launcher's own line names the rank that exited and its signal,
`return code = -9` for SIGKILL); 6 the object store of s3:// data stayed unreachable past
the retry budget (RTDSPEED_S3_RETRY_SECONDS; the message names the object and the error).
The same command resumes from the last complete checkpoint. Tracebacks of such failures go to
RUN/logs/rank<R>.log.
"""

from __future__ import annotations

import signal
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from data_pipeline.cache import ShardChecksumError
from data_pipeline.integrity import check_shard_hashes
from data_pipeline.manifest import Manifest
from data_pipeline.remote import RemoteError
from data_pipeline.stream import ShardStream
from launcher.config import ConfigError, options_help, parse_args, resolve_path, to_toml
from launcher.data import open_cache
from launcher.evaluate import eval_set
from launcher.factory import build_model
from launcher.hf.import_weights import InitError, init_from_hf
from launcher.train import allocator, checkpoint, distributed, dry_run, memory
from launcher.train.engine import build_engine, with_universal_load, write_ds_config
from launcher.train.loop import (
    EXIT_CONFIG,
    EXIT_DATA,
    EXIT_LOST_RANK,
    EXIT_OK,
    EXIT_STORAGE,
    Run,
    TrainState,
    resume,
    train,
)
from launcher.train.metrics import Logger
from launcher.train.preflight import Preflight, preflight
from model import rtd_flops_per_sample

# Dense bf16 peak FLOP/s by device name (vendor data sheets, without sparsity); the first
# name that occurs in torch.cuda.get_device_name() wins.
CUDA_PEAKS = (("H200", 989e12), ("H100", 989e12), ("GH200", 989e12), ("A100", 312e12))


def peak_flops(configured: float) -> float:
    """log.peak_flops_per_rank, or the device's bf16 peak when it is known (312e12, an A100's,
    for other GPUs: set it for those), or a rough 1e11 on the CPU."""
    if configured > 0:
        return configured
    if not torch.cuda.is_available():
        return 1e11
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in CUDA_PEAKS if key in name), 312e12)


class DataError(RuntimeError):
    """Shards that are not what their manifest says (the message names them)."""


def check_shard_contents(manifest: Manifest, env: distributed.DistEnv) -> None:
    """Every shard's sha256 against the manifest, once per node (cached across runs, see
    `data_pipeline.integrity`), the node's ranks sharing the work; a bad shard anywhere stops
    every rank here, before the engine is built."""
    mine = list(range(env.local_rank, len(manifest.shards), env.local_size))
    bad, _ = check_shard_hashes(manifest, mine)
    found: list[list[str] | None] = [None] * env.world_size
    dist.all_gather_object(found, bad)
    problems = sorted({line for lines in found for line in lines})
    if problems:
        raise DataError(
            f"{len(problems)} shard(s) of {manifest.root} do not match the manifest:\n  "
            + "\n  ".join(problems)
            + f"\nRebuild them (data_pipeline.build_shards), or list every problem with "
            f"`python -m data_pipeline.verify {manifest.root}`."
        )


# what the process-group backends (gloo, NCCL) say when a peer process is gone
_LOST_PEER = (
    "Connection reset by peer",
    "Connection closed by peer",
    "Connection refused",
    "Broken pipe",
    "NCCL communicator was aborted",
    "remote process exited",
)


def lost_peer(e: RuntimeError) -> bool:
    return isinstance(e, dist.DistBackendError) or any(s in str(e) for s in _LOST_PEER)


def report_lost_peer(e: RuntimeError, run_dir: Path, rank: int) -> None:
    """One line on the console; the traceback in the rank's log file."""
    log = run_dir / "logs" / f"rank{rank}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} rank {rank} lost a peer:\n")
        f.write("".join(traceback.format_exception(e)) + "\n")
    last = last_checkpoint(run_dir)
    reason = str(e).split("\n")[0].split("] ", 1)[-1]  # without the backend's source location
    reason = reason.split(". ")[0][:160]
    print(
        f"rtdspeed: rank {rank}: lost contact with another rank, which died or hung ({reason}). "
        f"Last complete checkpoint: {last}; the same command resumes from it. "
        f"Traceback: {log}",
        file=sys.stderr,
        flush=True,
    )


def last_checkpoint(run_dir: Path) -> str:
    tags = checkpoint.complete_tags(run_dir / "checkpoints")
    return f"step {tags[-1][0]} ({run_dir / 'checkpoints' / tags[-1][1]})" if tags else "none"


def report_remote(e: Exception, run_dir: Path, rank: int) -> int:
    """One line: the object, what went wrong, and where the same command resumes."""
    if isinstance(e, ShardChecksumError):
        what, code = "data error", EXIT_DATA
    else:
        what, code = "object storage error", EXIT_STORAGE
    print(
        f"rtdspeed: rank {rank}: {what}: {e}. Last complete checkpoint: "
        f"{last_checkpoint(run_dir)}; the same command resumes from it.",
        file=sys.stderr,
        flush=True,
    )
    return code


def install_signal_handlers(run: Run) -> None:
    """SIGTERM/SIGINT: finish the current step, save a checkpoint, exit 0."""

    def handler(signum, frame):
        run.stop_requested = True

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def setup(pre: Preflight, env: distributed.DistEnv):
    """Process group, data, model, engine, resume: returns (engine, stream, state, run)."""
    cfg, tok, manifest = pre.cfg, pre.tokenizer, pre.manifest
    distributed.init(env)
    distributed.set_cpu_threads(env)
    if not manifest.url:  # an s3:// shard is hashed by the cache as it is downloaded
        check_shard_contents(manifest, env)
    run_dir = cfg.run_dir
    if env.is_main:
        for warning in pre.warnings:
            print(f"rtdspeed: warning: {warning}", flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(to_toml(cfg))
    # contents checked above: the stream need not hash the shards again
    stream = ShardStream(
        manifest,
        seed=cfg.run.seed,
        alpha=cfg.data.alpha,
        verify_hashes=False,
        cache=open_cache(manifest, cfg.data),
    )
    rss_start = memory.rss_gb()
    model = build_model(cfg.model, cfg.run.seed, tok)
    plan = None
    if cfg.checkpoint.resume:
        plan = checkpoint.plan_resume(run_dir / "checkpoints", env.world_size, env.rank)
    if cfg.init.from_dir and plan is None:  # before the engine: ZeRO-3 partitions parameters
        gen = resolve_path(cfg.init.generator_dir) if cfg.init.generator_dir else None
        report = init_from_hf(
            model, resolve_path(cfg.init.from_dir), generator_dir=gen, tokenizer_sha256=tok.sha256
        )
        if env.is_main:
            print(f"rtdspeed: {report.summary()}", flush=True)
    ds_config = with_universal_load(pre.ds_config) if plan and plan.universal else pre.ds_config
    if env.is_main:
        write_ds_config(ds_config, run_dir / "ds_config.json")
    engine = build_engine(cfg, model, ds_config)
    mcfg = model.config
    run = Run(
        cfg=cfg,
        env=env,
        languages=list(manifest.languages),
        data_order=stream.order_identity(cfg.train.global_batch_size),
        flops_per_sample=rtd_flops_per_sample(
            mcfg, mcfg.generator_config(), manifest.seq_len, cfg.model.mask_prob
        ),
        peak_flops=peak_flops(cfg.log.peak_flops_per_rank),
        logger=Logger(
            run_dir, env.is_main, cfg.log.tensorboard, cfg.train.max_steps, plan.step if plan else 0
        ),
        memory_probe=memory.ModelStateProbe(engine),
        rss_start_gb=rss_start,
    )
    if pre.valid_manifest is not None:
        run.eval_data = eval_set(pre.valid_manifest, cfg.eval, cfg.data)
    state = resume(engine, plan, run) if plan else TrainState()
    install_signal_handlers(run)
    return engine, stream, state, run


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    dry = dry_run.FLAG in argv
    argv = [a for a in argv if a != dry_run.FLAG]
    if {"-h", "--help"} & set(argv):
        print(f"{__doc__}\nOptions (defaults shown; recipes in launcher/recipes/):\n")
        print(options_help())
        return EXIT_OK
    env = distributed.discover()
    try:
        pre = preflight(parse_args(argv), env.world_size)
    except ConfigError as e:
        print(f"rtdspeed: config error: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    if dry:
        return dry_run.run(pre, env)
    run = stream = None
    try:
        engine, stream, state, run = setup(pre, env)
        cfg = pre.cfg
        run.logger.message(
            f"{env.world_size} rank(s) ({env.launcher}, {torch.get_num_threads()} threads "
            f"each), step {state.step}/{cfg.train.max_steps}, run dir {cfg.run_dir}, "
            f"TensorBoard: {run.logger.tb_dir}, allocator: {allocator.describe()}"
        )
        code = train(engine, stream, state, run)
        if stream.cache is not None:
            run.logger.message(stream.cache.summary())
        return code
    except (checkpoint.ResumeRefused, InitError) as e:
        print(f"rtdspeed: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    except DataError as e:
        if env.is_main:  # every rank knows; one message per job
            print(f"rtdspeed: data error: {e}", file=sys.stderr, flush=True)
        return EXIT_DATA
    except (RemoteError, ShardChecksumError) as e:  # this rank's; the others lose contact
        return report_remote(e, pre.cfg.run_dir, env.rank)
    except RuntimeError as e:
        if not lost_peer(e):
            raise
        report_lost_peer(e, pre.cfg.run_dir, env.rank)
        return EXIT_LOST_RANK
    finally:
        if stream is not None:
            stream.close()
        if run is not None:
            run.logger.close()
        if dist.is_initialized():
            dist.destroy_process_group()
        distributed.release_shm()
