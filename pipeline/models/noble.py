"""NOBLE: a permanent nonlinear low-rank branch beside a linear layer, trained from scratch.

    y = x W^T + b + W_up sigma(W_down x + b_down)

with sigma = CosNet, cos(w2 * (M cos(w1 * h + p1) + b_M) + p2) (M an r x r map; w, p learned per dimension),
or plain GELU for the paper's activation comparison. Plain torch ops, so CPU, CUDA and XLA run it alike.

Facts taken from the reference code (ethansmith2000/noble, `NOBLELinear` with `cos_net`), where it says
more than the paper's formula:
- W_down carries a zero-initialised bias (the formula has none); W_up has none.
- init: W_down ~ N(0, 1/sqrt(in)), W_up ~ N(0, 0.01/sqrt(r)) (the branch starts nearly silent),
  M ~ N(0, 0.5/sqrt(r)) with nn.Linear's default bias U(-1/sqrt(r), 1/sqrt(r)), w ~ U(0.8, 1.2), p ~ N(0, 0.1).
- learning-rate multipliers: W_up (min(in, out)/r)^0.4, M (min(in, out)/r)^0.5, w 2, p 4; W_down 1.
  The reference attaches M's multiplier to the nn.Linear *module*, where its own per-parameter grouping never
  finds it (M trains at 1x there); we follow the stated intent and scale M's weight and bias.
- the main weight keeps each model's own init here (the reference re-initialises it to N(0, 0.5/sqrt(in))):
  with the branch off a model is exactly the model it was.
Our attention projects q, k and v with one fused linear layer; the paper gives each its own branch, so that
layer gets `branches=3` independent branches, one per output third (W_down stacked, M block-diagonal).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.cpu_linear import Linear, linear

Placement = Literal["attention", "mlp"]

UP_INIT_SCALE = 0.01     # W_up's std times sqrt(r)
MIX_INIT_SCALE = 0.5     # M's std times sqrt(r)
FREQUENCY_RANGE = (0.8, 1.2)
PHASE_STD = 0.1
UP_LR_POWER = 0.4        # the reference's lora_lr_mult_power 0.2, doubled for the one-sided multiplier
MIX_LR_POWER = 0.5
FREQUENCY_LR = 2.0
PHASE_LR = 4.0


class CosNet(nn.Module):
    """cos(w2 * (M cos(w1 * h + p1) + b_M) + p2) on `branches` independent groups of `rank` channels."""

    def __init__(self, rank: int, branches: int = 1, lr_base: float = 1.0):
        super().__init__()
        width = rank * branches
        self.rank, self.branches, self.lr_base = rank, branches, lr_base
        self.frequency_in = nn.Parameter(torch.empty(width))
        self.phase_in = nn.Parameter(torch.empty(width))
        self.mix = nn.Parameter(torch.empty(branches, rank, rank))  # M of each branch, (out, in)
        self.mix_bias = nn.Parameter(torch.empty(width))
        self.frequency_out = nn.Parameter(torch.empty(width))
        self.phase_out = nn.Parameter(torch.empty(width))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for frequency in (self.frequency_in, self.frequency_out):
            nn.init.uniform_(frequency, *FREQUENCY_RANGE)
        for phase in (self.phase_in, self.phase_out):
            nn.init.normal_(phase, std=PHASE_STD)
        nn.init.normal_(self.mix, std=MIX_INIT_SCALE / math.sqrt(self.rank))
        bound = 1 / math.sqrt(self.rank)
        nn.init.uniform_(self.mix_bias, -bound, bound)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = torch.cos(self.frequency_in * h + self.phase_in)
        if self.branches == 1:
            h = F.linear(h, self.mix[0], self.mix_bias)
        else:
            grouped = h.unflatten(-1, (self.branches, self.rank))
            h = torch.einsum("...gi,goi->...go", grouped, self.mix).flatten(-2) + self.mix_bias
        return torch.cos(self.frequency_out * h + self.phase_out)

    def lr_scales(self) -> dict[str, float]:
        mix = self.lr_base ** MIX_LR_POWER
        return {"frequency_in": FREQUENCY_LR, "frequency_out": FREQUENCY_LR, "phase_in": PHASE_LR,
                "phase_out": PHASE_LR, "mix": mix, "mix_bias": mix}


ACTIVATIONS = ("cosnet", "gelu")


def make_activation(name: str, rank: int, branches: int, lr_base: float) -> nn.Module:
    if name == "cosnet":
        return CosNet(rank, branches, lr_base)
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown NOBLE activation {name!r}; one of {', '.join(ACTIVATIONS)}")


class NobleBranch(nn.Module):
    """x -> W_up sigma(W_down x + b_down), as `branches` independent branches over equal slices of the output."""

    def __init__(self, in_features: int, out_features: int, rank: int, activation: str = "cosnet",
                 branches: int = 1):
        super().__init__()
        if rank < 1:
            raise ValueError(f"NOBLE rank must be at least 1, got {rank}")
        if out_features % branches:
            raise ValueError(f"{out_features} outputs do not split into {branches} branches")
        self.in_features, self.out_features, self.rank, self.branches = in_features, out_features, rank, branches
        # The reference's width ratio min(in, out) / r, taken per branch (each sees out/branches outputs).
        self.lr_base = min(in_features, out_features // branches) / rank
        self.down = nn.Parameter(torch.empty(rank * branches, in_features))
        self.down_bias = nn.Parameter(torch.empty(rank * branches))
        self.activation = make_activation(activation, rank, branches, self.lr_base)
        self.up = nn.Parameter(torch.empty(out_features, rank))  # rows of branch g: g*out/branches onwards
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.down, std=1 / math.sqrt(self.in_features))
        nn.init.zeros_(self.down_bias)
        nn.init.normal_(self.up, std=UP_INIT_SCALE / math.sqrt(self.rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.activation(linear(x, self.down, self.down_bias))
        if self.branches == 1:
            return linear(h, self.up)
        grouped = h.unflatten(-1, (self.branches, self.rank))
        up = self.up.view(self.branches, self.out_features // self.branches, self.rank)
        return torch.einsum("...gr,gor->...go", grouped, up).flatten(-2)

    def lr_scales(self) -> dict[str, float]:
        """Learning-rate multiplier of each parameter, by its name in this module (unlisted: 1)."""
        scales = {"up": self.lr_base ** UP_LR_POWER}
        if isinstance(self.activation, CosNet):
            scales.update({f"activation.{name}": s for name, s in self.activation.lr_scales().items()})
        return scales

    def extra_repr(self) -> str:
        return f"rank={self.rank}, branches={self.branches}"


class NobleLinear(Linear):
    """nn.Linear plus a NOBLE branch. The main weight and bias keep nn.Linear's names (and whatever init the
    model gives every nn.Linear); the branch lives under `.noble`, out of reach of those inits."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, rank: int = 32,
                 activation: str = "cosnet", branches: int = 1, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.noble = NobleBranch(in_features, out_features, rank, activation, branches)
        if device is not None or dtype is not None:
            self.noble.to(device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        main = linear(x, self.weight, self.bias)
        return main + self.noble(x).to(main.dtype)


@dataclass(frozen=True)
class Noble:
    """Where a model puts NOBLE branches; rank 0 (the default) builds plain nn.Linear layers."""

    rank: int = 0
    activation: str = "cosnet"
    layers: str = "all"  # attention | mlp | all

    @classmethod
    def of(cls, settings) -> "Noble":
        """From a model's settings (the `noble_*` fields of pipeline.models.settings.NobleSettings)."""
        return cls(settings.noble_rank, settings.noble_activation, settings.noble_layers)

    def linear(self, in_features: int, out_features: int, place: Placement, branches: int = 1,
               bias: bool = True) -> nn.Linear:
        if self.rank == 0 or self.layers not in ("all", place):
            return Linear(in_features, out_features, bias)
        return NobleLinear(in_features, out_features, bias, self.rank, self.activation, branches)


# ---------------------------------------------------------------------------------------------
# Optimizer groups


def branch_lr_scales(model: nn.Module) -> dict[int, float]:
    """id(parameter) -> learning-rate multiplier, for every parameter of every NOBLE branch in `model`.
    Found by module type and attribute, so it works through DDP, torch.compile and FSDP2 (which keep the
    modules and swap in sharded parameters under the same names)."""
    scales: dict[int, float] = {}
    for module in model.modules():
        if isinstance(module, NobleBranch):
            listed = module.lr_scales()
            for name, parameter in module.named_parameters():
                scales[id(parameter)] = listed.get(name, 1.0)
    return scales


def branch_parameter_groups(model: nn.Module, weight_decay: float) -> tuple[set[int], list[dict]]:
    """Optimizer groups for the NOBLE branch parameters: one per (multiplier, matrix or not), weight decay on
    the matrices only, the multiplier as `lr_scale` (pipeline.train.optim.set_lr applies it every step).
    Returns the ids of the parameters placed, so the caller groups the rest as it did before."""
    scales = branch_lr_scales(model)
    grouped: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for parameter in model.parameters():
        if id(parameter) in scales and parameter.requires_grad:
            grouped.setdefault((scales[id(parameter)], parameter.dim() >= 2), []).append(parameter)
    groups = [{"params": params, "weight_decay": weight_decay if matrix else 0.0, "lr_scale": scale}
              for (scale, matrix), params in sorted(grouped.items(), key=lambda item: item[0])]
    return set(scales), groups

