"""Faults injected into real training processes by the tests, from outside the product.

`tests.launcher.helpers.run(..., faults={...})` puts this directory on PYTHONPATH, so every
Python process of that run imports this module at start-up; it patches the training modules
right after they are imported (nothing is imported early, nothing in the product knows).

RTDSPEED_FAULT_NONFINITE_STEPS=1,3   steps (0-based) whose loss is multiplied by NaN
RTDSPEED_FAULT_KILL_BEFORE_MARKER=4  the last rank SIGKILLs itself after writing its files of
                                     the step-4 checkpoint, before it is marked complete
"""

from __future__ import annotations

import dataclasses
import importlib.abc
import importlib.util
import os
import signal
import sys


class _Proxy:
    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)


class _NaNLoss(_Proxy):
    def __call__(self, *args, **kwargs):
        out = self._engine(*args, **kwargs)
        return dataclasses.replace(out, loss=out.loss * float("nan"))


class _KillAfterSave(_Proxy):
    def save_checkpoint(self, *args, **kwargs):
        result = self._engine.save_checkpoint(*args, **kwargs)
        import torch.distributed as dist

        if dist.get_rank() == dist.get_world_size() - 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return result


def _patch_loop(loop) -> None:
    steps = {int(s) for s in os.environ.get("RTDSPEED_FAULT_NONFINITE_STEPS", "").split(",") if s}
    train_step = loop.train_step

    def patched(engine, micro_batches, run):
        if micro_batches[0].step in steps:
            engine = _NaNLoss(engine)
        return train_step(engine, micro_batches, run)

    loop.train_step = patched


def _patch_checkpoint(checkpoint) -> None:
    kill_step = int(os.environ.get("RTDSPEED_FAULT_KILL_BEFORE_MARKER", "-1"))
    save = checkpoint.save

    def patched(engine, ckpt_dir, step, client_state, keep_last):
        if step == kill_step:
            engine = _KillAfterSave(engine)
        return save(engine, ckpt_dir, step, client_state, keep_last)

    checkpoint.save = patched


PATCHES = {"launcher.train.loop": _patch_loop, "launcher.train.checkpoint": _patch_checkpoint}


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            PATCHES[name](module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _PatchAfterImport())
