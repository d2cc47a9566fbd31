"""Run every rtdspeed benchmark and write one markdown table (`make bench`).

Runs `benchmarks/rtd_step.py` (RTDModel vs the same RTD step from Hugging Face modules:
tokens/s of both, the ratio, MFU, peak RSS, versions) with tcmalloc preloaded when it is
installed (Debian `libtcmalloc-minimal4`; both sides get the same allocator, see
docs/performance.md), and writes its table to `benchmarks/results.md` (or `--out`).

    python benchmarks/run_all.py                 # full: 2 rounds of 1 warm-up + 2 timed steps
    python benchmarks/run_all.py --quick         # 1 round of 1 warm-up + 1 timed step
    python benchmarks/run_all.py --rounds 3
    python benchmarks/run_all.py --allocator glibc
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from launcher.train.allocator import tcmalloc_library  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--allocator", choices=["tcmalloc", "glibc"], default="tcmalloc")
    parser.add_argument("--out", type=Path, default=HERE / "results.md")
    args = parser.parse_args()
    env = dict(os.environ)
    allocator = "glibc malloc"
    lib = tcmalloc_library()  # the lookup the training launcher uses
    if args.allocator == "tcmalloc" and lib:
        env["LD_PRELOAD"] = f"{lib} {env.get('LD_PRELOAD', '')}".strip()
        allocator = f"tcmalloc ({lib})"
    cmd = [sys.executable, str(HERE / "rtd_step.py"), "--rounds", str(args.rounds)]
    cmd += ["--quick"] if args.quick else []
    start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    sys.stderr.write(proc.stderr[-3000:] if proc.returncode else "")
    if proc.returncode:
        raise SystemExit(f"rtd_step.py failed with exit code {proc.returncode}")
    lines = [line for line in proc.stdout.splitlines() if not line.startswith("USDT")]
    text = "\n".join(
        [f"## RTD step, ours vs Hugging Face modules ({start}, allocator: {allocator})", "", *lines]
    )
    args.out.write_text(text + "\n")
    print(text)
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
