"""`launcher/pretrain.py ... --dry-run`: check a launch and say what it would do, then exit.

Everything before the first message to another rank runs as in the real launch: rank
discovery from the launcher's environment (`distributed.discover`) and the full preflight
(config values, ds_configs merge, precision on this accelerator, tokenizer, manifest,
`init.*` directories; `launcher.train.preflight`). Then rank 0 prints the rank layout, the
batch arithmetic (micro x ranks x gradient accumulation = global), the data and model, where
the run directory would be and whether the run would resume, the resolved run config and the
DeepSpeed config; every other rank prints one line with the rank it found. No process group,
no engine, nothing written: the run directory is not created. A config error exits 2 with
the same message as the real launch.

Not checked: the rendezvous with the other ranks, the shards' sha256 (hashed when the run
starts; `python -m data_pipeline.verify SHARDS` does it now), memory.
"""

from __future__ import annotations

import json
import os
import socket
import textwrap
from pathlib import Path

import torch
from deepspeed.accelerator import get_accelerator

from launcher.config import RunConfig, to_toml
from launcher.factory import model_config
from launcher.train import checkpoint, distributed
from launcher.train.distributed import DistEnv
from launcher.train.loop import EXIT_OK
from launcher.train.preflight import Preflight
from model import rtd_flops_per_sample

FLAG = "--dry-run"

LAUNCHERS = {
    "env": "the deepspeed launcher or torchrun (RANK, WORLD_SIZE, LOCAL_RANK)",
    "mpi": "mpirun (OMPI_COMM_WORLD_* or PMI_*)",
    "slurm": "srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID)",
    "single": "no launcher: one process",
}
RUN_FILES = "config.toml, ds_config.json, metrics.jsonl, tensorboard/, checkpoints/"
NOT_CHECKED = (
    "the rendezvous with the other ranks, the shards' sha256 (hashed when the run starts; "
    "`python -m data_pipeline.verify SHARDS` does it now), memory"
)
WIDTH = 100


def run(pre: Preflight, env: DistEnv) -> int:
    """Print the report (rank 0) or this rank's line (the others). Returns the exit code."""
    threads = distributed.set_cpu_threads(env)  # this process only, as the run would
    if env.is_main:
        print(report(pre, env, threads), flush=True)
    else:
        print(f"rtdspeed: dry run, {rank_line(env)}: preflight passed", flush=True)
    return EXIT_OK


def rank_line(env: DistEnv) -> str:
    return (
        f"rank {env.rank} of {env.world_size} ({env.launcher}), local rank {env.local_rank} "
        f"of {env.local_size} on {socket.gethostname()}"
    )


def rendezvous(env: DistEnv) -> str:
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if env.launcher == "single":
        return "none (one process; a free local port)"
    if addr and port:
        return f"{addr}:{port} (MASTER_ADDR, MASTER_PORT)"
    if env.launcher == "mpi":
        return "rank 0's address, broadcast through mpi4py when the run starts"
    return "127.0.0.1:29500 (MASTER_ADDR / MASTER_PORT not set)"


def device(env: DistEnv, threads: int) -> str:
    if torch.cuda.is_available():
        return (
            f"cuda, {torch.cuda.device_count()} device(s) visible; this rank would use "
            f"cuda:{env.local_rank}"
        )
    return f"{get_accelerator().device_name()} (gloo), {threads} torch thread(s) per rank"


def engine_line(ds_config: dict) -> str:
    zero = ds_config.get("zero_optimization", {})
    enabled = [k for k in ("bf16", "fp16") if ds_config.get(k, {}).get("enabled", False)]
    offload = zero.get("offload_optimizer", {}).get("device", "none")
    return (
        f"ZeRO stage {zero.get('stage', 0)}, precision {enabled[0] if enabled else 'fp32'}, "
        f"optimizer offload {offload}"
    )


