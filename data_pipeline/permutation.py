"""Seeded bijections of [0, n) in O(1) memory: a Feistel network with cycle walking.

`permute(i, n, key)` maps each i in [0, n) to a distinct value in [0, n) for any n (1 to 2^62),
vectorized over numpy arrays where every element may have its own n and key. A balanced
Feistel network on 2h bits (2^2h >= n, so < 4n) is a bijection of [0, 2^2h); cycle walking
(re-apply until the value lands in [0, n)) restricts it to a bijection of [0, n), with fewer
than 4 applications expected.
"""

from __future__ import annotations

import numpy as np

_M64 = (1 << 64) - 1
ROUNDS = 6


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on uint64 arrays (wrapping arithmetic)."""
    x = x.astype(np.uint64, copy=True)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def derive_key(*parts: int) -> int:
    """A 64-bit key from integers (seed, stream id, pass, ...)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = int(mix64(np.array([(h ^ (p & _M64)) & _M64], dtype=np.uint64))[0])
        h = (h + 0x9E3779B97F4A7C15) & _M64
    return h


def _half_bits(n: np.ndarray) -> np.ndarray:
    bits = np.ceil(np.log2(np.maximum(n, 2).astype(np.float64))).astype(np.int64)
    # float log2 can be off by one near powers of two; fix exactly
    bits += (np.left_shift(np.int64(1), bits) < n).astype(np.int64)
    return (bits + 1) // 2


def _feistel(x: np.ndarray, half: np.ndarray, key: np.ndarray) -> np.ndarray:
    mask = (np.left_shift(np.uint64(1), half.astype(np.uint64))) - np.uint64(1)
    sh = half.astype(np.uint64)
    left = x >> sh
    right = x & mask
    for r in range(ROUNDS):
        f = mix64(right ^ key ^ np.uint64(r * 0x632BE59BD9B4E019 & _M64)) & mask
        left, right = right, left ^ f
    return (left << sh) | right


def permute(i, n, key) -> np.ndarray:
    """The image of i under the seeded bijection of [0, n) named by key (all broadcastable)."""
    i, n, key = np.broadcast_arrays(
        np.asarray(i, dtype=np.int64), np.asarray(n, dtype=np.int64), np.asarray(key, np.uint64)
    )
    if np.any((i < 0) | (i >= n)):
        raise ValueError("permute: index outside [0, n)")
    half = _half_bits(n)
    x = i.astype(np.uint64)
    nu = n.astype(np.uint64)
    todo = np.ones(x.shape, dtype=bool)
    while todo.any():
        x[todo] = _feistel(x[todo], half[todo], key[todo])
        todo = x >= nu
    return x.astype(np.int64)
