"""RTD training-step throughput: rtdspeed's `RTDModel` beside the same step built from HF modules.

One RTD step (He, Gao, Chen, arXiv 2111.09543) is masking, generator forward + MLM loss,
sampling, discriminator forward + RTD loss, and backward of MLM + 50 * RTD, with GDES.
All run the same step at the xsmall shape (vocab 128100):
- "eager": `model.RTDModel` (vocabulary logits at masked positions only) with the eager
  attention (`attention_impl="eager"`, the PyTorch reference path).
- "fused": the same model with the fused C++ attention kernel (`attention_impl="fused"`,
  model/attention_fused.py; what `auto` picks on CPU when the extension is built).
- "hf": `DebertaV2ForMaskedLM` generator (half depth; its loss computes logits over every
  token, as HF does) + `DebertaV2Model` discriminator fed sg(E_G) + E_delta + our `RTDHead`.

Each (implementation, shape, precision) runs in its own subprocess so peak RSS is its own.
Each case runs `--rounds` times, rotating which implementation goes first, so that a slow
minute on this shared VM hits all of them; the table gives the median step over rounds and
the range of the per-round ratios (fused / eager and fused / hf: how many times faster).
MFU = achieved useful FLOP/s (`model.rtd_flops_per_sample`, identical for all) over a GEMM
peak measured here, at the same thread count and precision. The CPU model and its matrix
instructions (AMX, AVX-512) head the table: the ratios differ between machines.

    python benchmarks/rtd_step.py               # 2 rounds of 1 warm-up + 2 timed steps
    python benchmarks/rtd_step.py --quick       # 1 round of 1 warm-up + 1 timed step
    python benchmarks/rtd_step.py --rounds 3
    python benchmarks/rtd_step.py --quick --shapes 2x2048 --dtypes bf16 --impls eager,fused
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import DebertaV3Config, RTDModel, SpecialTokens, rtd_flops_per_sample
from model.heads import RTDHead

VOCAB = 128100
SPECIAL = SpecialTokens(pad_id=0, cls_id=1, sep_id=2, unk_id=3, mask_id=128000, vocab_size=VOCAB)
SHAPES = "8x512,32x128"
DTYPES = "fp32,bf16"
IMPLS = ("eager", "fused", "hf")
MASK_PROB, RTD_WEIGHT = 0.15, 50.0


class HFReferenceRTD(nn.Module):
    """The same RTD step assembled from transformers modules (the baseline)."""

    def __init__(self, cfg: DebertaV3Config, special: SpecialTokens):
        super().__init__()
        import transformers

        gen_cfg = transformers.DebertaV2Config(**cfg.generator_config().to_hf_dict())
        self.generator = transformers.DebertaV2ForMaskedLM(gen_cfg)
        self.discriminator = transformers.DebertaV2Model(
            transformers.DebertaV2Config(**cfg.to_hf_dict())
        )
        nn.init.zeros_(self.discriminator.embeddings.word_embeddings.weight)  # E_delta
        self.rtd_head = RTDHead(cfg)
        self.special = special
        banned = torch.zeros(cfg.vocab_size, dtype=torch.bool)
        banned[list(special.ids)] = True
        banned[special.vocab_size :] = True
        self.register_buffer("banned", banned, persistent=False)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        candidates = mask.bool() & ~self.banned[ids]
        masked = candidates & (torch.rand(ids.shape, generator=g, device=ids.device) < MASK_PROB)
        labels = ids.masked_fill(~masked, -100)
        out = self.generator(ids.masked_fill(masked, self.special.mask_id), mask, labels=labels)
        with torch.no_grad():
            probs = out.logits[masked].float().masked_fill(self.banned, float("-inf")).softmax(-1)
            samples = torch.multinomial(probs, 1, generator=g).squeeze(-1)
        disc_ids = ids.masked_scatter(masked, samples)
        e_g = self.generator.deberta.embeddings.word_embeddings(disc_ids).detach()
        embeds = e_g + self.discriminator.embeddings.word_embeddings(disc_ids)
        h = self.discriminator(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        keep = mask.bool()
        rtd = F.binary_cross_entropy_with_logits(
            self.rtd_head(h)[keep].float(), (disc_ids != ids)[keep].float()
        )
        return out.loss + RTD_WEIGHT * rtd


def make_batch(batch: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 128000, (batch, seq_len), generator=g)
    ids[:, 0], ids[:, -1] = SPECIAL.cls_id, SPECIAL.sep_id
    return ids, torch.ones_like(ids)


def worker(impl: str, dtype: str, batch: int, seq_len: int, warmup: int, iters: int) -> dict:
    """Time fwd+bwd steps of one implementation in this (fresh) process."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    if impl != "hf":
        cfg = DebertaV3Config.from_preset("xsmall", vocab_size=VOCAB, attention_impl=impl)
        model = RTDModel(cfg, SPECIAL, mask_prob=MASK_PROB, rtd_weight=RTD_WEIGHT)

        def loss_of(ids, mask, g):
            return model(ids, mask, generator=g).loss
    else:
        model = HFReferenceRTD(DebertaV3Config.from_preset("xsmall", vocab_size=VOCAB), SPECIAL)
        loss_of = model
    model.train()
    ids, mask = make_batch(batch, seq_len)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
    g = torch.Generator().manual_seed(0)
    times = []
    for step in range(warmup + iters):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        with autocast:
            loss = loss_of(ids, mask, g)
        loss.backward()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    return {
        "step_s": step_s,
        "tokens_per_s": batch * seq_len / step_s,
        "samples_per_s": batch / step_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "loss": loss.item(),
    }


