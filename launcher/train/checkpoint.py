"""Checkpoints: DeepSpeed save/load plus a completeness marker, retention and resume checks.

Layout: `<run_dir>/checkpoints/step_00000100/` is one DeepSpeed checkpoint tag. It counts
only once `COMPLETE.json` exists in it: rank 0 writes that marker (atomically) after a
barrier that every rank reaches only when its own `save_checkpoint` has returned. DeepSpeed's
`latest` file is not trusted (it is written before the other ranks finish). A tag directory
without the marker (a save that was killed) is never resumed from and is deleted by the next
save. The newest `keep_last` complete checkpoints are kept, and the one `best.json` names
(the best held-out figure, `eval.best_metric`). The checkpoint directory must be
on a file system every rank sees (shared for multi-node runs).

The train state travels in DeepSpeed's `client_state` (step, consumed samples, tokens, RNG
states of every rank, config and manifest fingerprints). A resume that would change the
order of the global sample sequence (seed, global batch size, language alpha, shard
manifest) is refused unless `checkpoint.force_resume=true`.

Another number of ranks: the tag is converted once by DeepSpeed's `ds_to_universal` into
`step_XXXXXXXX_universal/` (with its own marker) and loaded with `checkpoint.load_universal`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

MARKER = "COMPLETE.json"
BEST = "best.json"  # the checkpoint kept for its held-out figure (eval.best_metric)
UNIVERSAL_SUFFIX = "_universal"


class ResumeRefused(RuntimeError):
    pass


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def complete_tags(ckpt_dir: Path) -> list[tuple[int, str, dict]]:
    """(step, tag, marker) of every complete (non-universal) checkpoint, oldest first."""
    found = []
    if ckpt_dir.is_dir():
        for d in ckpt_dir.iterdir():
            marker = d / MARKER
            ours = d.name.startswith("step_") and not d.name.endswith(UNIVERSAL_SUFFIX)
            if ours and marker.is_file():
                found.append((int(d.name[5:]), d.name, json.loads(marker.read_text())))
    return sorted(found)


@dataclass
class ResumePlan:
    tag: str  # the tag to load (a universal one when the rank count changed)
    step: int
    universal: bool


def plan_resume(ckpt_dir: Path, world_size: int, rank: int) -> ResumePlan | None:
    """The newest complete checkpoint, converted to a universal one (by rank 0, once) when it
    was written by another number of ranks. Call after the process group exists."""
    tags = complete_tags(ckpt_dir)
    if not tags:
        return None
    step, tag, marker = tags[-1]
    if marker["world_size"] == world_size:
        return ResumePlan(tag, step, universal=False)
    universal = ckpt_dir / (tag + UNIVERSAL_SUFFIX)
    if rank == 0 and not (universal / MARKER).is_file():
        shutil.rmtree(universal, ignore_errors=True)
        print(
            f"rtdspeed: checkpoint {tag} was written by {marker['world_size']} rank(s), this run "
            f"has {world_size}: converting it with ds_to_universal",
            flush=True,
        )
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal"]
        cmd += ["--input_folder", str(ckpt_dir / tag), "--output_folder", str(universal)]
        cmd += ["--num_extract_workers", "1", "--num_merge_workers", "1", "--inject_missing_state"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"ds_to_universal failed:\n{done.stderr[-3000:]}")
        # DeepSpeed loads the train state (client_state) from the model-states file.
        for f in (ckpt_dir / tag).glob("*model_states.pt"):
            if not (universal / f.name).exists():
                shutil.copy2(f, universal / f.name)
        _write_json_atomic(universal / MARKER, {**marker, "universal_of": tag})
    dist.barrier()
    return ResumePlan(universal.name, step, universal=True)


def save(engine, ckpt_dir: Path, step: int, client_state: dict, keep_last: int) -> None:
    """Every rank calls this. Returns once the checkpoint is complete (marker written)."""
    tag = tag_for(step)
    rank = dist.get_rank()
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)  # an incomplete earlier attempt
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)
    dist.barrier()  # every rank has written its files
    if rank == 0:
        marker = {
            "step": step,
            "world_size": dist.get_world_size(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        _write_json_atomic(ckpt_dir / tag / MARKER, marker)
        _prune(ckpt_dir, keep_last)
    dist.barrier()


def best_tag(ckpt_dir: Path) -> str | None:
    path = ckpt_dir / BEST
    return json.loads(path.read_text())["tag"] if path.is_file() else None


def record_best(ckpt_dir: Path, metric: str, step: int, value: float) -> None:
    """Rank 0, after the checkpoint of `step` is complete: it is kept from now on."""
    record = {"metric": metric, "step": step, "value": value, "tag": tag_for(step)}
    _write_json_atomic(ckpt_dir / BEST, record)


def _prune(ckpt_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints and the best one (`best.json`);
    delete older ones and every incomplete tag older than the newest complete one."""
    tags = complete_tags(ckpt_dir)
    keep = {t for _, t, _ in tags[-keep_last:]} | {best_tag(ckpt_dir)}
    newest = tags[-1][0] if tags else -1
    for d in ckpt_dir.iterdir():
        if not (d.is_dir() and d.name.startswith("step_")):
            continue
        base = d.name.removesuffix(UNIVERSAL_SUFFIX)
        step = int(base[5:])
        incomplete = not (d / MARKER).is_file()
        if base not in keep and (not incomplete or step < newest):
            shutil.rmtree(d, ignore_errors=True)


def load(engine, ckpt_dir: Path, tag: str):
    """`engine.load_checkpoint` (returns its (path, client_state)), undoing two things
    DeepSpeed's ZeRO-3 universal load does to the optimizer: it copies the first parameter
    group's hyperparameters to every group (weight decay onto biases and LayerNorms, which the
    run config keeps at 0), and it gives every group the same `step` tensor, which torch's
    AdamW then increments once per group (a wrong bias correction from the first step on)."""
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)  # under the ZeRO wrapper
    decays = [g["weight_decay"] for g in base.param_groups]
    loaded = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    for group, decay in zip(base.param_groups, decays, strict=True):
        group["weight_decay"] = decay
    for st in base.state.values():
        if torch.is_tensor(st.get("step")):
            st["step"] = st["step"].clone()
    return loaded


def check_data_order(saved: dict, current: dict, force: bool) -> None:
    """Refuse a resume whose data-order inputs changed (unless forced)."""
    changed = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if not changed:
        return
    lines = "\n".join(f"  {k}: checkpoint {a!r} -> now {b!r}" for k, (a, b) in changed.items())
    if force:
        print(f"rtdspeed: WARNING: forced resume with a changed data order:\n{lines}", flush=True)
        return
    raise ResumeRefused(
        "refusing to resume: these settings changed since the checkpoint and would change "
        f"the order of training samples:\n{lines}\n"
        "Use a new run.name for a new run, or --checkpoint.force_resume=true to resume anyway."
    )
