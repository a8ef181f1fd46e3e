"""Gradient and learning-rate helpers shared by the training loops."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn


def grad_norm(parameters: Iterable[nn.Parameter], clip: float) -> float:
    """The gradients' global norm before clipping; clips to `clip` when it is positive."""
    parameters = [p for p in parameters if p.grad is not None]
    if clip > 0:
        return float(torch.nn.utils.clip_grad_norm_(parameters, clip))
    if not parameters:
        return 0.0
    return float(torch.norm(torch.stack([p.grad.detach().norm() for p in parameters])))


def average_gradients(module: nn.Module) -> None:
    """All-reduce a module's gradients by hand, for modules outside DDP (lazy R1 needs a double backward,
    which DDP does not support)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's learning rate, times each group's `lr_scale` where it has one (NOBLE's multipliers)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