def resume_state(cfg: RunConfig, world_size: int) -> str:
    """What the run would start from, read from the run directory (nothing converted)."""
    run_dir = cfg.run_dir
    if not run_dir.exists():
        return "not there yet: a new run"
    tags = checkpoint.complete_tags(run_dir / "checkpoints")
    if not tags:
        return "exists, no complete checkpoint: starts at step 0"
    step, tag, marker = tags[-1]
    if not cfg.checkpoint.resume:
        return f"has checkpoints up to step {step}, but checkpoint.resume=false: starts at step 0"
    if step >= cfg.train.max_steps:
        return f"finished: checkpoint {tag} is at train.max_steps={cfg.train.max_steps}"
    if marker["world_size"] == world_size:
        return f"resumes from step {step} ({tag})"
    return (
        f"resumes from step {step} through a universal checkpoint: {tag} was written by "
        f"{marker['world_size']} rank(s), converted when the run starts"
    )


def report(pre: Preflight, env: DistEnv, threads: int) -> str:
    cfg, tok, manifest, ds_config = pre.cfg, pre.tokenizer, pre.manifest, pre.ds_config
    t, seq_len = cfg.train, manifest.seq_len
    rows = sum(manifest.rows_per_language().values())
    accumulation = ds_config["gradient_accumulation_steps"]
    samples = t.global_batch_size * t.max_steps
    mcfg = model_config(cfg.model, tok)
    gen = mcfg.generator_config()
    step_flops = t.global_batch_size * rtd_flops_per_sample(mcfg, gen, seq_len, cfg.model.mask_prob)
    run_dir = Path.cwd() / cfg.run_dir  # as written, when absolute
    fields = [
        ("ranks", f"{env.world_size}, found by {LAUNCHERS[env.launcher]}"),
        ("", f"{env.local_size} on this node; this process is {rank_line(env)}"),
        ("rendezvous", rendezvous(env)),
        ("device", device(env, threads)),
        ("engine", engine_line(ds_config)),
        (
            "batch",
            f"global {t.global_batch_size} = micro {t.micro_batch_size} x {env.world_size} "
            f"rank(s) x {accumulation} gradient accumulation step(s)",
        ),
        ("", f"{t.global_batch_size * seq_len:,} tokens per step ({seq_len} per sample)"),
        (
            "steps",
            f"{t.max_steps:,} x {t.global_batch_size} = {samples:,} samples = "
            f"{samples / rows:,.2f} passes over the {rows:,} rows",
        ),
        (
            "data",
            f"{cfg.data.shards_dir}: {len(manifest.languages)} language(s), {rows:,} rows x "
            f"{seq_len} in {len(manifest.shards)} shard(s), fingerprint "
            f"{manifest.fingerprint()[:16]}",
        ),
        ("tokenizer", f"{cfg.data.tokenizer_dir}: {tok.vocab_size} ids, sha256 {tok.sha256[:16]}"),
        (
            "model",
            f"{cfg.model.preset}: discriminator {mcfg.num_hidden_layers} x {mcfg.hidden_size} "
            f"({mcfg.num_attention_heads} heads), generator {gen.num_hidden_layers} x "
            f"{gen.hidden_size}, vocab {mcfg.vocab_size}, sharing {cfg.model.sharing}; "
            f"{step_flops / 1e12:,.3g} TFLOP per step",
        ),
        ("run dir", f"{run_dir} ({resume_state(cfg, env.world_size)})"),
        ("", f"the run writes {RUN_FILES} there"),
    ]
    if cfg.init.from_dir:
        gen_dir = f", generator {cfg.init.generator_dir}" if cfg.init.generator_dir else ""
        fields.append(("init", f"{cfg.init.from_dir}{gen_dir} (a new run starts from it)"))
    fields += [("warning", w) for w in pre.warnings]
    lines = ["rtdspeed: dry run: checked, nothing started and nothing written", ""]
    fields.append(("not checked", NOT_CHECKED))
    for name, text in fields:
        lines += textwrap.wrap(
            text,
            WIDTH,
            initial_indent=f"  {name:12} ",
            subsequent_indent=" " * 15,
            break_long_words=False,
            break_on_hyphens=False,
        )
    lines += [
        "",
        f"--- run config ({cfg.run_dir / 'config.toml'}) ---",
        to_toml(cfg).rstrip(),
        f"--- DeepSpeed config ({cfg.run_dir / 'ds_config.json'}) ---",
        json.dumps(ds_config, indent=2, sort_keys=True),
        "",
        f"rtdspeed: dry run passed; the same command without {FLAG} starts this run",
    ]
    return "\n".join(lines)
