"""Dropout whose masks are cheap on CPU.

`F.dropout` on CPU draws one Mersenne-Twister number per element for a float mask and keeps that float
mask for the backward pass; at the paper's rate of 0.1 on every residual, MLP and attention output that
sampling dominates a small model's step. Here one 64-bit draw gives four 16-bit lanes, each compared with
a threshold (drop rate round(p * 2^16) / 2^16, within 8e-6 of p), and the mask is kept as one byte per
element. On other devices the stock kernels are already fused and stay in use.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_LANES = 4  # 16-bit lanes in one int64 draw
_LANE_VALUES = 1 << 16


def _dropped_lane_values(p: float) -> int:
    """How many of the 2^16 values of a lane mean "drop"."""
    return round(p * _LANE_VALUES)


def quantized_rate(p: float) -> float:
    """The drop rate the 16-bit masks realise for a requested rate p."""
    return _dropped_lane_values(p) / _LANE_VALUES


def drop_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """A bool tensor, True where an element is dropped, each independently with rate quantized_rate(p);
    drawn from torch's default generator, so `torch.manual_seed` fixes it."""
    count = math.prod(shape)
    draws = torch.empty((count + _LANES - 1) // _LANES, dtype=torch.int64, device=device)
    # The full signed range, so all 16 bits of every lane are random (random_() alone leaves the top bit 0).
    draws.random_(-2**63, 2**63 - 1)
    lanes = draws.view(torch.int16)[:count]  # signed lanes: uniform over [-2^15, 2^15)
    return (lanes < _dropped_lane_values(p) - _LANE_VALUES // 2).view(shape)


class _MaskedScale(torch.autograd.Function):
    """y = x * scale where kept, 0 where dropped; the backward pass applies the same mask."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dropped: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(dropped)
        ctx.scale = scale
        return (x * scale).masked_fill_(dropped, 0.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (dropped,) = ctx.saved_tensors
        return (grad * ctx.scale).masked_fill_(dropped, 0.0), None, None


def apply_mask(x: torch.Tensor, dropped: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout with a given mask: kept elements are scaled by 1 / (1 - rate)."""
    return _MaskedScale.apply(x, dropped, 1.0 / (1.0 - quantized_rate(p)))


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    return apply_mask(x, drop_mask(x.shape, p, x.device), p)


class Dropout(nn.Module):
    """nn.Dropout with the cheap CPU masks (no parameters, so state dicts are unchanged)."""

    def __init__(self, p: float = 0.1):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout rate {p} is not in [0, 1)")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
