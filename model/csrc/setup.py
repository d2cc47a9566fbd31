"""Builds the fused disentangled-attention CPU kernel (model/csrc/disentangled_attention.cpp)
into model/ against the installed torch: `python model/csrc/setup.py build_ext --inplace`
(from any directory; `make venv` and the Docker image do it).

Compiled for x86-64 with AVX2 and FMA (the oldest CPU this project runs on), never
-march=native: the tile products are ATen's brgemm / at::mm calls, and oneDNN/MKL choose
AVX-512 or AMX at run time. -fopenmp for at::parallel_for; at run time the extension shares
the libgomp that torch has loaded (same soname).
"""

import os
import platform
from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ISA = ["-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
if platform.machine() not in ("x86_64", "AMD64"):
    ISA = []  # at::vec falls back to its portable (compiler-vectorised) code

os.chdir(Path(__file__).resolve().parents[2])  # the repository root: sources and --inplace
setup(
    name="rtdspeed-fused-attention",
    ext_modules=[
        CppExtension(
            "model._fused_attention",
            ["model/csrc/disentangled_attention.cpp"],
            extra_compile_args=["-O3", "-fopenmp", *ISA],
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
