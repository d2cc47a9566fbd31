"""Measured memory of a run, what `launcher.plan`'s figures are checked against.

`ModelStateProbe` measures the model states a rank allocates: the bytes of the distinct
tensor storages reachable from the engine's module (parameters, their gradients, ZeRO-3's
partitions `ds_tensor`, buffers) and from its optimizer (DeepSpeed's ZeRO wrapper: flat
weight groups, fp32 master partitions, gradient partitions and buckets; the torch optimizer's
state). It measures at the start of the inner optimizer's step (a torch optimizer step
pre-hook), when the gradients, the master weights and the Adam moments of the previous step
are all live, on the first `steps` optimizer steps, and keeps the largest figure. Nothing is
assumed about what DeepSpeed allocates: it walks the objects and counts what is there.

`rss_gb()` is the process's resident set now (the peak is `metrics.memory_metrics`).
"""

from __future__ import annotations

import os

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_gb() -> float:
    """Resident set size of this process now, GiB (Linux /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE / 2**30


def _walkable(obj) -> bool:
    module = type(obj).__module__ or ""
    return module.startswith(("deepspeed.", "torch.optim"))


class _Storages:
    """Distinct tensor storages (by data pointer) found in an object graph."""

    def __init__(self) -> None:
        self.bytes: dict[int, int] = {}
        self.seen: set[int] = set()

    def tensor(self, t: torch.Tensor) -> None:
        if t.device.type == "meta":
            return
        storage = t.untyped_storage()
        if storage.nbytes():
            self.bytes[storage.data_ptr()] = storage.nbytes()
        for extra in (t.grad, getattr(t, "ds_tensor", None)):
            if isinstance(extra, torch.Tensor):
                self.tensor(extra)

    def walk(self, obj) -> None:
        stack = [obj]
        while stack:
            x = stack.pop()
            if id(x) in self.seen:
                continue
            self.seen.add(id(x))
            if isinstance(x, torch.Tensor):
                self.tensor(x)
            elif isinstance(x, torch.nn.Module):
                stack += [*x.parameters(), *x.buffers()]
            elif isinstance(x, dict):
                stack += [*x.keys(), *x.values()]
            elif isinstance(x, (list, tuple, set)):
                stack += list(x)
            elif _walkable(x) and hasattr(x, "__dict__"):
                stack += list(vars(x).values())


def inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer DeepSpeed steps (inside its ZeRO / mixed-precision wrapper)."""
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


class ModelStateProbe:
    """Model-state bytes of this rank, measured at the first `steps` optimizer steps."""

    def __init__(self, engine, steps: int = 3):
        self.engine, self.left, self.peak_bytes = engine, steps, 0
        self.handle = inner_optimizer(engine).register_step_pre_hook(self._measure)

    def _measure(self, optimizer, args, kwargs) -> None:
        found = _Storages()
        found.walk(self.engine.module)
        found.walk(self.engine.optimizer)
        found.walk(optimizer)
        self.peak_bytes = max(self.peak_bytes, sum(found.bytes.values()))
        self.left -= 1
        if self.left <= 0:
            self.handle.remove()

    @property
    def gb(self) -> float | None:
        return self.peak_bytes / 2**30 if self.peak_bytes else None
