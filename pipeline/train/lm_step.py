"""One optimizer step of the VIM Transformer (or the RQ-Transformer, with its own loss) over several micro-batches
(gradient accumulation), and the schedule and parameter groups of the paper's recipe. Free of Ray: the stage and
the XLA check share it."""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.noble import branch_parameter_groups
from pipeline.schedules import warmup_hold_exponential
from pipeline.train.optim import grad_norm

LN2 = math.log(2)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: embeddings, position tables, norms and biases are left alone (nanoGPT). NOBLE
    branch parameters, where the model has them, get groups of their own with their `lr_scale`."""
    placed, branch_groups = branch_parameter_groups(model, weight_decay)
    decay, keep = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad or id(parameter) in placed:
            continue
        is_matrix = parameter.dim() >= 2 and "embedding" not in name and "position" not in name
        (decay if is_matrix else keep).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}, *branch_groups]


def lr_at(step: int, peak: float, floor: float, warmup: int, decay_start: int, total: int) -> float:
    """Paper: linear warm-up to the peak, held, then exponential decay to the floor."""
    return peak * warmup_hold_exponential(step, warmup, decay_start, total, floor / peak)


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean NLL in nats per token, computed in fp32 whatever the autocast dtype."""
    return F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())


LossOf = Callable[[nn.Module, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def next_token_loss_of(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """The VIM Transformer's training loss on a micro-batch."""
    return next_token_loss(model(tokens, labels), tokens)


def prefix_loss_of(prefix_length: int) -> LossOf:
    """The training loss of DiGIT's second stage over rows that carry the prefix and the pixel codes in one
    sequence ([s_0 .. s_{P-1}, t_0 .. t_{L-1}], as the render stage reads them): next-token loss on the codes."""
    def loss_of(model: nn.Module, rows: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        prefix, tokens = rows[:, :prefix_length], rows[:, prefix_length:]
        return next_token_loss(model(tokens, prefix, labels), tokens)
    return loss_of


def accumulated_step(model: nn.Module, micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
                     optimizer: torch.optim.Optimizer, backend, grad_clip: float,
                     loss_of: LossOf | None = None) -> tuple[float, float]:
    """Forward/backward every micro-batch, then one clipped optimizer step. `loss_of(model, tokens, labels)`:
    the mean loss of a micro-batch (default: the VIM Transformer's next-token loss).

    Each micro-batch's mean loss is divided by their count, so k micro-batches of n give the gradient
    of one batch of k*n. Under DDP only the last backward all-reduces (`no_sync` for the others).
    Returns (mean loss in nats per token, gradient norm before clipping)."""
    micro_batches = list(micro_batches)
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=micro_batches[0][0].device)
    for index, (tokens, labels) in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
            with backend.autocast():  # through the (DDP) wrapper's forward, so its hooks all-reduce
                loss = (loss_of or next_token_loss_of)(model, tokens, labels) / len(micro_batches)
            loss.backward()
        total += loss.detach()
    norm = grad_norm(model.parameters(), grad_clip)
    backend.optimizer_step(optimizer)
    backend.mark_step()
    return float(total), norm
