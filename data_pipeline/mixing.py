"""Language weights and integer apportionment shared by the tokenizer sampler and the loader."""

from __future__ import annotations

import numpy as np


def language_weights(sizes: np.ndarray, alpha: float) -> np.ndarray:
    """q_l proportional to n_l^alpha (XLM-R, mDeBERTa: alpha = 0.3); empty languages get 0."""
    sizes = np.asarray(sizes, dtype=np.float64)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    w = np.where(sizes > 0, np.power(np.maximum(sizes, 1.0), alpha), 0.0)
    if w.sum() <= 0:
        raise ValueError("all languages are empty")
    return w / w.sum()


def largest_remainder(q: np.ndarray, total: int) -> np.ndarray:
    """Integers summing to `total`, each floor(total * q_l) or one more (Hamilton's method);
    ties go to the lower index so the result is a pure function of (q, total)."""
    exact = np.asarray(q, dtype=np.float64) * total
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    remainder = np.where(exact > 0, exact - counts, -1.0)  # a zero weight never gets a unit
    order = np.lexsort((np.arange(len(exact)), -remainder))
    counts[order[:short]] += 1
    return counts
