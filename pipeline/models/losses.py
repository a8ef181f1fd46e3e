"""Tokenizer losses: logit-Laplace NLL (DALL-E form), L2, LPIPS-VGG, and the non-saturating GAN loss
with lazy R1.

Choices where the paper is silent: the decoder predicts a per-pixel, per-channel
scale for the logit-Laplace (DALL-E's form; 6 output channels); the GAN loss is non-saturating with
lazy R1 (gamma 10 every 16 steps by default), as in StyleGAN2.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

LOGIT_LAPLACE_EPS = 0.1


def to_laplace_space(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """Pixels in [0, 1] -> (eps, 1 - eps), where the logit-Laplace density lives."""
    return (1 - 2 * eps) * x + eps


def from_laplace_space(y: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    return ((y - eps) / (1 - 2 * eps)).clamp(0, 1)


def logit_laplace_nll(x: torch.Tensor, mu: torch.Tensor, log_b: torch.Tensor,
                      eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """Mean per-pixel NLL of pixels x in [0, 1] under the logit-Laplace with location mu (logit space)
    and log-scale log_b: ln(2 b y (1 - y)) + |logit(y) - mu| / b, with y = (1 - 2 eps) x + eps."""
    y = to_laplace_space(x, eps)
    b = log_b.exp()
    nll = math.log(2.0) + log_b + torch.log(y) + torch.log1p(-y) + (torch.logit(y) - mu).abs() / b
    return nll.mean()


# ---------------------------------------------------------------------------------------------
# Perceptual loss: LPIPS with VGG16 features


VGG16_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16 checkpoint name


class PerceptualWeightsMissing(RuntimeError):
    pass


def find_vgg16_weights(explicit: str | None) -> Path:
    """A local VGG16 checkpoint: the configured path, else torchvision's cache. No downloads here."""
    candidates = [Path(explicit).expanduser()] if explicit else []
    hub = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints"
    candidates.append(hub / VGG16_FILE)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise PerceptualWeightsMissing(
        "the perceptual loss needs VGG16 ImageNet weights and none were found (looked at "
        f"{', '.join(str(c) for c in candidates)}). Put torchvision's {VGG16_FILE} there or set "
        "tokenizer.vgg16_weights, or turn the perceptual loss off with tokenizer.perceptual_weight=0")


def load_lpips_vgg(vgg16_weights: str | Path | None) -> nn.Module:
    """LPIPS-VGG from the `lpips` package (its linear heads ship with it), VGG16 trunk from a local file.

    vgg16_weights=None builds a randomly initialised trunk: only for tests of the wiring.
    """
    import lpips

    model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    if vgg16_weights is not None:
        state = torch.load(str(vgg16_weights), map_location="cpu", weights_only=True)
        features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        slices = [model.net.slice1, model.net.slice2, model.net.slice3, model.net.slice4, model.net.slice5]
        loaded = 0
        for block in slices:
            for name, layer in block.named_children():  # lpips names its layers by VGG feature index
                if f"{name}.weight" in features:
                    layer.weight.data.copy_(features[f"{name}.weight"])
                    layer.bias.data.copy_(features[f"{name}.bias"])
                    loaded += 1
        if loaded != 13:  # all 13 VGG16 convs sit inside the five LPIPS slices
            raise ValueError(f"{vgg16_weights}: expected VGG16 conv weights, matched {loaded} layers")
    model.eval().requires_grad_(False)
    return model


class Perceptual(nn.Module):
    """LPIPS distance of images in [0, 1] (LPIPS wants [-1, 1])."""

    def __init__(self, vgg16_weights: str | Path | None):
        super().__init__()
        self.lpips = load_lpips_vgg(vgg16_weights)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.lpips(x * 2 - 1, y * 2 - 1).mean()


# ---------------------------------------------------------------------------------------------
# Adversarial loss


def generator_adversarial(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss: softplus(-D(G(z)))."""
    return F.softplus(-fake_logits).mean()


def discriminator_adversarial(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


def r1_penalty(discriminator: nn.Module, real: torch.Tensor) -> torch.Tensor:
    """E ||grad_x D(x)||^2 on real images; differentiable (create_graph) so it can be minimised."""
    real = real.detach().requires_grad_(True)
    logits = discriminator(real)
    (grad,) = torch.autograd.grad(logits.sum(), real, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()
