"""The training loop: one RTD optimizer step, the train state, log windows, checkpoints.

The engine is DeepSpeed's (`launcher.train.engine`); the micro batches come from
`data_pipeline.stream.ShardStream.rank_batches`. Everything a resume needs besides weights
and optimizer is the `TrainState`, saved in the checkpoint's client state. A step whose loss
is non-finite on any rank is skipped on every rank (the optimizer does not move) and counted.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.stream import MicroBatch, ShardStream
from launcher.config import BEST_METRICS, RunConfig, to_toml
from launcher.evaluate import EvalSet, evaluate
from launcher.train import checkpoint
from launcher.train.distributed import DistEnv
from launcher.train.memory import ModelStateProbe
from launcher.train.metrics import MEAN_KEYS, Logger, memory_metrics, reduce_means

EXIT_OK, EXIT_CONFIG, EXIT_NONFINITE, EXIT_DATA, EXIT_LOST_RANK = 0, 2, 3, 4, 5
EXIT_STORAGE = 6  # the object store stayed unreachable past the retry budget


@dataclass
class TrainState:
    """Everything besides weights and optimizer that a resume needs (saved in client_state)."""

    step: int = 0  # optimizer steps done (skipped non-finite steps included)
    consumed_samples: int = 0  # global samples consumed = the data stream position
    tokens: int = 0  # non-pad tokens seen, all ranks
    lang_tokens: dict[str, int] = field(default_factory=dict)
    nonfinite_steps: int = 0
    nonfinite_in_a_row: int = 0
    best_value: float | None = None  # of eval.best_metric, at the kept checkpoint


@dataclass
class Run:
    """What the loop needs besides the engine: config, rank, data identity, logging."""

    cfg: RunConfig
    env: DistEnv
    languages: list[str]
    data_order: dict  # `ShardStream.order_identity`: checked on resume
    flops_per_sample: float
    peak_flops: float
    logger: Logger
    eval_data: EvalSet | None = None  # the validation rows, when evaluation is on
    stop_requested: bool = False  # set by SIGTERM/SIGINT
    memory_probe: ModelStateProbe | None = None  # model-state bytes at the first steps
    rss_start_gb: float = 0.0  # resident set before the model was built


@dataclass
class StepResult:
    """One optimizer step: this rank's metric sums, and the counts summed over all ranks."""

    sums: dict[str, float]  # MEAN_KEYS summed over this rank's micro batches
    micro_batches: int
    nonfinite: bool  # a loss was non-finite on some rank, or the optimizer skipped the step
    stop: bool  # some rank was asked to stop
    tokens: int  # non-pad tokens, all ranks
    lang_tokens: list[int]  # per language (manifest order), all ranks
    lr: float  # the lr this step trained with


def all_reduce_counts(
    nonfinite: int, stop: int, tokens: int, lang_tokens: np.ndarray, device: torch.device
) -> tuple[int, int, int, list[int]]:
    """Sum the step's counts over ranks in one all_reduce (float64 holds them exactly), on
    the engine's device: NCCL reduces only CUDA tensors, gloo CPU ones."""
    counts = [nonfinite, stop, tokens, *lang_tokens.tolist()]
    vec = torch.tensor(counts, dtype=torch.float64, device=device)
    dist.all_reduce(vec)
    n, s, t, *langs = (int(v) for v in vec.tolist())
    return n, s, t, langs


def train_step(engine, micro_batches: list[MicroBatch], run: Run) -> StepResult:
    """One optimizer step over this rank's micro batches. Non-finite losses (on any rank)
    make the whole step a skipped one."""
    device = engine.device
    sums = dict.fromkeys(MEAN_KEYS, 0.0)
    nonfinite, tokens = 0, 0
    lang_tokens = np.zeros(len(run.languages), dtype=np.int64)
    for i, mb in enumerate(micro_batches):
        input_ids = torch.from_numpy(mb.input_ids).to(device=device, dtype=torch.long)
        seed = mb.seed(run.cfg.run.seed)
        torch.manual_seed(seed)  # dropout
        generator = torch.Generator(device=device).manual_seed(seed)  # masking, sampling
        out = engine(input_ids, generator=generator)
        nonfinite += not torch.isfinite(out.loss).item()
        tokens += int(out.num_tokens.item())
        lang_tokens += mb.lang_tokens
        for k in MEAN_KEYS:
            sums[k] += getattr(out, k).item()
        engine.backward(out.loss)
        if i < len(micro_batches) - 1:
            engine.step()  # not a boundary: DeepSpeed only counts the micro step
    lr = engine.get_lr()[0]  # the lr this step trains with (the schedule moves after)
    nonfinite, stop, tokens, langs = all_reduce_counts(
        nonfinite, run.stop_requested, tokens, lang_tokens, device
    )
    if nonfinite and engine.zero_optimization_stage() == 0 and not engine.fp16_enabled():
        skip_optimizer_step(engine)
    else:
        engine.step()  # ZeRO >= 1 and fp16 skip a step with non-finite gradients themselves
    applied = engine.was_step_applied() or engine.fp16_enabled()
    return StepResult(
        sums=sums,
        micro_batches=len(micro_batches),
        nonfinite=nonfinite > 0 or not applied,
        stop=stop > 0,
        tokens=tokens,
        lang_tokens=langs,
        lr=lr,
    )


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