def gemm_peak(dtype: str, n: int = 2048, iters: int = 10) -> float:
    """Best FLOP/s of an n x n x n matmul at 2 threads (the roofline MFU is measured against)."""
    torch.set_num_threads(2)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    a, b = torch.randn(n, n, dtype=torch_dtype), torch.randn(n, n, dtype=torch_dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(iters):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def run_subprocess(args: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_description() -> str:
    """The CPU model and the matrix/vector instructions it has (from /proc/cpuinfo)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "CPU unknown"
    name = next(
        (ln.split(":", 1)[1].strip() for ln in info.splitlines() if "model name" in ln), "?"
    )
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if "flags" in ln), [])
    isa = [f for f in ("amx_tile", "amx_bf16", "avx512f", "avx512_bf16", "avx2") if f in flags]
    return (
        f"CPU: {name} ({', '.join(isa) or 'no AVX2'}; AMX {'yes' if 'amx_tile' in isa else 'no'})"
    )


def ratio_text(runs: dict, num: str, den: str) -> str:
    """median(den) / median(num) and the range of the per-round ratios."""
    med = {k: statistics.median(r["step_s"] for r in runs[k]) for k in (num, den)}
    per_round = [d["step_s"] / n["step_s"] for n, d in zip(runs[num], runs[den], strict=True)]
    text = f"{med[den] / med[num]:.2f}x"
    if len(per_round) > 1:
        text += f" ({min(per_round):.2f}-{max(per_round):.2f})"
    return text


def parse_cli() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 round of 1 warm-up + 1 timed step")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each case (default 2)")
    parser.add_argument("--shapes", default=SHAPES, help=f"batch x length list ({SHAPES})")
    parser.add_argument("--dtypes", default=DTYPES, help=f"precisions ({DTYPES})")
    parser.add_argument(
        "--impls", default=",".join(IMPLS), help=f"implementations ({','.join(IMPLS)})"
    )
    parser.add_argument("--worker", help="internal: run one case (JSON) in this process")
    parser.add_argument("--gemm", help="internal: measure the GEMM peak of one precision")
    return parser.parse_args()


def run_case(impls: list[str], spec: dict, rounds: int) -> dict[str, list[dict]]:
    """Every implementation `rounds` times, each round starting with the next one."""
    runs = {impl: [] for impl in impls}
    for round_ in range(rounds):
        order = impls[round_ % len(impls) :] + impls[: round_ % len(impls)]
        for impl in order:
            runs[impl].append(run_subprocess(["--worker", json.dumps({"impl": impl, **spec})]))
    return runs


def main() -> None:
    args = parse_cli()
    if args.worker:
        print(json.dumps(worker(**json.loads(args.worker))))
        return
    if args.gemm:
        print(json.dumps({"flops": gemm_peak(args.gemm)}))
        return

    import transformers

    warmup, iters = (1, 1) if args.quick else (1, 2)
    rounds = 1 if args.quick else max(1, args.rounds)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    dtypes, impls = args.dtypes.split(","), args.impls.split(",")
    load = os.getloadavg()
    peaks = {dt: run_subprocess(["--gemm", dt])["flops"] for dt in dtypes}
    cfg = DebertaV3Config.from_preset("xsmall", vocab_size=VOCAB)
    from importlib.metadata import version

    print(
        f"torch {torch.__version__}, deepspeed {version('deepspeed')}, "
        f"transformers {transformers.__version__}, 2 threads, "
        f"{rounds} round(s) of {warmup} warm-up + {iters} timed steps (median), "
        f"load average at start {load[0]:.2f}"
    )
    print(cpu_description())
    gemm = ", ".join(f"{d} {p / 1e9:.0f} GFLOP/s" for d, p in peaks.items())
    print(f"GEMM peak (2048^3, 2 threads): {gemm}")
    print()
    print(
        "| batch x len | precision | impl | step (s) | tokens/s | fused / eager | fused / hf "
        "| MFU | peak RSS (MB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for batch, seq_len in shapes:
        flops = rtd_flops_per_sample(cfg, cfg.generator_config(), seq_len, MASK_PROB)
        for dtype in dtypes:
            spec = {"dtype": dtype, "batch": batch, "seq_len": seq_len}
            runs = run_case(impls, {**spec, "warmup": warmup, "iters": iters}, rounds)
            ratios = {
                other: ratio_text(runs, "fused", other) if "fused" in runs else ""
                for other in ("eager", "hf")
                if other in runs
            }
            for impl, rs in runs.items():
                step = statistics.median(r["step_s"] for r in rs)
                mfu = batch / step * flops / peaks[dtype]
                rss = max(r["peak_rss_mb"] for r in rs)
                cells = [ratios.get(o, "") if impl == "fused" else "" for o in ("eager", "hf")]
                print(
                    f"| {batch} x {seq_len} | {dtype} | {impl} | {step:.2f} | "
                    f"{batch * seq_len / step:.0f} | {cells[0]} | {cells[1]} | "
                    f"{mfu:.1%} | {rss:.0f} |",
                    flush=True,
                )
    per_sample = rtd_flops_per_sample(cfg, cfg.generator_config(), 512, MASK_PROB)
    print(f"\nuseful training FLOPs per 512-token sample: {per_sample / 1e9:.1f} GFLOP")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
