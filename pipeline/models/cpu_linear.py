"""Linear layers through oneDNN's fp32 matmul on CPU.

PyTorch's CPU `linear` and `mm` call MKL, and MKL runs only its AVX2 kernels on processors it does not
recognise as Intel's (AMD EPYC among them), while oneDNN, also inside PyTorch, runs its AVX-512 kernels on
any CPU that has them. `linear` below sends a float32 CPU linear layer's three matmuls (output, input
gradient, weight gradient) through oneDNN's `_linear_pointwise` in plain fp32 (no reduced-precision math
mode: results differ from MKL's only in summation order). Everywhere else it is `F.linear`: GPUs, XLA,
autocast, DTensor parameters, under torch.compile, or without oneDNN.

The backend is process-wide, like `torch.backends` flags: `PIPELINE_CPU_LINEAR=aten` (or `use_backend`)
restores plain `F.linear`, for comparisons and for a CPU where oneDNN would be the slower one.

In inference the weight is reordered once into oneDNN's blocked layout and kept until it changes, which
is what makes one-token decoding steps (a few rows against every weight) fast.
"""
from __future__ import annotations

import contextlib
import os
import weakref
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("onednn", "aten")
_backend = os.environ.get("PIPELINE_CPU_LINEAR", "onednn")
if _backend not in BACKENDS:
    raise ValueError(f"PIPELINE_CPU_LINEAR={_backend!r}: expected one of {', '.join(BACKENDS)}")


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def backend() -> str:
    """The kernel CPU fp32 linear layers use now: onednn where it can run, else aten."""
    return "onednn" if _backend == "onednn" and onednn_available() else "aten"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run a block with the given CPU linear backend (onednn | aten)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown CPU linear backend {name!r}: one of {', '.join(BACKENDS)}")
    previous, _backend = _backend, name
    try:
        yield
    finally:
        _backend = previous


def _matmul_nt(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """rows (..., k) @ weight (n, k)^T (+ bias): either operand may be strided (a transposed view)."""
    return torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")


def _weight_gradient(grad: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """grad (m, n)^T @ inputs (m, k) -> (n, k). oneDNN is fastest with the larger of n and k on the weight
    side (measured on the Transformer's shapes), so the wider case is computed transposed."""
    if grad.shape[1] >= inputs.shape[1]:
        return linear(inputs.t(), grad.t()).t().contiguous()
    return linear(grad.t(), inputs.t())


class _OneDNNLinear(torch.autograd.Function):
    """The backward pass is made of `linear` calls too: with create_graph (the discriminator's R1 penalty) it
    is itself differentiable; otherwise autograd runs it without grad mode and they are plain oneDNN calls."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.with_bias = bias is not None
        return _matmul_nt(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = linear(grad, weight.t())
        grad_rows = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_weight = _weight_gradient(grad_rows, x.reshape(-1, x.shape[-1]))
        if ctx.with_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_rows.sum(0)
        return grad_x, grad_weight, grad_bias


def _runs_on_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.numel() > 0 and type(weight) in (torch.Tensor, nn.Parameter)
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and backend() == "onednn")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through oneDNN for float32 CPU tensors (see the module's docstring)."""
    if not _runs_on_onednn(x, weight):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _OneDNNLinear.apply(x, weight, bias)
    return _matmul_nt(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, state dict and init) computed by `linear`; without gradients it keeps its
    weight in oneDNN's blocked layout until the weight changes (an optimizer step, a load, `.to`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if needs_grad or not _runs_on_onednn(x, self.weight):
            return linear(x, self.weight, self.bias)
        return _matmul_nt(x, self._packed_weight(), self.bias)

    def _packed_weight(self) -> torch.Tensor:
        weight = self.weight
        cached = self.__dict__.get("_packed")
        if cached is None or cached[0]() is not weight or cached[1] != weight._version:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
            cached = (weakref.ref(weight), weight._version, packed)
            self.__dict__["_packed"] = cached
        return cached[2]

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_packed", None)  # a copy of the weight in a process-local layout: rebuilt on demand
        return state
