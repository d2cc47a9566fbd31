"""The GPU check (issue 17): one command, one markdown report, under 8 minutes on one H200.

    python benchmarks/gpu_check.py                        # CUDA: benchmarks/results-gpu.md
    python benchmarks/gpu_check.py --device cpu --quick   # the same code on the CPU, tiny

Needs what a stock CUDA PyTorch image has (torch, triton, transformers, sentencepiece,
pyarrow, tensorboard) plus DeepSpeed from `make gpu-wheels` (docs/performance.md has the
exact command); no network; nothing newer than torch 2.11 / triton 3.6. Parts, each in its
own process with its own time limit, so a failure (even a CUDA fault) is reported and the
next part still runs:

1. parity: our backbone (`eager`, `triton`) against HF DebertaV2Model, fp32 and bf16 weights
   (outputs at non-pad positions, every parameter gradient); the kernels against a float64
   dense reference with dropout 0.1 (fp32, fp16, bf16; FlashDeBERTa's tolerances)
2. the attention block fwd + bwd, `eager` vs `triton`: time and peak memory at L = 512,
   1024, 2048, 4096 (32k tokens per batch); a few kernel tile sizes, the best kept for part 3
3. the RTD step (xsmall, base; 8 x 512, 32 x 512; bf16): tokens/s, MFU against a bf16 GEMM
   peak measured here, peak memory, for ours (`eager`, `triton`) and the HF-built step
4. 30 steps of launcher/pretrain.py on one GPU (ZeRO-2, bf16) on shards built from the
   bundled corpus, a resume to step 40, an export loaded back with transformers

On the CPU (`--device cpu`) the kernels run in Triton's interpreter (no bf16 there: fp32 and
fp16), and `--quick` shrinks every shape so the whole check takes a few minutes.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.rtd_step import MASK_PROB, RTD_WEIGHT, SPECIAL, VOCAB, HFReferenceRTD
from model import DebertaV3Backbone, DebertaV3Config, RTDModel, SpecialTokens, rtd_flops_per_sample
from model.backbone import DisentangledSelfAttention, relative_table_index, relative_window

REPO = Path(__file__).resolve().parents[1]
PARTS = {
    1: "Parity with HF DebertaV2 and with a float64 reference",
    2: "Attention block fwd + bwd: eager vs triton",
    3: "RTD step: ours (eager, triton) and the HF-built step",
    4: "launcher/pretrain.py: 30 steps, resume, export",
}
TIME_LIMITS = {1: 120, 2: 120, 3: 150, 4: 180}  # seconds per part on a GPU (quick: 3x)
# relative-L2 tolerances of the kernels against float64 (FlashDeBERTa's)
KERNEL_TOL = {"fp32": 5e-3, "fp16": 1e-2, "bf16": 2e-2}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TILE_CANDIDATES = [(64, 64, 4), (128, 64, 4), (128, 64, 8), (64, 32, 4)]
MEMORY_NOTE = (
    "Peak memory: CUDA, allocated above what the case held before its timed steps; CPU, "
    "the process's peak RSS so far."
)
TINY_SPECIAL = SpecialTokens(pad_id=0, cls_id=1, sep_id=2, unk_id=3, mask_id=4, vocab_size=1000)


@dataclass
class Section:
    """One part of the report."""

    part: int
    status: str  # "passed", "FAILED" (a check did not hold), "error" (it did not run)
    lines: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Setup:
    device: str  # "cuda" or "cpu"
    quick: bool
    workdir: Path

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny shapes, fewer steps")
    p.add_argument("--out", type=Path, default=None, help="default benchmarks/results-gpu.md "
                   "(cuda) or work/gpu-check/results-cpu.md (cpu)")  # fmt: skip
    p.add_argument("--parts", default="1,2,3,4", help="comma-separated, default 1,2,3,4")
    p.add_argument("--workdir", type=Path, default=REPO / "work" / "gpu-check")
    p.add_argument("--part", type=int, help=argparse.SUPPRESS)  # child process: run one part
    args = p.parse_args(argv)
    try:
        args.parts = sorted({int(x) for x in args.parts.split(",") if x.strip()})
    except ValueError:
        p.error(f"--parts={args.parts!r}: comma-separated part numbers")
    if not args.parts or not set(args.parts) <= set(PARTS):
        p.error(f"--parts: choose from {', '.join(map(str, PARTS))}")
    if args.out is None:
        name = "results-gpu.md" if args.device == "cuda" else "results-cpu.md"
        args.out = REPO / "benchmarks" / name if args.device == "cuda" else args.workdir / name
    return args


# -- the report ---------------------------------------------------------------------------
def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def environment(device: str) -> list[tuple[str, str]]:
    rows = [
        ("date (UTC)", time.strftime("%Y-%m-%d %H:%M", time.gmtime())),
        ("python", platform.python_version()),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda})"),
        ("triton", package_version("triton")),
        ("transformers", package_version("transformers")),
        ("deepspeed", package_version("deepspeed")),
        ("commit", _git_commit()),
    ]
    if device == "cuda" and torch.cuda.is_available():
        prop = torch.cuda.get_device_properties(0)
        rows.append(("GPU", f"{prop.name}, {prop.total_memory / 2**30:.0f} GiB, sm{prop.major}"
                     f"{prop.minor}, {torch.cuda.device_count()} visible"))  # fmt: skip
    else:
        rows.append(("device", f"CPU ({os.cpu_count()} cores); Triton kernels interpreted"))
    return rows


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                             capture_output=True, timeout=10)  # fmt: skip
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def render(env: list[tuple[str, str]], sections: list[Section], quick: bool) -> str:
    """The markdown report: environment, a status line per part, then each part."""
    lines = ["# GPU check (`benchmarks/gpu_check.py`)", ""]
    lines += ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in env)]
    if quick:
        lines += ["", "`--quick`: tiny shapes; the figures exercise the code, not the speed."]
    lines += ["", "| part | status | seconds |", "|---|---|---|"]
    lines += [f"| {s.part}. {PARTS[s.part]} | {s.status} | {s.seconds:.0f} |" for s in sections]
    for s in sections:
        lines += ["", f"## {s.part}. {PARTS[s.part]}", "", f"Status: **{s.status}**", ""]
        lines += s.lines
    return "\n".join(lines) + "\n"


def run_part_guarded(part: int, setup: Setup) -> Section:
    """Run one part here; any exception becomes an "error" section with its traceback."""
    t0 = time.time()
    try:
        lines, ok = PART_FUNCTIONS[part](setup)
        section = Section(part, "passed" if ok else "FAILED", lines)
    except Exception:
        section = Section(part, "error", ["```", traceback.format_exc()[-6000:], "```"])
    section.seconds = time.time() - t0
    return section


def run_part_subprocess(part: int, args: argparse.Namespace) -> Section:
    """One part in a child process (a CUDA fault or a hang cannot take the others down)."""
    result = args.workdir / f"part{part}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", str(part),
           "--device", args.device, "--workdir", str(args.workdir)]  # fmt: skip
    cmd += ["--quick"] if args.quick else []
    limit = TIME_LIMITS[part] * (3 if args.device == "cpu" else 1)
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True, timeout=limit)
        tail = (proc.stdout + proc.stderr)[-3000:]
        code = f"exit code {proc.returncode}"
    except subprocess.TimeoutExpired as e:
        tail = ((e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(
            errors="replace"))[-3000:]  # fmt: skip
        code = f"killed after its time limit of {limit} s"
    if result.is_file():
        return Section(**json.loads(result.read_text()))
    return Section(part, "error", [f"The part's process gave no result ({code}):", "", "```",
                                   tail, "```"], time.time() - t0)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.part:  # child
        setup = Setup(args.device, args.quick, args.workdir)
        section = run_part_guarded(args.part, setup)
        (args.workdir / f"part{args.part}.json").write_text(json.dumps(asdict(section)))
        return 0
    env = environment(args.device)
    print("\n".join(f"{k}: {v}" for k, v in env), flush=True)
    sections: list[Section] = []
    for part in args.parts:
        print(f"part {part}: {PARTS[part]} ...", flush=True)
        sections.append(run_part_subprocess(part, args))
        print(f"part {part}: {sections[-1].status} ({sections[-1].seconds:.0f} s)", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(render(env, sections, args.quick))  # after every part
    print(f"report: {args.out}")
    return 0 if all(s.status == "passed" for s in sections) else 1


# -- shared helpers -------------------------------------------------------------------------
def prepare(setup: Setup) -> None:
    """Per part process: on the CPU the Triton kernels need the interpreter, switched on
    before model.attention_triton is first imported (which defines them)."""
    if not setup.cuda:
        os.environ["TRITON_INTERPRET"] = "1"
    torch.manual_seed(0)
    if setup.cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity means fp32
        torch.backends.cudnn.allow_tf32 = False


def rel_l2(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def timed(fn, device: str, warmup: int, iters: int) -> tuple[float, float]:
    """Median seconds of fn() and its peak memory in GiB (CUDA: allocated by torch above what
    was allocated before; CPU: the process's peak RSS so far)."""
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return statistics.median(times), peak


def free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_oom(e: Exception) -> bool:
    return "out of memory" in str(e).lower()


# -- part 1: parity -------------------------------------------------------------------------
def part_parity(setup: Setup) -> tuple[list[str], bool]:
    prepare(setup)
    ok = True
    lines = [
        "Backbone vs HF `DebertaV2Model` (same weights), batch 2, the second row padded; "
        "outputs at non-pad positions; gradients of every parameter for a random probe "
        "(worst parameter named). bf16 / fp16 = the model cast to that dtype (as DeepSpeed "
        "runs it), compared with HF in fp32; HF's own error in that dtype is the yardstick.",
        "",
        "| impl | precision | out max abs | out rel-L2 | worst grad rel-L2 | bound | ok |",
        "|---|---|---|---|---|---|---|",
    ]
    for dtype in ("fp32", "bf16", "fp16"):
        rows, row_ok = backbone_parity(setup, dtype)
        lines += rows
        ok &= row_ok
    lines += [
        "",
        "Kernels vs a float64 dense reference (same inputs, the kernels' own dropout mask, "
        "p = 0.1), output and the gradients of q, k, v, c2p, p2c (relative L2):",
        "",
        "| precision | out | q | k | v | c2p | p2c | tolerance | ok |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for dtype in ("fp32", "fp16", "bf16"):
        if dtype == "bf16" and not setup.cuda:
            lines.append("| bf16 | not run: the interpreter has no bf16 | | | | | | | |")
            continue
        row, row_ok = kernel_parity(setup, dtype)
        lines.append(row)
        ok &= row_ok
    return lines, ok


def backbone_parity(setup: Setup, dtype: str) -> tuple[list[str], bool]:
    import transformers

    preset, length = ("tiny", 64) if setup.quick or not setup.cuda else ("base", 512)
    cfg = DebertaV3Config.from_preset(preset, vocab_size=1024, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0)  # fmt: skip
    ids = torch.randint(5, 1000, (2, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, length * 5 // 8 :] = 0
    ids, mask = ids.to(setup.device), mask.to(setup.device)
    keep = mask.bool()
    probe = torch.randn(2, length, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    probe = probe.to(setup.device)
    torch.manual_seed(0)
    ours = DebertaV3Backbone(cfg).to(setup.device)
    ref = transformers.DebertaV2Model(transformers.DebertaV2Config(**cfg.to_hf_dict()))
    ref.load_state_dict(ours.state_dict(), strict=True)
    ref = ref.to(setup.device)

    def run(model, hf: bool):
        model.zero_grad(set_to_none=True)
        out = model(ids, attention_mask=mask).last_hidden_state if hf else model(ids, mask)
        (out.float() * probe)[keep].sum().backward()
        return out.float(), {n: p.grad.float() for n, p in model.named_parameters()}

    truth = run(ref, True)
    torch_dtype = DTYPES[dtype]
    bound = 1e-4 if dtype == "fp32" else 2e-2
    if dtype != "fp32":
        hf_out, hf_grads = run(copy.deepcopy(ref).to(torch_dtype), True)
        hf_err = max(rel_l2(hf_grads[n], g) for n, g in truth[1].items())
        bound = max(bound, 2 * max(hf_err, rel_l2(hf_out[keep], truth[0][keep])))
    lines, ok = [], True
    impls = ["eager", "triton"] + (["hf"] if dtype != "fp32" else [])
    for impl in impls:
        if impl == "triton" and dtype == "bf16" and not setup.cuda:
            lines.append("| triton | bf16 | not run: the interpreter has no bf16 | | | | |")
            continue
        if impl == "hf":
            out, grads = hf_out, hf_grads
        else:
            model = copy.deepcopy(ours).to(torch_dtype)
            for module in model.modules():
                if hasattr(module, "attention_impl"):
                    module.attention_impl = impl
            out, grads = run(model, False)
        worst = max(grads, key=lambda n: rel_l2(grads[n], truth[1][n]))
        g_err = rel_l2(grads[worst], truth[1][worst])
        o_abs = (out[keep] - truth[0][keep]).abs().max().item()
        o_err = rel_l2(out[keep], truth[0][keep])
        row_ok = impl == "hf" or max(o_err, g_err) <= bound
        ok &= row_ok
        lines.append(f"| {impl} | {dtype} | {o_abs:.2e} | {o_err:.2e} | {g_err:.2e} "
                     f"(`{worst}`) | {bound:.1e} | {'yes' if row_ok else 'NO'} |")  # fmt: skip
    return lines, ok


def kernel_parity(setup: Setup, dtype: str) -> tuple[str, bool]:
    from model import attention_triton as at

    n, length, d = (4, 64, 16) if setup.quick or not setup.cuda else (24, 512, 64)
    cfg = DebertaV3Config()
    lo, hi = relative_window(length, cfg)
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(n, length, d, generator=g) for _ in range(3)]
    tensors += [torch.randn(n, length, hi - lo, generator=g) * 0.3 for _ in range(2)]
    rows = relative_table_index(length, cfg, torch.device("cpu")).flip(0).to(setup.device)
    mask = torch.ones(n // 2, length, dtype=torch.bool, device=setup.device)
    mask[-1, length // 2 :] = False
    torch_dtype = DTYPES[dtype]
    inputs = [t.to(setup.device, torch_dtype, copy=True).requires_grad_() for t in tensors]
    torch.manual_seed(7)
    out = at.disentangled_attention(*inputs, rows, mask, 0.125, 0.1)
    grad = torch.randn(out.shape, generator=g).to(setup.device)
    out.backward(grad.to(torch_dtype))
    torch.manual_seed(7)
    keep = at.dropout_keep_mask(at.draw_seed(), n, length, 0.1, setup.device)
    ref_in = [t.to(setup.device, torch.float64, copy=True).requires_grad_() for t in tensors]
    ref = at.dense_reference(*ref_in, rows, mask, 0.125, keep.double(), 0.1)
    ref.backward(grad.double())
    errors = [rel_l2(out, ref)] + [
        rel_l2(a.grad, b.grad) for a, b in zip(inputs, ref_in, strict=True)
    ]
    ok = max(errors) <= KERNEL_TOL[dtype]
    cells = " | ".join(f"{e:.1e}" for e in errors)
    return f"| {dtype} | {cells} | {KERNEL_TOL[dtype]:.0e} | {'yes' if ok else 'NO'} |", ok


# -- part 2: the attention block ------------------------------------------------------------
def attention_case(setup: Setup, impl: str, length: int, batch: int):
    """(median s, peak GiB) of one fwd + bwd of the base attention block, dropout 0.1."""
    preset = "base" if setup.cuda and not setup.quick else "tiny"
    cfg = DebertaV3Config.from_preset(preset, attention_impl=impl)
    dtype = torch.bfloat16 if setup.cuda else torch.float32
    block = DisentangledSelfAttention(cfg).to(setup.device, dtype).train()
    lo, hi = relative_window(length, cfg)
    x = torch.randn(batch, length, cfg.hidden_size, device=setup.device, dtype=dtype)
    x.requires_grad_()
    rel = torch.randn(hi - lo, cfg.hidden_size, device=setup.device, dtype=dtype)
    index = relative_table_index(length, cfg, torch.device(setup.device))
    grad = torch.randn_like(x)

    def step():
        block(x, None, index, rel).backward(grad)

    warmup, iters = (1, 1) if setup.quick else (2, 5)
    return timed(step, setup.device, warmup, iters)


def measured(fn, *args):
    """fn(*args), or the reason it failed as a short string ("OOM" for out of memory);
    the memory is released either way."""
    try:
        return fn(*args)
    except Exception as e:  # a tile may not compile (resources), a case may not fit
        return "OOM" if is_oom(e) else f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
    finally:
        free_memory()


def part_attention(setup: Setup) -> tuple[list[str], bool]:
    prepare(setup)
    from model import attention_triton as at

    big = setup.cuda and not setup.quick
    lengths = (512, 1024, 2048, 4096) if big else (64, 128)
    tokens = 32768 if big else 256
    candidates = TILE_CANDIDATES if big else [at.BLOCKS["forward"]]
    lines = [
        f"`DisentangledSelfAttention` ({'base' if big else 'tiny'} shape, "
        f"{'bf16' if setup.cuda else 'fp32'} weights, training mode, attention dropout 0.1, no "
        f"padding), {tokens} tokens per batch; median fwd + bwd. {MEMORY_NOTE} triton: the "
        "best of the tile sizes (BLOCK_M, BLOCK_N, warps) tried.",
        "",
        "| L | batch | eager ms | eager GiB | triton ms | triton GiB | speed-up | memory | tile |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    totals: dict[tuple, float] = dict.fromkeys(candidates, 0.0)
    failures, ok = [], True
    for length in lengths:
        batch = max(1, tokens // length)
        eager = measured(attention_case, setup, "eager", length, batch)
        best = None
        for tile in candidates:
            at.BLOCKS.update(forward=tile, backward=tile)
            got = measured(attention_case, setup, "triton", length, batch)
            if isinstance(got, str):
                totals[tile] = float("inf")
                failures.append(f"- L = {length}, tile {tile}: {got}")
            else:
                totals[tile] += got[0]
                best = best if best and best[1][0] <= got[0] else (tile, got)
        ok &= best is not None
        lines.append(attention_row(length, batch, eager, best))
    winner = min(totals, key=totals.get)
    if totals[winner] < float("inf"):
        (setup.workdir / "tiles.json").write_text(json.dumps(list(winner)))
        sums = ", ".join(f"{t}: {v:.3f}" for t, v in totals.items())
        lines += ["", f"Fastest tile summed over the lengths: {winner} (used in part 3); {sums}"]
    if failures:
        lines += ["", "Failed triton cases:", *failures]
    return lines, ok


def attention_row(length, batch, eager, best) -> str:
    def cell(r):
        return r if isinstance(r, str) else f"{r[0] * 1e3:.1f} | {r[1]:.2f}"

    eager_cell = cell(eager) + (" | -" if isinstance(eager, str) else "")
    if best is None:
        return f"| {length} | {batch} | {eager_cell} | failed | - | - | - | - |"
    tile, got = best
    fine = not isinstance(eager, str)
    speed = f"{eager[0] / got[0]:.2f}x" if fine else "-"
    memory = f"{got[1] / eager[1]:.2f}" if fine and eager[1] > 0 else "-"
    return f"| {length} | {batch} | {eager_cell} | {cell(got)} | {speed} | {memory} | {tile} |"


# -- part 3: the RTD step -------------------------------------------------------------------
def gemm_peak(device: str, dtype) -> float:
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best, _ = timed(lambda: a @ b, device, 3, 10)
    return 2 * n**3 / best


def rtd_case(setup: Setup, impl: str, preset: str, batch: int, length: int):
    """(median s, peak GiB, loss) of fwd + bwd of one RTD step."""
    vocab = VOCAB if setup.cuda and not setup.quick else 1024
    special = SPECIAL if vocab == VOCAB else TINY_SPECIAL
    attention = impl if impl != "hf" else "eager"
    cfg = DebertaV3Config.from_preset(preset, vocab_size=vocab, attention_impl=attention)
    dtype = torch.bfloat16 if setup.cuda else torch.float32
    torch.manual_seed(0)
    with torch.device(setup.device):
        if impl == "hf":
            model = HFReferenceRTD(cfg, special)
        else:
            model = RTDModel(cfg, special, mask_prob=MASK_PROB, rtd_weight=RTD_WEIGHT)
    model = model.to(dtype).train()
    g = torch.Generator(device=setup.device).manual_seed(0)
    ids = torch.randint(5, special.vocab_size - 1, (batch, length), generator=g,
                        device=setup.device)  # fmt: skip
    ids[:, 0], ids[:, -1] = special.cls_id, special.sep_id
    mask = torch.ones_like(ids)
    losses = []

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(ids, mask, g) if impl == "hf" else model(ids, mask, generator=g).loss
        loss.backward()
        losses.append(loss.item())

    warmup, iters = (1, 1) if setup.quick else (2, 5)
    seconds, peak = timed(step, setup.device, warmup, iters)
    return seconds, peak, losses[-1]


def part_rtd_step(setup: Setup) -> tuple[list[str], bool]:
    prepare(setup)
    from model import attention_triton as at

    tiles = setup.workdir / "tiles.json"
    if tiles.is_file():
        tile = tuple(json.loads(tiles.read_text()))
        at.BLOCKS.update(forward=tile, backward=tile)
    dtype = torch.bfloat16 if setup.cuda else torch.float32
    peak = gemm_peak(setup.device, dtype)
    big = setup.cuda and not setup.quick
    presets = ("xsmall", "base") if big else ("tiny",)
    shapes = ((8, 512), (32, 512)) if big else ((2, 64),)
    lines = [
        f"Forward + backward of one RTD step (masking, generator + MLM loss, sampling, "
        f"discriminator + RTD loss, GDES), {'bf16' if setup.cuda else 'fp32'} weights, "
        f"training mode (dropout 0.1). MFU = useful FLOP/s (`model.rtd_flops_per_sample`) / "
        f"the {'bf16' if setup.cuda else 'fp32'} GEMM peak measured here: "
        f"{peak / 1e12:.3g} TFLOP/s. {MEMORY_NOTE}",
        "",
        "| preset | batch x len | impl | step ms | tokens/s | MFU | peak GiB | loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ok = True
    for preset in presets:
        cfg = DebertaV3Config.from_preset(preset)
        for batch, length in shapes:
            flops = rtd_flops_per_sample(cfg, cfg.generator_config(), length, MASK_PROB)
            for impl in ("eager", "triton", "hf"):
                got = measured(rtd_case, setup, impl, preset, batch, length)
                where = f"| {preset} | {batch} x {length} | {impl} |"
                if isinstance(got, str):
                    ok &= impl == "hf" and got == "OOM"  # HF may run out of memory; ours not
                    lines.append(f"{where} {got} | | | | |")
                    continue
                s, mem, loss = got
                mfu = batch * flops / s / peak
                lines.append(f"{where} {s * 1e3:.0f} | {batch * length / s:.0f} | {mfu:.1%} | "
                             f"{mem:.2f} | {loss:.3f} |")  # fmt: skip
    return lines, ok


# -- part 4: launcher/pretrain.py -------------------------------------------------------------
def build_data(setup: Setup) -> tuple[Path, Path]:
    """Tokenizer and shards from the first 160 KB of each bundled language (the tests'
    fixture size), with the project's own command line tools."""
    import lzma

    data = setup.workdir / "data"
    tok, shards = data / "tokenizer", data / "shards"
    if (shards / "manifest.json").is_file():
        return tok, shards
    shutil.rmtree(data, ignore_errors=True)
    corpus = data / "corpus"
    corpus.mkdir(parents=True)
    for src in sorted((REPO / "data" / "cc100-sample").glob("*.txt.xz")):
        with lzma.open(src, "rb") as f:
            text = f.read(160_000)
        (corpus / f"{src.name.split('.')[0]}.txt").write_bytes(text[: text.rfind(b"\n") + 1])
    py = sys.executable
    sh([py, "-m", "data_pipeline.train_tokenizer", "--input", str(corpus), "--vocab-size",
        "2000", "--out", str(tok)])  # fmt: skip
    sh([py, "-m", "data_pipeline.build_shards", "--input", str(corpus), "--tokenizer", str(tok),
        "--out", str(shards), "--seq-len", "128", "--workers", "4"])  # fmt: skip
    return tok, shards


def sh(cmd: list[str], timeout: float = 300) -> str:
    """Run a command in the repository; its output, or RuntimeError with the output's tail."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)  # the launcher picks its attention itself (auto)
    proc = subprocess.run(cmd, cwd=REPO, env=env, text=True, capture_output=True,
                          timeout=timeout)  # fmt: skip
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(cmd)}\n{out[-3000:]}")
    return out


def fused_adam_prebuilt() -> tuple[bool, str]:
    """Whether DeepSpeed's FusedAdam is prebuilt. If not, `optim.implementation=auto` would
    JIT-build it when the engine starts (a minute, and only where nvcc is), so the run then
    uses torch's AdamW and says so."""
    try:
        from deepspeed.git_version_info import installed_ops
    except Exception as e:
        return False, f"deepspeed does not import ({e})"
    if installed_ops.get("fused_adam"):
        return True, "prebuilt"
    nvcc = shutil.which("nvcc") or os.environ.get("CUDA_HOME")
    return False, f"not prebuilt; nvcc {'found' if nvcc else 'absent'} for a JIT build"


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def judge_run(records: list[dict], first_stop: int, last_stop: int) -> list[tuple[str, bool]]:
    """The checks of part 4 on metrics.jsonl after the resumed run."""
    steps = [r["step"] for r in records]
    before = [r for r in records if r["step"] <= first_stop]
    checks = [
        ("every logged step once, in order", steps == sorted(set(steps))),
        (f"the resumed run reached step {last_stop}", bool(steps) and steps[-1] == last_stop),
        ("the resume continued after its checkpoint",
         any(first_stop < s <= last_stop for s in steps)),
    ]  # fmt: skip
    if len(before) >= 2:
        checks.append(("loss fell (first vs last log of the first run)",
                       before[-1]["loss"] < before[0]["loss"]))  # fmt: skip
        checks.append(("MLM loss fell", before[-1]["mlm_loss"] < before[0]["mlm_loss"]))
    else:
        checks.append(("at least two log records in the first run", False))
    return checks


def part_pretrain(setup: Setup) -> tuple[list[str], bool]:
    prepare(setup)
    tok, shards = build_data(setup)
    first, last, every = (12, 16, 2) if setup.quick else (30, 40, 5)
    run_root = setup.workdir / "runs"
    shutil.rmtree(run_root, ignore_errors=True)
    usable, why = fused_adam_prebuilt() if setup.cuda else (False, "CPU run")
    optim = "auto" if usable else "torch"
    precision = '["ds_configs/zero2.json","ds_configs/bf16.json"]'
    base = [sys.executable, "launcher/pretrain.py", "--config", "launcher/recipes/demo.toml",
            f"--data.shards_dir={shards}", f"--data.tokenizer_dir={tok}",
            f"--run.output_dir={run_root}", f"--deepspeed.configs={precision}",
            f"--log.every_steps={every}", f"--checkpoint.every_steps={first}",
            "--optim.warmup_steps=5", f"--optim.implementation={optim}",
            "--model.attention_impl=auto"]  # fmt: skip
    t0 = time.time()
    sh([*base, f"--train.max_steps={first}"])
    t1 = time.time()
    resumed = sh([*base, f"--train.max_steps={last}"])
    t2 = time.time()
    run_dir = run_root / "demo"
    export_dir = setup.workdir / "export"
    sh([sys.executable, "-m", "launcher.hf.export", "--run", str(run_dir), "--out",
        str(export_dir), "--force"])  # fmt: skip
    records = read_metrics(run_dir)
    checks = judge_run(records, first, last)
    checks.append(("the second command resumed", "resumed from" in resumed))
    checks.append(("the export loads in transformers and runs", export_loads(export_dir)))
    lines = [
        f"One process, {setup.device}, ZeRO-2 + bf16, the demo recipe (tiny model, batch 16 x "
        f"128) with warmup 5; optim.implementation={optim} (FusedAdam: {why}); attention auto. "
        f"{first} steps ({t1 - t0:.0f} s with start-up), then the same command to step {last} "
        f"({t2 - t1:.0f} s), then `launcher.hf.export`.",
        "",
        "| step | loss | mlm_loss | rtd_loss | tokens/s | cuda max GiB | rss GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(f"| {r['step']} | {r['loss']:.4f} | {r['mlm_loss']:.4f} | "
                     f"{r['rtd_loss']:.4f} | {r.get('tokens_per_s', 0):.0f} | "
                     f"{r.get('cuda_max_allocated_gb', float('nan')):.2f} | "
                     f"{r.get('rss_gb', float('nan')):.2f} |")  # fmt: skip
    lines += ["", *(f"- {'yes' if good else 'NO'}: {what}" for what, good in checks)]
    return lines, all(good for _, good in checks)


def export_loads(export_dir: Path) -> bool:
    import transformers

    disc = transformers.AutoModel.from_pretrained(export_dir / "discriminator")
    gen = transformers.AutoModelForMaskedLM.from_pretrained(export_dir / "generator")
    ids = torch.tensor([[1, 100, 200, 300, 2]])
    with torch.no_grad():
        h = disc(ids).last_hidden_state
        logits = gen(ids).logits
    return bool(torch.isfinite(h).all() and torch.isfinite(logits).all())


PART_FUNCTIONS = {1: part_parity, 2: part_attention, 3: part_rtd_step, 4: part_pretrain}

if __name__ == "__main__":
    sys.exit(main())