def update_state(state: TrainState, result: StepResult, languages: list[str], global_batch: int):
    """Advance the train state past one step (skipped or not)."""
    state.step += 1
    state.consumed_samples += global_batch
    state.tokens += result.tokens
    for lang, n in zip(languages, result.lang_tokens, strict=True):
        state.lang_tokens[lang] = state.lang_tokens.get(lang, 0) + n
    state.nonfinite_steps += result.nonfinite
    state.nonfinite_in_a_row = state.nonfinite_in_a_row + 1 if result.nonfinite else 0


@dataclass
class LogWindow:
    """The steps since the last log line; metrics are means over the whole window."""

    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(MEAN_KEYS, 0.0))
    micro_batches: int = 0
    tokens: int = 0
    steps: int = 0
    lr: float = float("nan")  # the last step's

    def add(self, result: StepResult) -> None:
        for k, v in result.sums.items():
            self.sums[k] += v
        self.micro_batches += result.micro_batches
        self.tokens += result.tokens
        self.steps += 1
        self.lr = result.lr


def window_metrics(engine, window: LogWindow, run: Run, seconds: float, state: TrainState):
    """Metrics of one log window; `seconds` is its mean step time, lr and gradient norm are
    the last step's. All-reduces: every rank calls it."""
    m = reduce_means(window.sums, window.micro_batches, engine.device)
    samples = run.cfg.train.global_batch_size
    gnorm = engine.get_global_grad_norm()
    m.update(
        lr=window.lr,
        grad_norm=float(gnorm) if gnorm is not None else float("nan"),
        nonfinite_steps=state.nonfinite_steps,
        skipped_steps=engine.skipped_steps,  # DeepSpeed's count: overflow (fp16) and ZeRO skips
        samples_per_s=samples / seconds,
        tokens_per_s=window.tokens / (seconds * window.steps),
        tokens=state.tokens,
        **memory_metrics(),
        rss_start_gb=run.rss_start_gb,
    )
    if run.memory_probe is not None and run.memory_probe.gb is not None:
        m["model_states_gb"] = run.memory_probe.gb
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


def run_evaluation(engine, state: TrainState, run: Run) -> bool:
    """Held-out figures at this step (every rank; rank 0 logs them under eval/). True when
    they are the best so far by `eval.best_metric` (the caller then keeps a checkpoint)."""
    t0 = time.time()
    results = evaluate(engine.module, run.eval_data, run.cfg.eval.mask_seed)
    run.logger.log_eval(state.step, results, time.time() - t0)
    metric = run.cfg.eval.best_metric
    if not metric or state.step == 0:
        return False
    value = results["all"][metric]
    better = state.best_value is None or (
        value > state.best_value if BEST_METRICS[metric] else value < state.best_value
    )
    if better and math.isfinite(value):
        state.best_value = value
        return True
    return False


def save_checkpoint(engine, state: TrainState, run: Run) -> None:
    ckpt_dir = run.cfg.run_dir / "checkpoints"
    cs = client_state(state, run)
    checkpoint.save(engine, ckpt_dir, state.step, cs, run.cfg.checkpoint.keep_last)
    run.logger.message(f"checkpoint step {state.step} saved in {ckpt_dir}")


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


def train(engine, stream: ShardStream, state: TrainState, run: Run) -> int:
    """Steps until `train.max_steps`, a stop signal or too many non-finite steps in a row;
    returns the exit code."""
    cfg = run.cfg
    gas = engine.gradient_accumulation_steps()
    batches = stream.rank_batches(
        start_sample=state.consumed_samples,
        global_batch_size=cfg.train.global_batch_size,
        micro_batch_size=cfg.train.micro_batch_size,
        rank=run.env.rank,
        world_size=run.env.world_size,
        start_step=state.step,
    )
    first_step, saved_step = state.step, state.step
    every_eval = cfg.eval.every_steps if run.eval_data is not None else 0
    if every_eval and state.step == 0:
        run_evaluation(engine, state, run)  # the figures before any training
    window = LogWindow()
    t0 = time.time()
    while state.step < cfg.train.max_steps:
        result = train_step(engine, [next(batches) for _ in range(gas)], run)
        window.add(result)
        update_state(state, result, run.languages, cfg.train.global_batch_size)
        if result.nonfinite:
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
            metrics = window_metrics(engine, window, run, (t1 - t0) / window.steps, state)
            metrics["consumed_samples"] = state.consumed_samples
            run.logger.log(state.step, metrics, state.lang_tokens)
            run.logger.console(state.step, metrics, state.step - first_step)
            t0, window = t1, LogWindow()
        if every_eval and (state.step % every_eval == 0 or state.step == cfg.train.max_steps):
            new_best = run_evaluation(engine, state, run)
            t0 = time.time()  # the next window's step times without the evaluation
        else:
            new_best = False
        if state.step % cfg.checkpoint.every_steps == 0 or result.stop or new_best:
            save_checkpoint(engine, state, run)
            saved_step = state.step
        if new_best and run.env.is_main:
            ckpt_dir = cfg.run_dir / "checkpoints"
            checkpoint.record_best(ckpt_dir, cfg.eval.best_metric, state.step, state.best_value)
            run.logger.message(
                f"best {cfg.eval.best_metric} so far ({state.best_value:.4f}): "
                f"checkpoint step {state.step} kept"
            )
        if result.stop:
            run.logger.message(f"stopped by signal at step {state.step} (checkpoint saved)")
            return EXIT_OK
    if saved_step != state.step:
        save_checkpoint(engine, state, run)
    return EXIT_OK
