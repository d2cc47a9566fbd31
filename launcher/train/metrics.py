"""Observability: step metrics averaged over ranks, TensorBoard, a console line, metrics.jsonl.

Everything is written by rank 0 only, after the metrics were all-reduced (mean over ranks,
micro batches and the steps of a log window; token counts summed). TensorBoard tags:

    loss/total loss/mlm loss/rtd            acc/generator acc/discriminator
    rtd/precision rtd/recall rtd/replaced_frac
    optim/lr optim/grad_norm optim/loss_scale (fp16 only) optim/nonfinite_steps
    optim/skipped_steps (DeepSpeed's: fp16 overflow and ZeRO non-finite skips)
    perf/tokens_per_s perf/samples_per_s perf/tflops_per_rank perf/mfu
    memory/rss_gb (peak) memory/rss_start_gb (before the model was built)
    memory/model_states_gb (`launcher.train.memory.ModelStateProbe`)
    memory/cuda_max_allocated_gb (CUDA only)
    tokens/total tokens/<lang>
    eval/<metric> eval/<lang>/<metric> (held-out, `launcher.evaluate.METRICS`; eval.jsonl)

MFU = achieved model FLOP/s per rank / `log.peak_flops_per_rank`; the default peak is
312e12 on CUDA (A100 bf16 dense) and 1e11 on the CPU (an order of magnitude, not a spec).
FLOPs per sample come from `model.rtd_flops_per_sample` (matmuls, forward + backward).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter

# Mean over ranks and micro batches (the RTDOutput fields that are rates or losses).
MEAN_KEYS = (
    "loss",
    "mlm_loss",
    "rtd_loss",
    "gen_acc",
    "disc_acc",
    "disc_precision",
    "disc_recall",
    "replaced_frac",
)
TB_NAMES = {
    "loss": "loss/total",
    "mlm_loss": "loss/mlm",
    "rtd_loss": "loss/rtd",
    "gen_acc": "acc/generator",
    "disc_acc": "acc/discriminator",
    "disc_precision": "rtd/precision",
    "disc_recall": "rtd/recall",
    "replaced_frac": "rtd/replaced_frac",
    "lr": "optim/lr",
    "grad_norm": "optim/grad_norm",
    "loss_scale": "optim/loss_scale",
    "nonfinite_steps": "optim/nonfinite_steps",
    "skipped_steps": "optim/skipped_steps",
    "tokens_per_s": "perf/tokens_per_s",
    "samples_per_s": "perf/samples_per_s",
    "tflops_per_rank": "perf/tflops_per_rank",
    "mfu": "perf/mfu",
    "rss_gb": "memory/rss_gb",
    "rss_start_gb": "memory/rss_start_gb",
    "model_states_gb": "memory/model_states_gb",
    "cuda_max_allocated_gb": "memory/cuda_max_allocated_gb",
    "tokens": "tokens/total",
}


def reduce_means(sums: dict[str, float], count: int, device: torch.device) -> dict[str, float]:
    """Mean of MEAN_KEYS over micro batches and ranks (one all_reduce on `device`, the
    engine's: NCCL reduces only CUDA tensors)."""
    values = [sums[k] for k in MEAN_KEYS] + [count]
    vec = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(vec)
    n = vec[-1].item()
    return {k: vec[i].item() / n for i, k in enumerate(MEAN_KEYS)}


def memory_metrics() -> dict[str, float]:
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # peak RSS, KiB on Linux
    out = {"rss_gb": rss_kb / 2**20}
    if torch.cuda.is_available():
        out["cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def truncate_jsonl(path: Path, last_step: int) -> int:
    """Keep the records of steps <= last_step (and drop a line cut by a crash); returns how
    many records were dropped. Rewritten atomically."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            dropped += 1
            continue
        if step <= last_step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        os.replace(tmp, path)
    return dropped


class Logger:
    """Rank 0: TensorBoard + console + metrics.jsonl. Other ranks: no-ops.

    A run that continues from step `start_step` (a resume, or a fresh start over a run that
    crashed before its first checkpoint) drops what an earlier attempt logged after that
    step: metrics.jsonl is cut back, and TensorBoard purges the steps from `start_step + 1` on
    (`purge_step`), so every step appears once in both."""

    def __init__(
        self, run_dir: Path, enabled: bool, tensorboard: bool, max_steps: int, start_step: int = 0
    ):
        self.enabled, self.max_steps = enabled, max_steps
        self.writer = None
        self.jsonl = None
        self.tb_dir = run_dir / "tensorboard"
        self.t_start = time.time()
        self.eval_path = run_dir / "eval.jsonl"
        if enabled:
            path = run_dir / "metrics.jsonl"
            truncate_jsonl(path, start_step)
            truncate_jsonl(self.eval_path, start_step)
            if tensorboard:
                self.writer = SummaryWriter(str(self.tb_dir), purge_step=start_step + 1)
            self.jsonl = open(path, "a")  # noqa: SIM115 (closed in close())

    def log(self, step: int, metrics: dict[str, float], lang_tokens: dict[str, int]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics, "lang_tokens": lang_tokens}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for k, v in metrics.items():
                if k in TB_NAMES:
                    self.writer.add_scalar(TB_NAMES[k], v, step)
            for lang, n in lang_tokens.items():
                self.writer.add_scalar(f"tokens/{lang}", n, step)
            self.writer.flush()

    def log_eval(self, step: int, results: dict[str, dict[str, float]], seconds: float) -> None:
        """Held-out figures: eval.jsonl, TensorBoard eval/<metric> and eval/<lang>/<metric>,
        one console line."""
        if not self.enabled:
            return
        record = {"step": step, "seconds": seconds, "metrics": results}
        with open(self.eval_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for lang, m in results.items():
                prefix = "eval" if lang == "all" else f"eval/{lang}"
                for k, v in m.items():
                    self.writer.add_scalar(f"{prefix}/{k}", v, step)
            self.writer.flush()
        a = results["all"]
        print(
            f"eval {step:>6} | mlm {a['mlm_loss']:.4f} acc {a['mlm_acc']:.3f} | disc "
            f"{a['disc_loss']:.4f} (prior {a['prior_loss']:.4f}) acc {a['disc_acc']:.3f} "
            f"auc {a['disc_auc']:.3f} | {len(results) - 1} languages, {seconds:.1f} s",
            flush=True,
        )

    def console(self, step: int, m: dict[str, float], steps_this_run: int) -> None:
        if not self.enabled:
            return
        elapsed = time.time() - self.t_start
        eta = elapsed / max(steps_this_run, 1) * (self.max_steps - step)
        print(
            f"step {step:>6}/{self.max_steps} | loss {m['loss']:.4f} mlm {m['mlm_loss']:.4f} "
            f"rtd {m['rtd_loss']:.4f} | gen_acc {m['gen_acc']:.3f} disc_acc {m['disc_acc']:.3f} "
            f"| lr {m['lr']:.2e} | gnorm {m['grad_norm']:.2f} | {m['tokens_per_s']:,.0f} tok/s "
            f"| ETA {_hms(eta)}",
            flush=True,
        )

    def message(self, text: str) -> None:
        if self.enabled:
            print(f"rtdspeed: {text}", flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
        sys.stdout.flush()


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
