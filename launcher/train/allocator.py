"""tcmalloc for training processes on the CPU.

glibc's malloc hands every large tensor back to the kernel when it is freed and takes page
faults to get it back on the next step; tcmalloc keeps the memory. Measured on the RTD step
(docs/performance.md): kernel time per step 0.7-0.9 s -> 0.03 s, about 20% less CPU time,
the same peak RSS. LD_PRELOAD must be set before the process starts, so a training process
started without it re-executes itself once (same PID, same arguments) with tcmalloc
preloaded when the library is installed (Debian: `libtcmalloc-minimal4`). This happens
before any process group or MPI initialisation, so every launcher (deepspeed, mpirun, srun)
still tracks the same process.

    RTDSPEED_TCMALLOC=0   keep the system allocator
"""

from __future__ import annotations

import ctypes.util
import os
import sys

ENV_SWITCH = "RTDSPEED_TCMALLOC"


def tcmalloc_library() -> str | None:
    """The installed tcmalloc's file name (found by ld.so's cache), or None."""
    for name in ("tcmalloc_minimal", "tcmalloc"):
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def preloaded() -> bool:
    return "tcmalloc" in os.environ.get("LD_PRELOAD", "")


def reexec_with_tcmalloc() -> None:
    """Replace this process with itself under LD_PRELOAD=tcmalloc (no return), unless it is
    already preloaded, switched off, or not installed (then: return and use glibc)."""
    if os.environ.get(ENV_SWITCH, "1") == "0" or preloaded():
        return
    lib = tcmalloc_library()
    if lib is None:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = f"{lib} {env.get('LD_PRELOAD', '')}".strip()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def describe() -> str:
    if preloaded():
        return "tcmalloc"
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return f"glibc malloc ({ENV_SWITCH}=0)"
    return "glibc malloc (tcmalloc not installed: apt-get install libtcmalloc-minimal4)"
