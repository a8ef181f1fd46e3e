"""Linear layers through oneDNN's fp32 matmul on CPU.

PyTorch's CPU `linear` and `mm` call MKL, and MKL runs only its AVX2 kernels on processors it does not
recognise as Intel's (AMD EPYC among them), while oneDNN, also inside PyTorch, runs its AVX-512 kernels on
any CPU that has them. `linear` below sends a float32 CPU linear layer's three matmuls (output, input
gradient, weight gradient) through oneDNN's `_linear_pointwise` in plain fp32 (no reduced-precision math
mode: results differ from MKL's only in summation order). Everywhere else it is `F.linear`: GPUs, XLA,
autocast, DTensor parameters, under torch.compile, or without oneDNN.

The backend is process-wide, like `torch.backends` flags: `PIPELINE_CPU_LINEAR=aten` (or `use_backend`)
restores plain `F.linear`, for comparisons and for a CPU where oneDNN would be the slower one.

Decoding loops run inside `packed_weights(model)`: the weights are reordered once into oneDNN's blocked
layout for the whole loop, which is what makes one-token steps (a few rows against every weight) fast.
Elsewhere oneDNN reorders the weight on each call: a cached copy could not tell when the weight changed
(fused optimizers and `.data` writes update it in place without bumping its version counter).
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("onednn", "aten")
_backend = os.environ.get("PIPELINE_CPU_LINEAR", "onednn")
if _backend not in BACKENDS:
    raise ValueError(f"PIPELINE_CPU_LINEAR={_backend!r}: expected one of {', '.join(BACKENDS)}")


@functools.cache  # asked on every linear call: the build does not change while the process runs
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


def _onednn_weight(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.float32
            and type(weight) in (torch.Tensor, nn.Parameter) and backend() == "onednn")


def _runs_on_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (_onednn_weight(weight) and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() >= 2
            and x.numel() > 0 and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through oneDNN for float32 CPU tensors (see the module's docstring)."""
    if not _runs_on_onednn(x, weight):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _OneDNNLinear.apply(x, weight, bias)
    return _matmul_nt(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, state dict and init) computed by `linear`, or from its packed weight inside
    `packed_weights`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self.__dict__.get("_packed")
        if packed is not None and not torch.is_grad_enabled() and _runs_on_onednn(x, self.weight):
            return _matmul_nt(x, packed, self.bias)
        return linear(x, self.weight, self.bias)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_packed", None)  # a process-local copy of the weight, only meant for one decoding loop
        return state


@contextlib.contextmanager
def packed_weights(model: nn.Module) -> Iterator[None]:
    """Inside: the model's `Linear` layers compute without gradients from their weights reordered once, on entry,
    into oneDNN's blocked layout. For decoding loops; the weights must not change inside."""
    layers = [m for m in model.modules()
              if isinstance(m, Linear) and "_packed" not in m.__dict__ and _onednn_weight(m.weight)]
    for layer in layers:
        layer.__dict__["_packed"] = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), 1)
    try:
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("_packed", None)
