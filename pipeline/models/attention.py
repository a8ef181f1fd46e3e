"""Causal self-attention with dropout on the attention probabilities.

Without dropout, and on GPUs (whose fused kernels draw their own masks), this is PyTorch's
`scaled_dot_product_attention`. With dropout on CPU, that call leaves its fused kernel for the unfused
path and F.dropout's costly masks; the function below is the same maths with explicit forward and backward
passes:
- query rows go in blocks, each against only the keys it can see, so the masked upper triangle is mostly
  never computed (at four blocks, 5/8 of the full score matrix);
- the causal mask is added inside the QK^T matmul;
- the dropout mask is one byte per score, drawn only for the scores computed (`pipeline.models.dropout`);
- the 1 / (1 - p) rescale lands on the (B, H, L, d) output instead of the scores.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from pipeline.models.dropout import drop_mask, quantized_rate

MIN_BLOCK_ROWS = 64  # smaller blocks cost more in per-call overhead than they save in skipped scores
MAX_BLOCKS = 8


def row_blocks(length: int) -> list[tuple[int, int]]:
    """[start, end) of each block of query rows; block i sees keys [0, end_i)."""
    count = max(1, min(MAX_BLOCKS, length // MIN_BLOCK_ROWS))
    edges = [round(i * length / count) for i in range(count + 1)]
    return list(zip(edges[:-1], edges[1:]))


@functools.lru_cache(maxsize=32)
def _causal_bias(rows: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(end - start, end): 0 where query start + i may see key j, -inf after it."""
    start, end = rows
    return torch.full((end - start, end), float("-inf"), device=device, dtype=dtype).triu_(start + 1)


class _CausalAttentionWithDropout(torch.autograd.Function):
    """q, k, v (B, H, L, d) with one drop mask per block of rows: (B*H, end - start, end), True = dropped."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropped: tuple[torch.Tensor, ...],
                keep_scale: float) -> torch.Tensor:
        batch, heads, length, head_dim = q.shape
        q3, k3, v3 = (t.reshape(batch * heads, length, head_dim) for t in (q, k, v))
        score_scale = head_dim ** -0.5
        out = torch.empty_like(q3)
        blocks = row_blocks(length)
        probs = []
        for (start, end), mask in zip(blocks, dropped):
            bias = _causal_bias((start, end), q.device, q.dtype).expand(batch * heads, end - start, end)
            block_probs = torch.baddbmm(bias, q3[:, start:end], k3[:, :end].transpose(1, 2),
                                        alpha=score_scale).softmax(-1)
            torch.bmm(block_probs.masked_fill(mask, 0.0), v3[:, :end], out=out[:, start:end])
            probs.append(block_probs)
        ctx.save_for_backward(q3, k3, v3, *probs, *dropped)
        ctx.scales = (score_scale, keep_scale)
        return out.mul_(keep_scale).view(batch, heads, length, head_dim)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q3, k3, v3, *saved = ctx.saved_tensors
        probs, dropped = saved[:len(saved) // 2], saved[len(saved) // 2:]
        score_scale, keep_scale = ctx.scales
        shape = grad_out.shape
        grad3 = grad_out.reshape(q3.shape) * keep_scale
        grad_q, grad_k, grad_v = torch.empty_like(q3), torch.zeros_like(k3), torch.zeros_like(v3)
        for (start, end), block_probs, mask in zip(row_blocks(q3.shape[1]), probs, dropped):
            grad_rows = grad3[:, start:end]
            # bmm then add: an in-place baddbmm_ on a strided slice falls back to one matmul per batch row
            grad_v[:, :end] += torch.bmm(block_probs.masked_fill(mask, 0.0).transpose(1, 2), grad_rows)
            grad_probs = torch.bmm(grad_rows, v3[:, :end].transpose(1, 2)).masked_fill_(mask, 0.0)
            grad_scores = torch._softmax_backward_data(grad_probs, block_probs, -1, block_probs.dtype)
            torch.bmm(grad_scores, k3[:, :end], out=grad_q[:, start:end])
            grad_k[:, :end] += torch.bmm(grad_scores.transpose(1, 2), q3[:, start:end])
        grad_q.mul_(score_scale)
        grad_k.mul_(score_scale)
        return grad_q.view(shape), grad_k.view(shape), grad_v.view(shape), None, None


def block_drop_masks(batch_heads: int, length: int, p: float, device) -> tuple[torch.Tensor, ...]:
    return tuple(drop_mask((batch_heads, end - start, end), p, device) for start, end in row_blocks(length))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
    """q, k, v (B, H, L, d) -> (B, H, L, d); `dropout` is the rate on the probabilities (0 in eval)."""
    if dropout == 0.0 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
    batch, heads, length, _ = q.shape
    dropped = block_drop_masks(batch * heads, length, dropout, q.device)
    return _CausalAttentionWithDropout.apply(q, k, v, dropped, 1.0 / (1.0 - quantized_rate(dropout)))
