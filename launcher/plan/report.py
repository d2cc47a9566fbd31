"""The planner's printed report and the run-config recipe it writes."""

from __future__ import annotations

import textwrap
from collections.abc import Callable

from launcher.config import REPO_ROOT, RunConfig, load_toml, to_toml
from launcher.plan.estimate import GIB, Plan, StagePlan

PRECISION_CONFIGS = {"bf16": ["ds_configs/bf16.json"], "fp16": ["ds_configs/fp16.json"], "fp32": []}


def zero_config(stage: int, offload: bool) -> str:
    """The ds_configs file of a stage (what the planner read, and what a recipe names)."""
    if offload and stage == 2:
        return "ds_configs/zero2_offload.json"
    if offload:
        raise ValueError(f"ds_configs/ has no offload config for ZeRO-{stage}; offload: ZeRO-2")
    return f"ds_configs/zero{stage}.json"


def _row(label: str, stages: list[StagePlan], cell: Callable[[StagePlan], str]) -> str:
    return f"  {label:<44}" + "".join(f"{cell(s):>15}" for s in stages)


def _gib(x: float | None) -> str:
    return "-" if x is None else f"{x / GIB:.2f}"


def _memory_rows(p: Plan) -> list[str]:
    s, margin = p.stages, p.assumptions.safety_margin
    return [
        _row("weights", s, lambda x: _gib(x.states.weights)),
        _row("gradients", s, lambda x: _gib(x.states.gradients)),
        _row("optimizer (fp32 master + Adam moments)", s, lambda x: _gib(x.states.optimizer)),
        _row("gradient buckets (reduce_bucket_size)", s, lambda x: _gib(x.states.buffers)),
        _row("= model states", s, lambda x: _gib(x.states.total)),
        _row(
            "  DeepSpeed's estimator (ZeRO-3: + gathered)",
            s,
            lambda x: _gib(x.states.deepspeed_gpu),
        ),
        _row("gathered parameters (ZeRO-3, 2 x largest)", s, lambda x: _gib(x.states.gathered)),
        _row(
            "runtime reserve (CUDA context, NCCL; assumed)",
            s,
            lambda x: f"{p.assumptions.runtime_gb:.2f}",
        ),
        _row("activations of one micro batch", s, lambda x: _gib(x.activation.total)),
        _row(
            f"largest micro batch ({margin:.0%} memory kept free)",
            s,
            lambda x: str(x.micro_batch) if x.fits else "none fits",
        ),
        _row("gradient accumulation steps", s, lambda x: str(x.grad_accum) if x.fits else "-"),
        _row("peak per device", s, lambda x: _gib(x.peak)),
        _row(
            f"budget ({1 - margin:.0%} of {p.cluster.gpu_memory_gb:g} GiB)",
            s,
            lambda x: _gib(x.budget),
        ),
    ] + [  # only when something is offloaded
        _row("CPU memory per node (offload)", s, lambda x: _gib(x.states.cpu_per_node))
        for _ in range(any(x.offload for x in s))
    ]


def _time_rows(p: Plan) -> list[str]:
    s, w, world = p.stages, p.workload, p.cluster.world
    tokens = w.global_batch * w.seq_len
    hours = [x.step_s * w.steps / 3600 for x in s]
    return [
        _row("step time, s", s, lambda x: f"{x.step_s:.3f}"),
        _row("tokens/s (all ranks)", s, lambda x: f"{tokens / x.step_s:,.0f}"),
        _row(f"{w.steps:,} steps: days", s, lambda x: f"{x.step_s * w.steps / 86400:.1f}"),
        _row(f"{w.steps:,} steps: GPU-hours", s, lambda x: f"{hours[s.index(x)] * world:,.0f}"),
        _row("all-reduce, GB per rank per step", s, lambda x: f"{x.comm.all_reduce / 1e9:.2f}"),
        _row(
            "reduce-scatter, GB per rank per step",
            s,
            lambda x: f"{x.comm.reduce_scatter / 1e9:.2f}",
        ),
        _row("all-gather, GB per rank per step", s, lambda x: f"{x.comm.all_gather / 1e9:.2f}"),
        _row("inter-node, GB per node per step", s, lambda x: f"{x.inter_node / 1e9:.2f}"),
        _row(
            "node bandwidth to hide it, Gbit/s", s, lambda x: f"{x.bandwidth_needed * 8 / 1e9:.1f}"
        ),
    ]


