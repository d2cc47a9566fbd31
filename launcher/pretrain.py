"""DeBERTaV3 RTD pretraining on DeepSpeed: one entry for every launcher.

He, Gao, Chen, "DeBERTaV3: Improving DeBERTa using ELECTRA-Style Pre-Training with
Gradient-Disentangled Embedding Sharing", arXiv 2111.09543.

One process (CPU or one GPU):
    python launcher/pretrain.py --config launcher/recipes/demo.toml \
        --data.shards_dir=SHARDS --data.tokenizer_dir=TOK
One node, N ranks (GPUs, or CPU processes without CUDA):
    deepspeed --num_gpus N launcher/pretrain.py --config launcher/recipes/base.toml ...
Multi-node (hostfile lists `host slots=N`; ssh/pdsh from the first node):
    deepspeed --hostfile H launcher/pretrain.py --config launcher/recipes/base.toml ...
Multi-node without ssh (run on every node i = 0..K-1):
    deepspeed --hostfile H --no_ssh --node_rank i --master_addr HOST0 --master_port 29500 \
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

import copy
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python launcher/pretrain.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if __name__ == "__main__":  # before torch is imported, so a re-exec costs little
    from launcher.allocator import reexec_with_tcmalloc

    reexec_with_tcmalloc()

import numpy as np
import torch
import torch.distributed as dist

from launcher import allocator, checkpoint, distributed
from launcher.config import ConfigError, RunConfig, parse_args, resolve_path, to_toml, validate
from launcher.engine import build_ds_config, build_engine, write_ds_config
from launcher.hf_init import InitError
from launcher.observe import MEAN_KEYS, Logger, memory_metrics, reduce_means

EXIT_OK, EXIT_CONFIG, EXIT_NONFINITE = 0, 2, 3


@dataclass
class TrainState:
    """Everything besides weights and optimizer that a resume needs (saved in client_state)."""

    step: int = 0  # optimizer steps done (skipped non-finite steps included)
    consumed_samples: int = 0  # global samples consumed = the data stream position
    tokens: int = 0  # non-pad tokens seen, all ranks
    lang_tokens: dict[str, int] = field(default_factory=dict)
    nonfinite_steps: int = 0
    nonfinite_in_a_row: int = 0


@dataclass
class Run:
    """What the loop needs besides the engine: config, rank, data, logging, fixed numbers."""

    cfg: RunConfig
    env: distributed.DistEnv
    languages: list[str]
    pad_id: int
    data_order: dict  # inputs that fix the global sample order (checked on resume)
    flops_per_sample: float
    peak_flops: float
    logger: Logger
    stop_requested: bool = False


def micro_batch_seed(seed: int, step: int, first_sample: int) -> int:
    """Seed for masking, sampling and dropout of one micro batch: a function of the samples,
    not of the rank, so 1 and N ranks (and a resumed run) draw the same random numbers."""
    return int(np.random.SeedSequence([seed, step, first_sample]).generate_state(1)[0])


def train_step(engine, micro_batches: list[dict], state: TrainState, run: Run) -> dict:
    """One optimizer step over this rank's micro batches; returns the summed metrics and the
    all-reduced flags. Non-finite losses (on any rank) make the whole step a skipped one."""
    cfg, device = run.cfg, engine.device
    sums = dict.fromkeys(MEAN_KEYS, 0.0)
    # [any non-finite loss, stop requested, tokens, tokens per language...], summed over ranks
    flags = torch.zeros(3 + len(run.languages), dtype=torch.float64)
    for i, mb in enumerate(micro_batches):
        input_ids = torch.from_numpy(mb["input_ids"]).to(device=device, dtype=torch.long)
        seed = micro_batch_seed(cfg.run.seed, state.step, int(mb["sample_index"][0]))
        torch.manual_seed(seed)  # dropout
        generator = torch.Generator(device=device).manual_seed(seed)  # masking, sampling
        out = engine(input_ids, generator=generator)
        loss = out.loss
        if state.step in cfg.train.inject_nonfinite_steps:  # test hook
            loss = loss * float("nan")
        flags[0] += float(not torch.isfinite(loss).item())
        flags[2] += out.num_tokens.item()
        per_row = (mb["input_ids"] != run.pad_id).sum(axis=1)
        flags[3:] += torch.from_numpy(np.bincount(mb["lang"], per_row, len(run.languages)))
        for k in MEAN_KEYS:
            sums[k] += getattr(out, k).item()
        engine.backward(loss)
        if i < len(micro_batches) - 1:
            engine.step()  # not a boundary: DeepSpeed only counts the micro step
    lr = engine.get_lr()[0]  # the lr this step trains with (the schedule moves after)
    flags[1] = float(run.stop_requested)
    dist.all_reduce(flags)
    if flags[0] > 0 and engine.zero_optimization_stage() == 0 and not engine.fp16_enabled():
        skip_optimizer_step(engine)
    else:
        engine.step()  # ZeRO >= 1 and fp16 skip a step with non-finite gradients themselves
    applied = engine.was_step_applied() or engine.fp16_enabled()
    return {"sums": sums, "count": len(micro_batches), "flags": flags, "applied": applied, "lr": lr}


def skip_optimizer_step(engine) -> None:
    """ZeRO-0 without fp16 has no overflow check: run the engine's step (counters, schedule)
    on zero gradients, then put the weights and optimizer state back as they were."""
    params = [p for p in engine.module.parameters() if p.requires_grad]
    saved_params = [p.detach().clone() for p in params]
    state = engine.optimizer.state  # per-parameter moments; param_groups (lr) move on
    saved_state = {p: copy.deepcopy(st) for p, st in state.items()}
    for p in params:
        p.grad = torch.zeros_like(p)
    engine.step()
    with torch.no_grad():
        for p, saved in zip(params, saved_params, strict=True):
            p.copy_(saved)
    state.clear()
    state.update(saved_state)


def update_state(state: TrainState, result: dict, run: Run, global_batch: int) -> bool:
    """Advance the train state after a step; True if the step was non-finite (skipped)."""
    flags = result["flags"]
    nonfinite = flags[0].item() > 0 or not result["applied"]
    state.step += 1
    state.consumed_samples += global_batch
    state.tokens += int(flags[2].item())
    for lang, n in zip(run.languages, flags[3:].tolist(), strict=True):
        state.lang_tokens[lang] = state.lang_tokens.get(lang, 0) + int(n)
    state.nonfinite_steps += nonfinite
    state.nonfinite_in_a_row = state.nonfinite_in_a_row + 1 if nonfinite else 0
    return nonfinite


def accumulate(window: dict | None, result: dict) -> dict:
    """Sum the step results of one log window (metrics are means over the whole window)."""
    if window is None:
        window = {"sums": dict.fromkeys(result["sums"], 0.0), "count": 0, "flags": 0}
    for k, v in result["sums"].items():
        window["sums"][k] += v
    window["count"] += result["count"]
    window["flags"] = window["flags"] + result["flags"]
    window["lr"] = result["lr"]  # the last step's
    return window


def step_metrics(
    engine, result: dict, run: Run, seconds: float, state: TrainState, steps: int = 1
) -> dict:
    """Metrics of one log window of `steps` steps: `result` holds their summed results,
    `seconds` the mean step time; lr and gradient norm are the last step's."""
    m = reduce_means(result["sums"], result["count"])
    samples = run.cfg.train.global_batch_size
    gnorm = engine.get_global_grad_norm()
    m.update(
        lr=result["lr"],
        grad_norm=float(gnorm) if gnorm is not None else float("nan"),
        nonfinite_steps=state.nonfinite_steps,
        skipped_steps=engine.skipped_steps,  # DeepSpeed's count: overflow (fp16) and ZeRO skips
        samples_per_s=samples / seconds,
        tokens_per_s=result["flags"][2].item() / (seconds * steps),
        tokens=state.tokens,
        **memory_metrics(),
    )
    tflops = samples * run.flops_per_sample / seconds / run.env.world_size / 1e12
    m.update(tflops_per_rank=tflops, mfu=tflops * 1e12 / run.peak_flops)
    if engine.fp16_enabled():
        m["loss_scale"] = float(engine.optimizer.cur_scale)
    return m


