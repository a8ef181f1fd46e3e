"""The oneDNN linear layers against F.linear: outputs and gradients, the packed inference weight, the fallbacks,
and whole models (the VIM Transformer and ViT-VQGAN) computed with each backend."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models import cpu_linear
from pipeline.models.cpu_linear import Linear, linear, packed_weights, use_backend
from pipeline.models.settings import TokenizerSettings, TransformerSettings
from pipeline.models.tokenizer import ViTVQGAN
from pipeline.models.transformer import VIMTransformer

needs_onednn = pytest.mark.skipif(not cpu_linear.onednn_available(), reason="this torch build has no oneDNN")


def _close(a: torch.Tensor, b: torch.Tensor, tolerance: float = 2e-5) -> bool:
    """Equal up to float32 summation order, relative to the tensor's scale."""
    return (a - b).abs().max().item() <= tolerance * max(b.abs().max().item(), 1e-6)


@needs_onednn
@pytest.mark.parametrize("features", [(48, 200), (200, 48), (64, 64)])  # both ways round of the weight gradient
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("transposed_input", [False, True])
def test_linear_equals_f_linear_with_gradients(features, with_bias, transposed_input):
    in_features, out_features = features
    torch.manual_seed(0)
    if transposed_input:  # a strided input, as attention outputs and transposed views arrive
        x = torch.randn(3, in_features, 11).transpose(1, 2).requires_grad_()
    else:
        x = torch.randn(3, 11, in_features, requires_grad=True)
    weight = torch.randn(out_features, in_features, requires_grad=True)
    bias = torch.randn(out_features, requires_grad=True) if with_bias else None
    ours = linear(x, weight, bias)
    assert type(ours.grad_fn).__name__ == "_OneDNNLinearBackward"  # the new path, not a silent fallback
    plain = F.linear(x, weight, bias)
    assert ours.shape == plain.shape and _close(ours, plain)
    grad = torch.randn_like(plain)
    inputs = (x, weight) + ((bias,) if with_bias else ())
    for mine, theirs in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(plain, inputs, grad)):
        assert mine.shape == theirs.shape and mine.is_contiguous() and _close(mine, theirs)


@needs_onednn
def test_gradients_with_one_operand_frozen_equal_the_plain_formulas():
    x = torch.randn(5, 8)
    weight = torch.randn(4, 8, requires_grad=True)
    out = linear(x, weight)
    assert type(out.grad_fn).__name__ == "_OneDNNLinearBackward"
    (grad_weight,) = torch.autograd.grad(out.sum(), (weight,))
    assert _close(grad_weight, torch.ones(5, 4).t() @ x)
    frozen = torch.randn(4, 8)
    x.requires_grad_()
    out = linear(x, frozen)
    assert type(out.grad_fn).__name__ == "_OneDNNLinearBackward"
    (grad_x,) = torch.autograd.grad(out.sum(), (x,))
    assert _close(grad_x, torch.ones(5, 4) @ frozen)


@needs_onednn
def test_second_derivatives_agree_for_a_gradient_penalty():
    """The discriminator's R1 penalty differentiates a gradient: the backward pass must itself be differentiable."""
    torch.manual_seed(0)
    x = torch.randn(6, 10, requires_grad=True)
    parameters = (torch.randn(16, 10, requires_grad=True), torch.randn(16, requires_grad=True),
                  torch.randn(1, 16, requires_grad=True))

    def penalty_gradients() -> tuple[torch.Tensor, ...]:
        first, bias, second = parameters
        scores = linear(torch.tanh(linear(x, first, bias)), second)
        (grad_x,) = torch.autograd.grad(scores.sum(), x, create_graph=True)
        return torch.autograd.grad(grad_x.square().sum(), parameters)

    with use_backend("aten"):
        plain = penalty_gradients()
    for mine, theirs in zip(penalty_gradients(), plain):
        assert _close(mine, theirs)


@needs_onednn
def test_no_grad_forwards_between_fused_optimizer_steps_see_the_current_weights():
    """Validation inside a training loop: fused AdamW updates the weights in place without bumping their version
    counter, so nothing may be cached across steps."""
    torch.manual_seed(0)
    layer = Linear(16, 24)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True)
    x = torch.randn(5, 16)
    for _ in range(3):
        layer(x).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            assert _close(layer.eval()(x), F.linear(x, layer.weight, layer.bias))
        layer.train()


