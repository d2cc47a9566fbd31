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

Exit codes: 0 done, or stopped by SIGTERM/SIGINT after saving a checkpoint (under the
`deepspeed` launcher its own launch.py then reports 1 for the signal); 2 invalid config or
refused resume (nothing started); 3 stopped after `train.max_nonfinite_in_a_row` non-finite
steps in a row (no checkpoint written for them).
"""

from __future__ import annotations

import signal
import sys

import torch
import torch.distributed as dist

from data_pipeline.stream import ShardStream
from launcher.config import ConfigError, options_help, parse_args, resolve_path, to_toml
from launcher.factory import build_model
from launcher.hf.import_weights import InitError, init_from_hf
from launcher.train import allocator, checkpoint, distributed
from launcher.train.engine import build_engine, with_universal_load, write_ds_config
from launcher.train.loop import EXIT_CONFIG, EXIT_OK, Run, TrainState, resume, train
from launcher.train.metrics import Logger
from launcher.train.preflight import Preflight, preflight
from model import rtd_flops_per_sample


def peak_flops(configured: float) -> float:
    if configured > 0:
        return configured
    return 312e12 if torch.cuda.is_available() else 1e11


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
    run_dir = cfg.run_dir
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(to_toml(cfg))
    stream = ShardStream(manifest, seed=cfg.run.seed, alpha=cfg.data.alpha)
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
        logger=Logger(run_dir, env.is_main, cfg.log.tensorboard, cfg.train.max_steps),
    )
    state = resume(engine, plan, run) if plan else TrainState()
    install_signal_handlers(run)
    return engine, stream, state, run


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
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
    run = None
    try:
        engine, stream, state, run = setup(pre, env)
        cfg = pre.cfg
        run.logger.message(
            f"{env.world_size} rank(s) ({env.launcher}, {torch.get_num_threads()} threads "
            f"each), step {state.step}/{cfg.train.max_steps}, run dir {cfg.run_dir}, "
            f"TensorBoard: {run.logger.tb_dir}, allocator: {allocator.describe()}"
        )
        return train(engine, stream, state, run)
    except (checkpoint.ResumeRefused, InitError) as e:
        print(f"rtdspeed: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    finally:
        if run is not None:
            run.logger.close()
        if dist.is_initialized():
            dist.destroy_process_group()
        distributed.release_shm()
