"""Learning-rate schedules as multipliers of the peak rate: the training loops multiply the peak by them
and set each optimizer group's lr every step."""
from __future__ import annotations

import math


def warmup_cosine(step: int, warmup: int, total: int, floor_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to `floor_ratio` at `total` (paper: 1e-4 -> 5e-5)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor_ratio + (1 - floor_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_hold_exponential(step: int, warmup: int, decay_start: int, total: int, floor_ratio: float) -> float:
    """Linear warm-up, constant until `decay_start`, then exponential decay reaching `floor_ratio` at `total`
    (VIM: 4.5e-4 held, then decayed to 1e-5 from step 80k of 450k)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, total - decay_start))
    return floor_ratio ** progress