@needs_onednn
def test_packed_weights_live_only_inside_their_context():
    torch.manual_seed(0)
    model = nn.Sequential(Linear(16, 24), nn.GELU(), Linear(24, 8))
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = model(x)
    assert not any("_packed" in m.__dict__ for m in model)
    with packed_weights(model):
        assert all("_packed" in m.__dict__ for m in model if isinstance(m, Linear))
        with torch.no_grad():
            assert _close(model(x), expected)
        with packed_weights(model):  # nested: the inner context leaves the outer one's copies alone
            pass
        assert all("_packed" in m.__dict__ for m in model if isinstance(m, Linear))
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):  # copies leave them behind
            assert not any("_packed" in m.__dict__ for m in clone)
            with torch.no_grad():
                assert _close(clone(x), expected)
        out = model(x.requires_grad_())  # with gradients the layers use their weights
        assert type(out.grad_fn).__name__ == "_OneDNNLinearBackward"
    assert not any("_packed" in m.__dict__ for m in model)
    assert set(model.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_other_dtypes_autocast_and_the_aten_backend_fall_back_to_f_linear():
    x, weight = torch.randn(4, 8, requires_grad=True), torch.randn(3, 8, requires_grad=True)
    with use_backend("aten"):
        assert cpu_linear.backend() == "aten"
        assert type(linear(x, weight).grad_fn).__name__ != "_OneDNNLinearBackward"
    assert type(linear(x.double(), weight.double()).grad_fn).__name__ != "_OneDNNLinearBackward"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear(x, weight).dtype == torch.bfloat16
    empty = linear(torch.randn(0, 8), weight)
    assert empty.shape == (0, 3)
    assert torch.equal(linear(x[0], weight), F.linear(x[0], weight))  # a single vector, as F.linear takes it
    with pytest.raises(ValueError, match="unknown CPU linear backend"):
        with use_backend("mkl"):
            pass


def _transformer() -> VIMTransformer:
    settings = TransformerSettings(size="nano", vocab_size=64, grid=(4, 4), num_classes=5, label_dropout=0.1,
                                   dropout=0.1)
    return VIMTransformer(settings)


@needs_onednn
def test_vim_transformer_trains_and_samples_alike_under_both_backends():
    torch.manual_seed(0)
    model = _transformer().train()
    tokens, labels = torch.randint(0, 64, (3, 16)), torch.tensor([0, 3, 4])
    runs = {}
    for name in ("aten", "onednn"):
        model.zero_grad()
        with use_backend(name):
            torch.manual_seed(1)  # the same dropout masks: the backend draws no random numbers
            logits = model(tokens, labels)
            F.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
        runs[name] = (logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert _close(runs["onednn"][0], runs["aten"][0])
    for name, grad in runs["aten"][1].items():
        assert _close(runs["onednn"][1][name], grad, 1e-4), name

    model.eval()
    with torch.no_grad(), packed_weights(model):  # decoding on packed weights = the full forward on plain ones
        cache = model.new_cache(3)
        steps = [model.prefill(labels, cache)]
        for position in range(15):
            steps.append(model.decode_step(tokens[:, position], cache))
        with use_backend("aten"):
            full = model(tokens, labels)
    assert _close(torch.stack(steps, 1), full, 1e-4)


@needs_onednn
def test_tokenizer_trains_and_encodes_alike_under_both_backends():
    torch.manual_seed(0)
    model = ViTVQGAN(TokenizerSettings(image_size=16, patch_size=4, encoder="tiny", decoder="tiny",
                                       codebook_size=64, codebook_dim=8)).train()
    images = torch.rand(4, 3, 16, 16)
    runs = {}
    for name in ("aten", "onednn"):
        model.zero_grad()
        with use_backend(name):
            reconstruction, _, quantized = model(images)
            ((reconstruction - images).square().mean() + sum(quantized.losses.values())).backward()
        runs[name] = (reconstruction.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                 if p.grad is not None})
    assert _close(runs["onednn"][0], runs["aten"][0])
    assert runs["onednn"][1].keys() == runs["aten"][1].keys()
    for name, grad in runs["aten"][1].items():
        assert _close(runs["onednn"][1][name], grad, 1e-4), name
    model.eval()
    with use_backend("aten"):
        plain_codes = model.encode(images)
    assert torch.equal(model.encode(images), plain_codes)
