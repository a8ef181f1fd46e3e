"""Schedules by step: learning-rate multipliers of the peak rate (the training loops multiply the peak by them
and set each optimizer group's lr every step), and the ramps of self-distillation's teacher."""
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


def cosine_ramp(step: int, total: int, start: float, end: float) -> float:
    """From `start` at step 0 to `end` at `total` along a half cosine (DINO's teacher momentum: 0.996 -> 1)."""
    progress = min(1.0, step / max(1, total))
    return end - (end - start) * 0.5 * (1 + math.cos(math.pi * progress))


def linear_ramp(step: int, steps: int, start: float, end: float) -> float:
    """From `start` to `end` over the first `steps` steps, then `end` (DINO's teacher temperature: 0.04 -> 0.07)."""
    if steps <= 0 or step >= steps:
        return end
    return start + (end - start) * step / steps
