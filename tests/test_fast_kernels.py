"""The CPU dropout masks and the causal attention with dropout, against the plain maths with the same mask."""
import pytest
import torch
import torch.nn.functional as F

from pipeline.models.attention import _CausalAttentionWithDropout, block_drop_masks, causal_attention, row_blocks
from pipeline.models.dropout import Dropout, apply_mask, drop_mask, dropout, quantized_rate


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5])
def test_drop_masks_drop_at_the_requested_rate_independently(p):
    torch.manual_seed(0)
    dropped = drop_mask((1000, 1001), p)  # an odd count: the last int64 draw is only partly used
    assert dropped.dtype == torch.bool and dropped.shape == (1000, 1001)
    rate = dropped.float().mean().item()
    n = dropped.numel()
    assert abs(rate - quantized_rate(p)) < 5 * (p * (1 - p) / n) ** 0.5
    assert abs(quantized_rate(p) - p) < 1e-5
    # Neighbouring lanes come from one draw: they must still be independent (joint rate = p^2).
    flat = dropped.flatten()[: n - n % 4].view(-1, 4).float()
    for lane in range(1, 4):
        joint = (flat[:, 0] * flat[:, lane]).mean().item()
        assert abs(joint - rate * rate) < 5 * (p * p / (n / 4)) ** 0.5
    # Every lane drops at the rate (a lane whose top bit never varies would not).
    assert (flat.mean(0) - rate).abs().max().item() < 5 * (p * (1 - p) / (n / 4)) ** 0.5


def test_masks_follow_the_torch_seed():
    torch.manual_seed(3)
    first = drop_mask((64, 64), 0.1)
    torch.manual_seed(3)
    assert torch.equal(first, drop_mask((64, 64), 0.1))
    assert not torch.equal(first, drop_mask((64, 64), 0.1))


def test_masked_dropout_equals_the_plain_formula_with_its_gradient():
    torch.manual_seed(0)
    x = torch.randn(7, 33, dtype=torch.float64, requires_grad=True)
    dropped = drop_mask(x.shape, 0.1)
    y = apply_mask(x, dropped, 0.1)
    expected = x * (~dropped) / (1 - quantized_rate(0.1))
    assert torch.allclose(y, expected)
    grad = torch.randn_like(y)
    (ours,) = torch.autograd.grad(y, x, grad)
    (plain,) = torch.autograd.grad(expected, x, grad)
    assert torch.allclose(ours, plain)
    assert torch.autograd.gradcheck(lambda t: apply_mask(t, dropped, 0.1), (x,))


def test_dropout_module_is_identity_in_eval_and_at_rate_zero():
    x = torch.randn(4, 8)
    module = Dropout(0.1).eval()
    assert module(x) is x
    assert dropout(x, 0.0, True) is x
    module.train()
    torch.manual_seed(0)
    y = module(torch.ones(200, 200))
    kept = y != 0
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / (1 - quantized_rate(0.1))))
    assert abs(kept.float().mean().item() - 0.9) < 0.01
    with pytest.raises(ValueError):
        Dropout(1.0)


def _full_mask(blocks, batch_heads, length):
    """The per-block masks placed in one (B*H, L, L) mask (entries above the diagonal stay kept)."""
    full = torch.zeros(batch_heads, length, length, dtype=torch.bool)
    for (start, end), mask in zip(row_blocks(length), blocks):
        full[:, start:end, :end] = mask
    return full


def test_row_blocks_cover_every_row_once_and_shrink_the_scores():
    for length in (1, 17, 63, 64, 65, 256, 1000, 1024):
        blocks = row_blocks(length)
        assert blocks[0][0] == 0 and blocks[-1][1] == length
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(blocks, blocks[1:]))
    computed = sum((end - start) * end for start, end in row_blocks(256))
    assert computed == 256 * 256 * 5 // 8  # four blocks: the lower triangle and its diagonal blocks


def _reference_attention(q, k, v, dropped, p):
    length, head_dim = q.shape[2], q.shape[3]
    scores = (q @ k.transpose(-1, -2)) * head_dim ** -0.5
    causal = torch.ones(length, length, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(causal, float("-inf")).softmax(-1)
    return (probs * (~dropped).view_as(probs) / (1 - quantized_rate(p))) @ v


@pytest.mark.parametrize("shape", [(2, 3, 17, 8), (1, 2, 1, 4), (1, 2, 130, 4)])  # one block, two blocks
def test_attention_with_dropout_equals_the_plain_maths_and_gradients(shape):
    torch.manual_seed(0)
    q, k, v = (torch.randn(*shape, dtype=torch.float64, requires_grad=True) for _ in range(3))
    batch, heads, length, _ = shape
    dropped = block_drop_masks(batch * heads, length, 0.1, "cpu")
    scale = 1 / (1 - quantized_rate(0.1))
    ours = _CausalAttentionWithDropout.apply(q, k, v, dropped, scale)
    plain = _reference_attention(q, k, v, _full_mask(dropped, batch * heads, length), 0.1)
    assert torch.allclose(ours, plain)
    grad = torch.randn_like(ours)
    for mine, theirs in zip(torch.autograd.grad(ours, (q, k, v), grad), torch.autograd.grad(plain, (q, k, v), grad)):
        assert torch.allclose(mine, theirs)
    assert torch.autograd.gradcheck(lambda a, b, c: _CausalAttentionWithDropout.apply(a, b, c, dropped, scale),
                                    (q, k, v))


def test_attention_without_dropout_is_the_fused_kernel_and_float32_agrees():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 256, 16) for _ in range(3))
    assert torch.equal(causal_attention(q, k, v, 0.0), F.scaled_dot_product_attention(q, k, v, is_causal=True))
    dropped = block_drop_masks(8, 256, 0.1, "cpu")
    ours = _CausalAttentionWithDropout.apply(q, k, v, dropped, 1 / (1 - quantized_rate(0.1)))
    assert torch.allclose(ours, _reference_attention(q, k, v, _full_mask(dropped, 8, 256), 0.1), atol=1e-5)
    # Causal: an output row never depends on later positions, whatever the mask.
    torch.manual_seed(1)
    first = causal_attention(q, k, v, 0.1)
    later = k.clone()
    later[:, :, 200:] += 1
    torch.manual_seed(1)
    assert torch.allclose(first[:, :, :200], causal_attention(q, later, v, 0.1)[:, :, :200])
