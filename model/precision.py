"""Which dtype a matmul runs in under autocast, and casting a shared input once.

Autocast casts each matmul's inputs (and their gradients back) per call. A tensor that feeds
several matmuls (the attention's input, the relative embeddings, the vocabulary head's
weight) is cheaper cast once, explicitly, to the dtype autocast would pick.
"""

from __future__ import annotations

import torch


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run a matmul of `x` in (x's own dtype without autocast)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def autocast_input(x: torch.Tensor) -> torch.Tensor:
    """`x` in autocast's matmul dtype when autocast is on (a no-op otherwise)."""
    return x.to(matmul_dtype(x))
