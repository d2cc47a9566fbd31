"""Fail `make venv` if a DeepSpeed op asked for at install time (DS_BUILD_X=1) was not built.

Usage: python scripts/check_ds_ops.py DS_BUILD_SHM_COMM=1 DS_BUILD_FUSED_ADAM=1 ...
"""

import sys

from deepspeed.git_version_info import installed_ops
from deepspeed.ops.op_builder.all_ops import ALL_OPS


def main(args: list[str]) -> int:
    wanted = {a.split("=")[0] for a in args if a.endswith("=1")}
    if "DS_BUILD_OPS" in wanted:
        return 0  # all ops compatible with this machine; DeepSpeed reports what it skipped
    by_var = {b.BUILD_VAR: name for name, b in ALL_OPS.items()}
    missing = [by_var.get(v, v) for v in sorted(wanted) if not installed_ops.get(by_var.get(v))]
    if missing:
        print(f"check_ds_ops: DeepSpeed was installed without the ops {missing}", file=sys.stderr)
        return 1
    print(f"check_ds_ops: prebuilt DeepSpeed ops: {sorted(by_var[v] for v in wanted)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