def client_state(state: TrainState, run: Run) -> dict:
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    rngs = [None] * run.env.world_size
    dist.all_gather_object(rngs, rng)
    return {
        "train_state": asdict(state),
        "rng_states": rngs,  # per rank; every micro batch also reseeds from its samples
        "data_order": run.data_order,
        "config_sha256": run.cfg.sha256(),
        "config_toml": to_toml(run.cfg),
    }


def train(engine, stream, state: TrainState, run: Run) -> int:
    cfg = run.cfg
    gas = engine.gradient_accumulation_steps()
    batches = stream.rank_batches(
        start_sample=state.consumed_samples,
        global_batch_size=cfg.train.global_batch_size,
        micro_batch_size=cfg.train.micro_batch_size,
        rank=run.env.rank,
        world_size=run.env.world_size,
    )
    first_step, saved_step, last_log_step = state.step, state.step, state.step
    window = None  # summed step results since the last log line
    t0 = time.time()
    while state.step < cfg.train.max_steps:
        result = train_step(engine, [next(batches) for _ in range(gas)], state, run)
        window = accumulate(window, result)
        nonfinite = update_state(state, result, run, cfg.train.global_batch_size)
        if nonfinite:
            run.logger.message(
                f"step {state.step}: non-finite loss or gradient, step skipped "
                f"({state.nonfinite_in_a_row} in a row, {state.nonfinite_steps} in total)"
            )
        if state.nonfinite_in_a_row >= cfg.train.max_nonfinite_in_a_row:
            run.logger.message(
                f"stopping: {state.nonfinite_in_a_row} non-finite steps in a row (limit "
                f"train.max_nonfinite_in_a_row={cfg.train.max_nonfinite_in_a_row}); last "
                f"complete checkpoint: step {saved_step}. Lower optim.lr or check the data."
            )
            return EXIT_NONFINITE
        if state.step % cfg.log.every_steps == 0 or state.step == cfg.train.max_steps:
            t1 = time.time()
            steps = state.step - last_log_step
            metrics = step_metrics(engine, window, run, (t1 - t0) / steps, state, steps)
            window = None
            metrics["consumed_samples"] = state.consumed_samples
            run.logger.log(state.step, metrics, state.lang_tokens)
            run.logger.console(state.step, metrics, state.step - first_step)
            t0, last_log_step = t1, state.step
        stop = result["flags"][1].item() > 0
        if state.step % cfg.checkpoint.every_steps == 0 or stop:
            save_checkpoint(engine, state, run)
            saved_step = state.step
        if stop:
            run.logger.message(f"stopped by signal at step {state.step} (checkpoint saved)")
            return EXIT_OK
    if saved_step != state.step:
        save_checkpoint(engine, state, run)
    return EXIT_OK


