"""Seeded bijections of [0, n) in O(1) memory: a Feistel network with cycle walking.

`permute(i, n, key)` maps each i in [0, n) to a distinct value in [0, n) for any n (1 to 2^62),
vectorized over numpy arrays where every element may have its own n and key. An unbalanced
Feistel network on bits = ceil(log2 n) bits (halves of a and b = bits - a bits, alternating
which half feeds the round function) is a bijection of [0, 2^bits), a domain smaller than
2n; cycle walking (re-apply until the value lands in [0, n)) restricts it to a bijection of
[0, n), with fewer than 2 applications expected.
"""

from __future__ import annotations

import numpy as np

_M64 = (1 << 64) - 1
ROUNDS = 6
_ROUND_CONST = [np.uint64((r + 1) * 0x632BE59BD9B4E019 & _M64) for r in range(ROUNDS)]
_C1, _C2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_ONE = np.uint64(1)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on a uint64 array (wrapping arithmetic; returns a new array)."""
    x = np.array(x, dtype=np.uint64, copy=True)
    x ^= x >> _S30
    x *= _C1
    x ^= x >> _S27
    x *= _C2
    x ^= x >> _S31
    return x


def derive_key(*parts: int) -> int:
    """A 64-bit key from integers (seed, stream id, pass, ...)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = int(mix64(np.array([(h ^ (p & _M64)) & _M64], dtype=np.uint64))[0])
        h = (h + 0x9E3779B97F4A7C15) & _M64
    return h


def bit_width(n: np.ndarray) -> np.ndarray:
    """ceil(log2(n)) for n >= 1, exactly (0 for n = 1)."""
    n = np.asarray(n, dtype=np.int64)
    bits = np.ceil(np.log2(np.maximum(n, 1).astype(np.float64))).astype(np.int64)
    bits += (np.left_shift(np.int64(1), bits) < n).astype(np.int64)  # float log2 off by one
    bits -= (bits > 0) & (np.left_shift(np.int64(1), np.maximum(bits - 1, 0)) >= n)
    return bits


def _feistel(x, a, b, key):
    """One application of the network; a + b bits, x < 2^(a+b); all uint64 arrays."""
    widths = (b, a)  # bits in the low half of the current split: b, a, b, a, ...
    for r in range(ROUNDS):
        low, high = widths[r % 2], widths[(r + 1) % 2]
        lo = x & ((_ONE << low) - _ONE)
        f = mix64(lo ^ key ^ _ROUND_CONST[r]) & ((_ONE << high) - _ONE)
        x = (lo << high) | ((x >> low) ^ f)
    return x


def permute(i, n, key) -> np.ndarray:
    """The image of i under the seeded bijection of [0, n) named by key (all broadcastable)."""
    i, n, key = np.broadcast_arrays(
        np.asarray(i, dtype=np.int64), np.asarray(n, dtype=np.int64), np.asarray(key, np.uint64)
    )
    if np.any((i < 0) | (i >= n)):
        raise ValueError("permute: index outside [0, n)")
    bits = bit_width(n)
    a = ((bits + 1) // 2).astype(np.uint64)
    b = (bits // 2).astype(np.uint64)
    nu = n.astype(np.uint64)
    x = _feistel(i.astype(np.uint64), a, b, key)
    out = x >= nu
    while out.any():  # cycle walking, on the few elements still outside [0, n)
        sel = np.flatnonzero(out)
        y = _feistel(x[sel], a[sel], b[sel], key[sel])
        x[sel] = y
        out[sel] = y >= nu[sel]
    return x.astype(np.int64)
