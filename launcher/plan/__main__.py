"""Plan a pretraining run before launching it: parameters, per-device memory by ZeRO stage,
the largest micro batch, gradient accumulation, FLOPs per token, step time and GPU-hours,
communication per step, and a recommendation (optionally written as a run-config recipe).

    python -m launcher.plan --preset mdeberta-base --nodes 4 --gpus-per-node 8 \\
        --gpu-memory-gb 80 --seq-len 512 --global-batch 8192 --write-recipe plan.toml

Every figure's source: `launcher/plan/estimate.py`; the README's "Planning a run" section.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from launcher.config import REPO_ROOT
from launcher.plan.estimate import (
    PRECISIONS,
    STAGES,
    Assumptions,
    Cluster,
    EngineKnobs,
    Workload,
    plan,
)
from launcher.plan.report import PRECISION_CONFIGS, recipe, render, zero_config
from model.config import DebertaV3Config
from model.shapes import ATTENTION_MEMORY

RESULTS_GPU = REPO_ROOT / "benchmarks" / "results-gpu.md"
ZERO3_RESULTS = REPO_ROOT / "benchmarks" / "zero3_knobs.json"
ASSUMED_MFU = 0.35
# the issue's figure (2 CPU ranks, xsmall, 4 x 128): ZeRO-3 553-566 tokens/s, ZeRO-2 705-723
ISSUE_ZERO3_RATIO = (705 + 723) / (553 + 566)
TRAINER_PEAK_TFLOPS = 312.0  # log.peak_flops_per_rank's CUDA default (A100 bf16 dense)


def measured_mfu(preset: str, attention: str, path: Path = RESULTS_GPU) -> tuple[float, str] | None:
    """The MFU of the largest batch of this shape in benchmarks/results-gpu.md, if measured."""
    if not path.is_file():
        return None
    shape, impl = preset.removeprefix("mdeberta-"), "eager" if attention == "eager" else "triton"
    rows = re.findall(
        rf"^\| {shape} \| (\d+) x (\d+) \| {impl} \| [\d.]+ \| \d+ \| ([\d.]+)% \|",
        path.read_text(),
        re.M,
    )
    if not rows:
        return None
    batch, length, mfu = max(rows, key=lambda r: int(r[0]) * int(r[1]))
    return float(mfu) / 100, f"measured: {path.name}, {shape} {batch} x {length} {impl}"


def zero3_ratio(path: Path = ZERO3_RESULTS) -> tuple[float, str]:
    """ZeRO-3 / ZeRO-2 step time with ds_configs/zero3.json's settings, measured by
    benchmarks/zero3_knobs.py (or the issue's figure before that ran)."""
    if path.is_file():
        doc = json.loads(path.read_text())
        return float(doc["step_time_ratio"]), f"measured: {path.name} ({doc['where']})"
    return ISSUE_ZERO3_RATIO, "issue 20's figure: 2 CPU ranks, xsmall, 4 x 128 (not a GPU figure)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m launcher.plan", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--preset", required=True, choices=list(DebertaV3Config.PRESETS))
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--gpu-memory-gb", type=float, default=80.0, help="GiB per device")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--global-batch", type=int, default=8192, help="samples per optimizer step")
    ap.add_argument("--steps", type=int, default=500_000, help="the paper's 500k by default")
    ap.add_argument("--zero", type=int, choices=STAGES, help="one stage (default: all)")
    ap.add_argument(
        "--offload",
        action="store_true",
        help="optimizer states on the CPU (ZeRO-2: ds_configs/zero2_offload.json)",
    )
    ap.add_argument("--attention-impl", default="eager", choices=ATTENTION_MEMORY)
    ap.add_argument("--precision", default="bf16", choices=list(PRECISIONS))
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--vocab-size", type=int, default=0, help="0: the preset's (released) size")
    ap.add_argument("--sharing", default="gdes", choices=["gdes", "es", "nes"])
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument(
        "--mfu",
        type=float,
        default=0.0,
        help=f"0: benchmarks/results-gpu.md's figure if measured, else {ASSUMED_MFU}",
    )
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=TRAINER_PEAK_TFLOPS,
        help="per device; the trainer's CUDA default (A100 bf16 dense)",
    )
    ap.add_argument(
        "--node-bandwidth-gbps",
        type=float,
        default=0.0,
        help="inter-node Gbit/s per node; when given, a step takes at least its comm",
    )
    ap.add_argument(
        "--safety-margin", type=float, default=0.10, help="fraction of memory kept free"
    )
    ap.add_argument(
        "--runtime-gb",
        type=float,
        default=2.0,
        help="per-device reserve for the CUDA context, NCCL and the allocator",
    )
    ap.add_argument("--write-recipe", metavar="FILE", help="the recommendation as a run config")
    return ap.parse_args(argv)


def assumptions(args: argparse.Namespace) -> Assumptions:
    if args.mfu > 0:
        mfu, source = args.mfu, "--mfu"
    elif found := measured_mfu(args.preset, args.attention_impl):
        mfu, source = found
    else:
        mfu, source = ASSUMED_MFU, f"assumed {ASSUMED_MFU:.0%} (no {RESULTS_GPU.name} yet)"
    ratio, zero3_source = zero3_ratio()
    return Assumptions(
        mfu=mfu,
        mfu_source=source,
        peak_tflops=args.peak_tflops,
        zero3_step_ratio=ratio,
        zero3_source=zero3_source,
        safety_margin=args.safety_margin,
        runtime_gb=args.runtime_gb,
    )


def engine_knobs(stage: int, offload: bool, precision: str) -> EngineKnobs:
    """The bucket and offload settings of the ds_configs a run of this stage would use."""
    from launcher.train.engine import load_ds_configs

    offload = offload and stage == 2
    return EngineKnobs.from_ds_config(
        load_ds_configs([zero_config(stage, offload), *PRECISION_CONFIGS[precision]])
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workload = Workload(
        preset=args.preset,
        seq_len=args.seq_len,
        global_batch=args.global_batch,
        steps=args.steps,
        vocab_size=args.vocab_size,
        sharing=args.sharing,
        dropout=args.dropout,
        precision=args.precision,
        attention=args.attention_impl,
        gradient_checkpointing=args.activation_checkpointing,
    )
    cluster = Cluster(args.nodes, args.gpus_per_node, args.gpu_memory_gb, args.node_bandwidth_gbps)
    stages = STAGES if args.zero is None else (args.zero,)
    knobs = {s: engine_knobs(s, args.offload, args.precision) for s in stages}
    try:
        result = plan(workload, cluster, assumptions(args), knobs, stages)
    except ValueError as e:
        print(f"rtdspeed plan: error: {e}", file=sys.stderr)
        return 2
    print(render(result))
    if args.write_recipe:
        best = result.recommended
        if best is None:
            print("rtdspeed plan: error: nothing fits, no recipe written", file=sys.stderr)
            return 3
        try:
            text = recipe(result, best)
        except ValueError as e:
            print(f"rtdspeed plan: error: {e}", file=sys.stderr)
            return 2
        Path(args.write_recipe).write_text(text)
        print(f"\nwrote {args.write_recipe} ({best.name}, micro batch {best.micro_batch})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