def save_checkpoint(engine, state: TrainState, run: Run) -> None:
    c, ckpt_dir = run.cfg.checkpoint, run.cfg.run_dir / "checkpoints"
    cs = client_state(state, run)
    checkpoint.save(engine, ckpt_dir, state.step, cs, c.keep_last, c.test_crash_before_marker_step)
    run.logger.message(f"checkpoint step {state.step} saved in {ckpt_dir}")


# -- setup ---------------------------------------------------------------------------------
def build_model(cfg: RunConfig, vocab_size: int, special_ids: dict[str, int]):
    from model import DebertaV3Config, RTDModel, SpecialTokens, round_vocab

    m = cfg.model
    mcfg = DebertaV3Config.from_preset(
        m.preset,
        vocab_size=m.vocab_size or round_vocab(vocab_size),
        hidden_dropout_prob=m.dropout,
        attention_probs_dropout_prob=m.dropout,
        gradient_checkpointing=m.gradient_checkpointing,
    )
    special = SpecialTokens(
        pad_id=special_ids["pad"],
        cls_id=special_ids["cls"],
        sep_id=special_ids["sep"],
        unk_id=special_ids["unk"],
        mask_id=special_ids["mask"],
        vocab_size=vocab_size,
    )
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    model = RTDModel(mcfg, special, m.sharing, m.mask_prob, m.rtd_weight)
    return model, mcfg


def resume(engine, plan: checkpoint.ResumePlan, run: Run) -> TrainState:
    """Load the planned checkpoint into the engine and return its train state."""
    ckpt_dir = run.cfg.run_dir / "checkpoints"
    path, client = checkpoint.load(engine, ckpt_dir, plan.tag)
    if path is None:
        raise checkpoint.ResumeRefused(f"DeepSpeed could not load checkpoint {plan.tag}")
    checkpoint.check_data_order(
        client["data_order"], run.data_order, run.cfg.checkpoint.force_resume
    )
    rngs = client["rng_states"]
    if len(rngs) == run.env.world_size:
        torch.set_rng_state(rngs[run.env.rank]["torch"])
        np.random.set_state(rngs[run.env.rank]["numpy"])
    state = TrainState(**client["train_state"])
    run.logger.message(
        f"resumed from {plan.tag}{' (universal checkpoint)' if plan.universal else ''}: "
        f"step {state.step}, {state.consumed_samples} samples consumed"
    )
    return state