def render(p: Plan) -> str:
    """The report `python -m launcher.plan` prints."""
    w, c, a, n = p.workload, p.cluster, p.assumptions, p.params
    cfg = w.model_config()
    lines = [
        f"rtdspeed plan: {w.preset} (vocab {cfg.vocab_size:,}, {w.sharing}), {c.nodes} nodes x "
        f"{c.gpus_per_node} GPUs = {c.world} ranks of {c.gpu_memory_gb:g} GiB, seq {w.seq_len}, "
        f"global batch {w.global_batch}, {w.precision}, {w.attention} attention"
        + (", activation checkpointing" if w.gradient_checkpointing else ""),
        "",
        "parameters (model.shapes.param_counts: the model built on the meta device, exact)",
        f"  generator {n.generator:,} | discriminator + RTD head {n.discriminator:,} | "
        f"E_G (shared) {n.shared_embedding:,} | E_D's own table {n.delta_embedding:,} | "
        f"total {n.total:,}",
        "",
        f"  {'per device, GiB':<44}" + "".join(f"{s.name:>15}" for s in p.stages),
        *_memory_rows(p),
        "",
        f"  FLOPs per token {p.flops_per_token / 1e9:.2f} GFLOP (model.rtd_flops_per_sample, "
        f"train = 3 x forward), at {a.mfu:.0%} MFU of {a.peak_tflops:g} TFLOP/s per device",
        *_time_rows(p),
        "",
        recommendation(p),
        "",
        "sources and assumptions:",
        f"  MFU: {a.mfu_source}",
        f"  ZeRO-3 step time x{a.zero3_step_ratio:.2f} of ZeRO-2: {a.zero3_source}",
        "  model states: launcher/plan/estimate.py, in the byte counts of DeepSpeed's "
        "estimators (deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs, "
        "deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs: 16-bit weights "
        "only, none for ZeRO 0-1)",
        "  activations: model/shapes.py (tensors kept for backward, from the shapes)",
        "  communication: ring collectives, bytes each rank sends; across nodes hierarchical "
        "(a node sends what one rank of a ring over the nodes does); offloaded optimizer steps "
        "are not timed",
    ]
    return "\n".join(_wrap(line) for line in lines)


def _wrap(line: str, width: int = 108) -> str:
    """Long text lines (not the table's) folded, continuation lines indented."""
    indent = " " * (len(line) - len(line.lstrip()) + 2)
    return textwrap.fill(line, width, subsequent_indent=indent) if len(line) > width else line


def recommendation(p: Plan) -> str:
    best = p.recommended
    if best is None:
        return (
            "recommendation: nothing fits at micro batch 1; add --activation-checkpointing, "
            "--offload, more devices or a shorter sequence"
        )
    return (
        f"recommendation: {best.name}, micro batch {best.micro_batch} x {best.grad_accum} "
        f"accumulation steps x {p.cluster.world} ranks = {p.workload.global_batch}, "
        f"{best.step_s:.2f} s per step, {best.step_s * p.workload.steps / 86400:.1f} days "
        f"for {p.workload.steps:,} steps (the fastest that fits, then the largest micro batch)"
    )


def recipe(p: Plan, best: StagePlan) -> str:
    """The recommended run as a run-config TOML that `launcher/pretrain.py --config` reads:
    the preset's recipe with the planned batch, steps, model options and ds_configs."""
    w = p.workload
    cfg = RunConfig()
    path = REPO_ROOT / "launcher" / "recipes" / f"{w.preset}.toml"
    if path.is_file():
        load_toml(cfg, path)
    if w.attention == "fused":
        raise ValueError(
            "attention 'fused' (issue 16) is not in the trainer yet: plan eager/triton"
        )
    cfg.model.preset, cfg.model.sharing = w.preset, w.sharing
    cfg.model.vocab_size, cfg.model.mask_prob, cfg.model.dropout = (
        w.vocab_size,
        w.mask_prob,
        w.dropout,
    )
    cfg.model.attention_impl = w.attention
    cfg.model.gradient_checkpointing = w.gradient_checkpointing
    cfg.train.global_batch_size, cfg.train.micro_batch_size = w.global_batch, best.micro_batch
    cfg.train.max_steps = w.steps
    cfg.deepspeed.configs = [zero_config(best.stage, best.offload), *PRECISION_CONFIGS[w.precision]]
    head = (
        f"# Written by `python -m launcher.plan`: {w.preset} on {p.cluster.nodes} x "
        f"{p.cluster.gpus_per_node} GPUs ({p.cluster.gpu_memory_gb:g} GiB), {best.name}, micro "
        f"batch {best.micro_batch} x {best.grad_accum} accumulation steps.\n"
        "# Set data.shards_dir and data.tokenizer_dir (or pass them on the command line).\n"
    )
    return head + to_toml(cfg)
