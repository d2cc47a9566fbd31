"""Entry script of `launcher.train` for every launcher (`deepspeed`, `mpirun`, `srun`, plain
`python`): `python launcher/pretrain.py --help` prints the commands and every option.

It only makes the repository importable when run by path and re-executes the process with
tcmalloc preloaded (before torch is imported, so the re-exec costs little); the work is
`launcher.train.main.main`.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python launcher/pretrain.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launcher.train.allocator import reexec_with_tcmalloc

if __name__ == "__main__":
    reexec_with_tcmalloc()
    from launcher.train.main import main  # after the re-exec: torch and DeepSpeed load once

    sys.exit(main())