def install_signal_handlers(run: Run) -> None:
    """SIGTERM/SIGINT: finish the current step, save a checkpoint, exit 0."""

    def handler(signum, frame):
        run.stop_requested = True

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def peak_flops(cfg: RunConfig) -> float:
    if cfg.log.peak_flops_per_rank > 0:
        return cfg.log.peak_flops_per_rank
    return 312e12 if torch.cuda.is_available() else 1e11


def init_weights(model, cfg: RunConfig, tokenizer_sha256: str, is_main: bool) -> None:
    """Continued pretraining: weights from a Hugging Face directory (`init.from_dir`)."""
    from launcher.hf_init import init_from_hf

    gen = resolve_path(cfg.init.generator_dir) if cfg.init.generator_dir else None
    report = init_from_hf(
        model, resolve_path(cfg.init.from_dir), generator_dir=gen, tokenizer_sha256=tokenizer_sha256
    )
    if is_main:
        print(f"rtdspeed: {report.summary()}", flush=True)


def setup(cfg: RunConfig, env: distributed.DistEnv):
    """Process group, data, model, engine, resume: returns (engine, stream, state, run)."""
    from data_pipeline.loader import ShardStream
    from data_pipeline.tokenizer import load_tokenizer_dir
    from model import rtd_flops_per_sample

    distributed.init(env)
    distributed.set_cpu_threads(env)
    run_dir = cfg.run_dir
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(to_toml(cfg))
    stream = ShardStream(cfg.data.shards_dir, seed=cfg.run.seed, alpha=cfg.data.alpha)
    manifest, tok = stream.manifest, load_tokenizer_dir(cfg.data.tokenizer_dir)
    model, mcfg = build_model(cfg, tok.vocab_size, tok.special_ids)
    plan = None
    if cfg.checkpoint.resume:
        plan = checkpoint.plan_resume(run_dir / "checkpoints", env.world_size, env.rank)
    if cfg.init.from_dir and plan is None:  # before the engine: ZeRO-3 partitions parameters
        init_weights(model, cfg, tok.sha256, env.is_main)
    ds_config = build_ds_config(cfg, env.world_size, load_universal=bool(plan and plan.universal))
    if env.is_main:
        write_ds_config(ds_config, run_dir / "ds_config.json")
    engine = build_engine(cfg, model, ds_config)
    run = Run(
        cfg=cfg,
        env=env,
        languages=list(manifest.languages),
        pad_id=tok.special_ids["pad"],
        data_order={
            "seed": cfg.run.seed,
            "global_batch_size": cfg.train.global_batch_size,
            "alpha": cfg.data.alpha,
            "manifest": manifest.fingerprint(),
        },
        flops_per_sample=rtd_flops_per_sample(
            mcfg, mcfg.generator_config(), manifest.seq_len, cfg.model.mask_prob
        ),
        peak_flops=peak_flops(cfg),
        logger=Logger(run_dir, env.is_main, cfg.log.tensorboard, cfg.train.max_steps),
    )
    state = resume(engine, plan, run) if plan else TrainState()
    install_signal_handlers(run)
    return engine, stream, state, run


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        from launcher.config import options_help

        print(f"{__doc__}\nOptions (defaults shown; recipes in launcher/recipes/):\n")
        print(options_help())
        return EXIT_OK
    env = distributed.discover()
    try:
        cfg = parse_args(argv)
        validate(cfg, env.world_size)
    except ConfigError as e:
        print(f"rtdspeed: config error: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    run = None
    try:
        engine, stream, state, run = setup(cfg, env)
        run.logger.message(
            f"{env.world_size} rank(s) ({env.launcher}, {torch.get_num_threads()} threads "
            f"each), step {state.step}/"
            f"{cfg.train.max_steps}, run dir {cfg.run_dir}, TensorBoard: {run.logger.tb_dir}, "
            f"allocator: {allocator.describe()}"
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


if __name__ == "__main__":
    sys.exit(main())
